"""PyTorch checkpoints read with numpy alone: no torch, and no pickled code is ever run.

A ``.pth`` written by ``torch.save`` (torch >= 1.6, the zip format) is a zip
archive holding ``<name>/data.pkl``, a pickle of the saved object in which every
tensor is a call ``torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, ...)`` and every storage a persistent id ``('storage', FloatStorage,
key, location, numel)`` whose bytes are the member ``<name>/data/<key>``. It
is read here by a restricted ``pickle.Unpickler``: ``find_class`` resolves only
the handful of names that torch's own ``weights_only`` loader allows for
tensors and containers (the rebuild functions, storage and dtype names,
``collections.OrderedDict``, ``torch.Size``, ...), each mapped to a small numpy
builder, and refuses everything else with a message naming the global. A
malicious pickle (``os.system``, ``builtins.eval``, a custom class) is refused
before anything is called.

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
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
import json
import os
import pathlib
import pickle
import struct
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


class _Storage:
  """A storage's raw bytes as a flat array of its dtype (uint16 for bfloat16)."""

  def __init__(self, data: np.ndarray, dtype):
    self.data = data
    self.dtype = dtype


class _Marker:
  """A class name the pickle may mention (``torch.Tensor``, ``Parameter``), never built."""

  def __init__(self, name: str):
    self.name = name


