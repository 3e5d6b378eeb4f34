"""PyTorch checkpoints read with numpy alone: no torch, and no pickled code is ever run.

``torch.save`` has written two formats. Since torch 1.6 a ``.pth`` is a zip
archive holding ``<name>/data.pkl``, a pickle of the saved object in which every
tensor is a call ``torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, ...)`` and every storage a persistent id ``('storage', FloatStorage,
key, location, numel)`` whose bytes are the member ``<name>/data/<key>``. Before
1.6 (torchvision's ``wide_resnet50_2-95faca4d.pth`` among others) the file is a
stream: pickles of a magic number, the protocol version and system facts, the
same kind of object pickle, the list of storage keys, then every storage as an
int64 element count and its bytes.

Both are read by a restricted ``pickle.Unpickler``: ``find_class`` resolves only
the handful of names that torch's own ``weights_only`` loader allows for
tensors and containers (the rebuild functions, storage and dtype names,
``collections.OrderedDict``, ``torch.Size``, ...), each mapped to a small numpy
builder, and refuses everything else with a message naming the global. A
malicious pickle (``os.system``, ``builtins.eval``, a custom class) is refused
before anything is called. torch < 0.4's tar format is not read.

A ``.safetensors`` file (an 8-byte header length, a JSON header, raw
little-endian data) is parsed directly, so that bfloat16 tensors, which
``safetensors.numpy`` cannot hold, read too.

Tensors come back as numpy arrays in their own dtype, except bfloat16, which
numpy lacks: it is widened to float32 exactly (bfloat16 is float32's upper 16
bits). Every offset, stride and size read from a file is checked against the
data it points into, so a damaged or hostile file gives an error, never a read
outside the buffer.

Errors are ``CheckpointFormatError`` (a ``ValueError``) with one line naming
the file and what was expected.

Why one module of this size: both formats share one bounded unpickler and one
set of checks on offsets, strides and sizes; the checks are the point of the
module.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
import json
import os
import pathlib
import pickle
import struct
import tarfile
from typing import Any
import zipfile

import numpy as np

PTH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"

# torch storage class -> numpy dtype ("bfloat16" is widened to float32 on read).
_STORAGE_DTYPES = {
  "DoubleStorage": np.float64,
  "FloatStorage": np.float32,
  "HalfStorage": np.float16,
  "BFloat16Storage": "bfloat16",
  "LongStorage": np.int64,
  "IntStorage": np.int32,
  "ShortStorage": np.int16,
  "CharStorage": np.int8,
  "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
  "ComplexDoubleStorage": np.complex128,
  "ComplexFloatStorage": np.complex64,
  "UntypedStorage": np.uint8,
}
# torch dtype name -> numpy dtype, for ``_rebuild_tensor_v3`` (dtypes without a
# typed storage, e.g. uint16) and for dtype objects inside a pickle.
_TORCH_DTYPES = {
  "float64": np.float64,
  "float32": np.float32,
  "float16": np.float16,
  "bfloat16": "bfloat16",
  "int64": np.int64,
  "int32": np.int32,
  "int16": np.int16,
  "int8": np.int8,
  "uint8": np.uint8,
  "uint16": np.uint16,
  "uint32": np.uint32,
  "uint64": np.uint64,
  "bool": np.bool_,
  "complex128": np.complex128,
  "complex64": np.complex64,
}
# safetensors dtype tag -> numpy dtype.
_SAFETENSORS_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": "bfloat16",
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U64": np.uint64,
  "U32": np.uint32,
  "U16": np.uint16,
  "U8": np.uint8,
  "BOOL": np.bool_,
}


# The first pickles of a legacy (torch < 1.6) torch.save stream.
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001


class CheckpointFormatError(ValueError):
  """A file that is not a readable checkpoint of the expected format."""


def _storage_dtype(dtype) -> np.dtype:
  return np.dtype(np.uint16 if dtype == "bfloat16" else dtype)


def _widen_bfloat16(raw: np.ndarray) -> np.ndarray:
  """bfloat16 bits (uint16) -> float32, exactly."""
  return (raw.astype(np.uint32) << 16).view(np.float32)


# ----------------------------------------------------------------------------- .pth


class _StorageType:
  """Stands for ``torch.FloatStorage`` etc. inside the pickle."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = _STORAGE_DTYPES[name]