def _strided(storage: _Storage, offset, size, stride, dtype, path: str) -> np.ndarray:
  """A copy of the tensor ``storage[offset + sum(i_k * stride_k)]``, bounds-checked."""
  size = tuple(int(s) for s in size)
  stride = tuple(int(s) for s in stride)
  offset = int(offset)
  flat = storage.data
  if dtype is None:  # a typed storage: the tensor has the storage's dtype
    dtype = storage.dtype
  elif _storage_dtype(dtype) != flat.dtype:  # bytes of an untyped storage
    itemsize = _storage_dtype(dtype).itemsize
    if flat.dtype != np.uint8 or flat.size % itemsize:
      raise CheckpointFormatError(f"{path}: a tensor's dtype does not fit its storage.")
    flat = flat.view(_storage_dtype(dtype))
  if len(size) != len(stride) or any(s < 0 for s in size + stride) or offset < 0:
    raise CheckpointFormatError(
      f"{path}: a tensor has an invalid size {size} / stride {stride} / offset {offset}."
    )
  if 0 in size:
    out = np.zeros(size, flat.dtype)
  else:
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= flat.size:
      raise CheckpointFormatError(
        f"{path}: a tensor of size {size} reaches element {last} of a storage of "
        f"{flat.size} (truncated or damaged file)."
      )
    item = flat.dtype.itemsize
    out = np.lib.stride_tricks.as_strided(
      flat[offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False
    ).copy()
  return _widen_bfloat16(out) if dtype == "bfloat16" else out


class _WeightsUnpickler(pickle.Unpickler):
  """Unpickles ``data.pkl`` of a torch zip checkpoint with an allow-list of globals."""

  def __init__(self, file, zf: zipfile.ZipFile, prefix: str, byteorder: str, path: str):
    super().__init__(file)
    self._zf = zf
    self._prefix = prefix
    self._byteorder = "<" if byteorder == "little" else ">"
    self._path = path
    self._storages: dict[str, _Storage] = {}
    self._allowed = self._allowed_globals()

  def _allowed_globals(self) -> dict[str, Any]:
    path = self._path

    def rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, metadata=None):
      del requires_grad, hooks, metadata
      return _strided(storage, offset, size, stride, None, path)

    def rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, meta=None):
      del requires_grad, hooks, meta
      if not isinstance(dtype, _DType):
        raise CheckpointFormatError(f"{path}: a tensor with dtype {dtype!r} is not supported.")
      return _strided(storage, offset, size, stride, dtype.dtype, path)

    def rebuild_parameter(data, requires_grad, hooks, state=None):
      del requires_grad, hooks, state
      return data

    def rebuild_from_type_v2(func, new_type, args, state):
      # A tensor subclass (e.g. a whole nn.Parameter): build the plain tensor.
      del new_type, state
      if func not in (rebuild_tensor_v2, rebuild_tensor_v3, rebuild_parameter):
        raise CheckpointFormatError(f"{path}: unsupported tensor rebuild function {func!r}.")
      return func(*args)

    def encode(text, encoding="latin1"):  # protocol-2 pickles store bytes this way
      return str(text).encode(encoding)

    allowed: dict[str, Any] = {
      "collections.OrderedDict": collections.OrderedDict,
      "collections.Counter": collections.Counter,
      "torch._utils._rebuild_tensor_v2": rebuild_tensor_v2,
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

  def persistent_load(self, pid) -> _Storage:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise CheckpointFormatError(f"{self._path}: unknown persistent id {pid!r} in data.pkl.")
    _, storage_type, key, _location, _numel = pid
    if not isinstance(storage_type, _StorageType):
      raise CheckpointFormatError(f"{self._path}: unknown storage type {storage_type!r}.")
    key = str(key)
    if key not in self._storages:
      member = f"{self._prefix}/data/{key}"
      try:
        raw = self._zf.read(member)
      except KeyError:
        raise CheckpointFormatError(
          f"{self._path}: storage {member!r} is missing (truncated or damaged file)."
        ) from None
      dtype = _storage_dtype(storage_type.dtype).newbyteorder(self._byteorder)
      if len(raw) % dtype.itemsize:
        raise CheckpointFormatError(f"{self._path}: storage {member!r} has a partial element.")
      data = np.frombuffer(raw, dtype).astype(dtype.newbyteorder("="), copy=False)
      self._storages[key] = _Storage(data, storage_type.dtype)
    return self._storages[key]


def _check_readable(path: pathlib.Path) -> None:
  if not path.is_file():
    raise FileNotFoundError(f"Checkpoint not found: {path}")


def read_pth(path: str | os.PathLike) -> Any:
  """Reads a ``torch.save`` file (zip format) into dicts, lists and numpy arrays.

  Args:
    path: the file (any suffix; ``.pth`` / ``.pt`` by convention).

  Returns:
    The saved object with every tensor as a numpy array (bfloat16 as float32)
    and every ``OrderedDict`` as an ``OrderedDict``.

  Raises:
    CheckpointFormatError: not a zip-format torch checkpoint (legacy pre-1.6
      files, text, truncated archives), or a pickle that needs anything but
      tensors and containers.
  """
  path = pathlib.Path(path)
  _check_readable(path)
  with open(path, "rb") as f:
    head = f.read(8)
  if not zipfile.is_zipfile(path):
    if head[:2] == b"PK":
      raise CheckpointFormatError(
        f"{path}: damaged or truncated PyTorch checkpoint (a zip archive without its "
        "directory); copy or download it again."
      )
    if head[:1] == b"\x80":
      raise CheckpointFormatError(
        f"{path}: a legacy (pre-1.6, non-zip) torch checkpoint, which is not read "
        "without torch. Convert it once with torch >= 1.6: torch.save(torch.load(f, "
        "weights_only=True), 'new.pth'), or save it as .safetensors."
      )
    raise CheckpointFormatError(
      f"{path}: not a PyTorch checkpoint (expected the zip archive torch.save writes; "
      f"the file starts with {head!r})."
    )
  try:
    with zipfile.ZipFile(path) as zf:
      pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
      if len(pickles) != 1:
        raise CheckpointFormatError(
          f"{path}: a zip archive but not a torch.save checkpoint (expected one "
          f"'<name>/data.pkl', found {len(pickles)})."
        )
      prefix = pickles[0].split("/")[0]
      byteorder = "little"
      if f"{prefix}/byteorder" in zf.namelist():
        byteorder = zf.read(f"{prefix}/byteorder").decode("ascii", "replace").strip()
        if byteorder not in ("little", "big"):
          raise CheckpointFormatError(f"{path}: unknown byte order {byteorder!r}.")
      with zf.open(pickles[0]) as pkl:
        return _WeightsUnpickler(pkl, zf, prefix, byteorder, str(path)).load()
  except CheckpointFormatError:
    raise
  except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, OSError, ValueError) as e:
    first = (str(e).strip().splitlines() or [""])[0]
    raise CheckpointFormatError(
      f"{path}: damaged or truncated PyTorch checkpoint ({type(e).__name__}: {first})."
    ) from None


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