class _DType:
  """Stands for ``torch.float32`` etc. inside the pickle."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = _TORCH_DTYPES[name]

  def __repr__(self) -> str:
    return f"torch.{self.name}"


class _StorageRef:
  """A storage named by a persistent id; its bytes are read after the pickle."""

  def __init__(self, key: str, dtype, numel: int | None, view_offset: int = 0):
    self.key = key
    self.dtype = dtype  # the storage's element type ("bfloat16" for its uint16 bits)
    self.numel = numel
    self.view_offset = view_offset  # legacy storage views start inside their root


class _LazyTensor:
  """A tensor of the pickle, built once every storage has been read."""

  def __init__(self, storage: _StorageRef, offset, size, stride, dtype=None):
    self.storage = storage
    self.offset = int(offset) + storage.view_offset
    self.size = tuple(int(n) for n in size)
    self.stride = tuple(int(n) for n in stride)
    self.dtype = dtype  # None: the storage's dtype (typed storages)


class _Marker:
  """A class name the pickle may mention (``torch.Tensor``, ``Parameter``), never built."""

  def __init__(self, name: str):
    self.name = name


def _build(tensor: _LazyTensor, storages: Mapping[str, np.ndarray], path: str) -> np.ndarray:
  """A copy of ``storage[offset + sum(i_k * stride_k)]``, every index bounds-checked."""
  flat = storages[tensor.storage.key]
  dtype = tensor.dtype if tensor.dtype is not None else tensor.storage.dtype
  if _storage_dtype(dtype) != flat.dtype:  # bytes of an untyped storage
    itemsize = _storage_dtype(dtype).itemsize
    if flat.dtype != np.uint8 or flat.size % itemsize:
      raise CheckpointFormatError(f"{path}: a tensor's dtype does not fit its storage.")
    flat = flat.view(_storage_dtype(dtype))
  size, stride, offset = tensor.size, tensor.stride, tensor.offset
  if len(size) != len(stride) or min((*size, *stride, offset), default=0) < 0:
    raise CheckpointFormatError(
      f"{path}: a tensor has an invalid size {size} / stride {stride} / offset {offset}."
    )
  if 0 in size:
    out = np.zeros(size, flat.dtype)
  else:
    last = offset + sum((n - 1) * st for n, st in zip(size, stride))
    if last >= flat.size:
      raise CheckpointFormatError(
        f"{path}: a tensor of size {size} reaches element {last} of a storage of "
        f"{flat.size} (truncated or damaged file)."
      )
    item = flat.dtype.itemsize
    out = np.lib.stride_tricks.as_strided(
      flat[offset:], shape=size, strides=tuple(st * item for st in stride), writeable=False
    ).copy()
  return _widen_bfloat16(out) if dtype == "bfloat16" else out


def _materialize(obj: Any, storages: Mapping[str, np.ndarray], path: str) -> Any:
  """The unpickled object with every ``_LazyTensor`` replaced by its numpy array."""
  if isinstance(obj, _LazyTensor):
    return _build(obj, storages, path)
  if isinstance(obj, dict):
    out = type(obj)() if type(obj) in (dict, collections.OrderedDict) else {}
    for k, v in obj.items():
      out[k] = _materialize(v, storages, path)
    return out
  if isinstance(obj, list):
    return [_materialize(v, storages, path) for v in obj]
  if isinstance(obj, tuple):
    return tuple(_materialize(v, storages, path) for v in obj)
  return obj


class _WeightsUnpickler(pickle.Unpickler):
  """Unpickles a torch checkpoint's pickle with an allow-list of globals.

  Tensors come out as ``_LazyTensor`` and storages as ``_StorageRef``
  (``self.storages``, by key); ``_materialize`` builds the arrays afterwards.
  """

  def __init__(self, file, path: str):
    super().__init__(file)
    self._path = path
    self.storages: dict[str, _StorageRef] = {}
    self._allowed = self._allowed_globals()

  def _allowed_globals(self) -> dict[str, Any]:
    path = self._path

    def rebuild_tensor(storage, offset, size, stride, *rest):
      # _rebuild_tensor(storage, offset, size, stride) and _rebuild_tensor_v2(...,
      # requires_grad, backward_hooks[, metadata]): the rest is autograd state.
      del rest
      if not isinstance(storage, _StorageRef):
        raise CheckpointFormatError(f"{path}: a tensor without a storage ({storage!r}).")
      return _LazyTensor(storage, offset, size, stride)

    def rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, meta=None):
      del requires_grad, hooks, meta
      if not isinstance(dtype, _DType) or not isinstance(storage, _StorageRef):
        raise CheckpointFormatError(f"{path}: a tensor with dtype {dtype!r} is not supported.")
      return _LazyTensor(storage, offset, size, stride, dtype.dtype)

    def rebuild_parameter(data, requires_grad, hooks, state=None):
      del requires_grad, hooks, state
      return data

    def rebuild_from_type_v2(func, new_type, args, state):
      # A tensor subclass (e.g. a whole nn.Parameter): build the plain tensor.
      del new_type, state
      if func not in (rebuild_tensor, rebuild_tensor_v3, rebuild_parameter):
        raise CheckpointFormatError(f"{path}: unsupported tensor rebuild function {func!r}.")
      return func(*args)

    def encode(text, encoding="latin1"):  # protocol-2 pickles store bytes this way
      return str(text).encode(encoding)

    allowed: dict[str, Any] = {
      "collections.OrderedDict": collections.OrderedDict,
      "collections.Counter": collections.Counter,
      "torch._utils._rebuild_tensor": rebuild_tensor,
      "torch._utils._rebuild_tensor_v2": rebuild_tensor,
      "torch._utils._rebuild_tensor_v3": rebuild_tensor_v3,
      "torch._utils._rebuild_parameter": rebuild_parameter,
      "torch._utils._rebuild_parameter_with_state": rebuild_parameter,
      "torch._tensor._rebuild_from_type_v2": rebuild_from_type_v2,
      "torch.Size": tuple,
      "torch.device": str,
      "torch.Tensor": _Marker("torch.Tensor"),
      "torch.nn.parameter.Parameter": _Marker("torch.nn.parameter.Parameter"),
      "_codecs.encode": encode,
      "builtins.set": set,
      "builtins.bytearray": bytearray,
      "builtins.complex": complex,
    }
    for name in _STORAGE_DTYPES:
      allowed[f"torch.{name}"] = _StorageType(name)
      allowed[f"torch.storage.{name}"] = _StorageType(name)
    for name in _TORCH_DTYPES:
      allowed[f"torch.{name}"] = _DType(name)
    return allowed

  def find_class(self, module: str, name: str) -> Any:
    key = f"{module}.{name}"
    if key in self._allowed:
      return self._allowed[key]
    hint = (
      " (a TorchScript archive or a pickled model: save its state_dict() instead)"
      if module.startswith("__torch__")
      else ""
    )
    raise CheckpointFormatError(
      f"{self._path}: refuses to load the pickled global {key!r}: only tensors, "
      f"dicts, lists and numbers are read, and no code from a checkpoint is run{hint}."
    )

  def persistent_load(self, pid) -> _StorageRef:
    # zip: ('storage', type, key, location, numel); legacy: the same + view_metadata.
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
      raise CheckpointFormatError(f"{self._path}: unknown persistent id {pid!r} in the pickle.")
    storage_type, key, numel = pid[1], str(pid[2]), pid[4]
    if not isinstance(storage_type, _StorageType):
      raise CheckpointFormatError(f"{self._path}: unknown storage type {storage_type!r}.")
    if key not in self.storages:
      self.storages[key] = _StorageRef(key, storage_type.dtype, int(numel))
    root = self.storages[key]
    view = pid[5] if len(pid) == 6 else None
    if view is None:
      return root
    _, view_offset, _ = view  # a legacy storage view: (view_key, offset, size)
    return _StorageRef(key, root.dtype, root.numel, int(view_offset))


def _check_readable(path: pathlib.Path) -> None:
  if not path.is_file():
    raise FileNotFoundError(f"Checkpoint not found: {path}")


def _read_zip(path: pathlib.Path) -> Any:
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise CheckpointFormatError(
        f"{path}: a zip archive but not a torch.save checkpoint (expected one "
        f"'<name>/data.pkl', found {len(pickles)})."
      )
    prefix = pickles[0].split("/")[0]
    order = "<"
    if f"{prefix}/byteorder" in names:
      byteorder = zf.read(f"{prefix}/byteorder").decode("ascii", "replace").strip()
      if byteorder not in ("little", "big"):
        raise CheckpointFormatError(f"{path}: unknown byte order {byteorder!r}.")
      order = "<" if byteorder == "little" else ">"
    with zf.open(pickles[0]) as pkl:
      unpickler = _WeightsUnpickler(pkl, str(path))
      obj = unpickler.load()
    storages = {}
    for key, ref in unpickler.storages.items():
      member = f"{prefix}/data/{key}"
      if member not in names:
        raise CheckpointFormatError(
          f"{path}: storage {member!r} is missing (truncated or damaged file)."
        )
      storages[key] = _frombuffer(zf.read(member), ref.dtype, order, f"{path}: storage {member!r}")
  return _materialize(obj, storages, str(path))


def _frombuffer(raw: bytes, dtype, order: str, what: str) -> np.ndarray:
  dt = _storage_dtype(dtype).newbyteorder(order)
  if len(raw) % dt.itemsize:
    raise CheckpointFormatError(f"{what} has a partial element.")
  return np.frombuffer(raw, dt).astype(dt.newbyteorder("="), copy=False)


def _read_legacy(path: pathlib.Path) -> Any:
  """torch.save's format before 1.6: pickles of a magic number, the protocol, system
  facts and the object, the storage keys, then each storage as an int64 element
  count followed by its little-endian bytes."""
  with open(path, "rb") as f:

    def plain():
      return _WeightsUnpickler(f, str(path)).load()

    if plain() != LEGACY_MAGIC_NUMBER:
      raise CheckpointFormatError(
        f"{path}: a pickle file, not a PyTorch checkpoint (expected the archive torch.save writes)."
      )
    if plain() != LEGACY_PROTOCOL_VERSION:
      raise CheckpointFormatError(f"{path}: unknown legacy torch.save protocol version.")
    sys_info = plain()
    if not (isinstance(sys_info, dict) and sys_info.get("little_endian", True)):
      raise CheckpointFormatError(f"{path}: a big-endian legacy checkpoint is not supported.")
    unpickler = _WeightsUnpickler(f, str(path))
    obj = unpickler.load()
    keys = plain()
    if not isinstance(keys, list) or set(keys) != set(unpickler.storages):
      raise CheckpointFormatError(f"{path}: the storage list does not match the tensors.")
    storages = {}
    for key in keys:
      ref = unpickler.storages[key]
      itemsize = _storage_dtype(ref.dtype).itemsize
      head = f.read(8)
      numel = struct.unpack("<q", head)[0] if len(head) == 8 else -1
      raw = f.read(numel * itemsize) if numel == ref.numel else b""
      if numel != ref.numel or len(raw) != numel * itemsize:
        raise CheckpointFormatError(
          f"{path}: storage {key!r} is cut short or damaged (truncated file?)."
        )
      storages[key] = _frombuffer(raw, ref.dtype, "<", f"{path}: storage {key!r}")
  return _materialize(obj, storages, str(path))


def read_pth(path: str | os.PathLike) -> Any:
  """Reads a ``torch.save`` file into dicts, lists and numpy arrays.

  Both formats are read: the zip archive (torch >= 1.6) and the legacy stream
  of pickles (torch < 1.6; e.g. torchvision's ``wide_resnet50_2-95faca4d.pth``).

  Args:
    path: the file (any suffix; ``.pth`` / ``.pt`` by convention).

  Returns:
    The saved object with every tensor as a numpy array (bfloat16 as float32)
    and every ``OrderedDict`` as an ``OrderedDict``.

  Raises:
    CheckpointFormatError: not a torch checkpoint (text, another pickle, a
      truncated archive, torch < 0.4's tar format), or a pickle that needs
      anything but tensors and containers.
  """
  path = pathlib.Path(path)
  _check_readable(path)
  with open(path, "rb") as f:
    head = f.read(8)
  try:
    if zipfile.is_zipfile(path):
      return _read_zip(path)
    if head[:2] == b"PK":
      raise CheckpointFormatError(
        f"{path}: damaged or truncated PyTorch checkpoint (a zip archive without its "
        "directory); copy or download it again."
      )
    if head[:1] == b"\x80":
      return _read_legacy(path)
    if tarfile.is_tarfile(path):
      raise CheckpointFormatError(
        f"{path}: torch < 0.4's tar checkpoint format is not read; convert it once with "
        "torch: torch.save(torch.load(f), 'new.pth'), or save it as .safetensors."
      )
  except CheckpointFormatError:
    raise
  except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, OSError, ValueError) as e:
    first = (str(e).strip().splitlines() or [""])[0]
    raise CheckpointFormatError(
      f"{path}: damaged or truncated PyTorch checkpoint ({type(e).__name__}: {first})."
    ) from None
  raise CheckpointFormatError(
    f"{path}: not a PyTorch checkpoint (expected the archive torch.save writes; the "
    f"file starts with {head!r})."
  )


# ----------------------------------------------------------------------------- .safetensors


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a ``.safetensors`` file into ``{name: numpy array}`` (bfloat16 as float32).

  Raises:
    CheckpointFormatError: a header or data block that does not fit the format.
  """
  path = pathlib.Path(path)
  _check_readable(path)
  blob = path.read_bytes()

  def bad(why: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"{path}: not a readable .safetensors file ({why}).")

  if len(blob) < 8:
    raise bad(f"{len(blob)} bytes, shorter than the 8-byte header length")
  (n,) = struct.unpack("<Q", blob[:8])
  if n > len(blob) - 8:
    raise bad(f"header of {n} bytes in a file of {len(blob)}")
  try:
    header = json.loads(blob[8 : 8 + n].decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise bad(f"header is not JSON: {e}") from None
  if not isinstance(header, dict):
    raise bad("header is not a JSON object")
  data = blob[8 + n :]
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      tag, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
      if not all(isinstance(v, int) and v >= 0 for v in (*shape, begin, end)):
        raise ValueError
    except (KeyError, TypeError, ValueError):
      raise bad(f"entry {name!r} lacks a valid dtype / shape / data_offsets") from None
    if tag not in _SAFETENSORS_DTYPES:
      raise bad(f"tensor {name!r} has unsupported dtype {tag!r}")
    dtype = _SAFETENSORS_DTYPES[tag]
    raw_dtype = _storage_dtype(dtype).newbyteorder("<")
    count = int(np.prod(shape, dtype=np.int64))
    if not 0 <= begin <= end <= len(data) or end - begin != count * raw_dtype.itemsize:
      raise bad(f"tensor {name!r} of shape {shape} does not fit bytes {begin}..{end}")
    value = np.frombuffer(data[begin:end], raw_dtype).astype(raw_dtype.newbyteorder("="))
    value = value.reshape(shape)
    out[name] = _widen_bfloat16(value) if dtype == "bfloat16" else value
  return out


# ----------------------------------------------------------------------------- both


def load(path: str | os.PathLike) -> Any:
  """Reads a checkpoint by its suffix: ``.safetensors``, else a ``torch.save`` zip.

  Returns:
    A flat ``{name: array}`` for safetensors; the saved object for torch files.
  """
  path = pathlib.Path(path)
  if path.suffix.lower() == SAFETENSORS_SUFFIX:
    return read_safetensors(path)
  return read_pth(path)


def flatten_tensors(obj: Any, prefix: str = "") -> dict[str, np.ndarray]:
  """``{'bn': {'conv1.weight': a}}`` -> ``{'bn.conv1.weight': a}``; non-tensor leaves dropped.

  Nested mappings (a dict of state dicts, as the RD-family scripts save) are
  joined with ``'.'``, which is also how such a checkpoint's tensors are named
  when it is converted to ``.safetensors``.
  """
  out: dict[str, np.ndarray] = {}
  if isinstance(obj, Mapping):
    for key, value in obj.items():
      name = f"{prefix}.{key}" if prefix else str(key)
      out.update(flatten_tensors(value, name))
  elif isinstance(obj, np.ndarray):
    out[prefix] = obj
  return out
