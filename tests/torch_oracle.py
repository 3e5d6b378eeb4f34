"""Imports torch + torchvision as test oracles (never used by the library).

The torchvision 0.28.0 wheel is a CUDA build; on CPU torch ``import torchvision``
fails with ``operator torchvision::nms does not exist`` (pytorch/vision#9085).
Fix: load the wheel's ``_C.so`` if it loads, else declare the two operator
schemas that torchvision registers fake kernels for, in a library kept alive for
the process. ``torchvision.models`` then works; ``torchvision.ops`` does not.
"""

from __future__ import annotations

import importlib.util
import pathlib
from types import ModuleType

_NMS_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
_libraries = []  # keeps the schema library alive for the process
_cache: tuple[ModuleType | None, ModuleType | None, str] | None = None


def _register_torchvision_ops(torch: ModuleType) -> None:
  spec = importlib.util.find_spec("torchvision")
  if spec is None or not spec.submodule_search_locations:
    return
  for location in spec.submodule_search_locations:
    for so in sorted(pathlib.Path(location).glob("_C*.so")):
      try:
        torch.ops.load_library(str(so))
        return
      except (OSError, RuntimeError):
        pass
  lib = torch.library.Library("torchvision", "DEF")
  for op in ("nms", "qnms"):
    lib.define(op + _NMS_SCHEMA)
  _libraries.append(lib)


def import_torch() -> tuple[ModuleType | None, ModuleType | None, str]:
  """Returns ``(torch, torchvision, '')``, or ``(None, None, reason)`` when unavailable."""
  global _cache
  if _cache is not None:
    return _cache
  try:
    import torch
  except ImportError as e:
    _cache = (None, None, f"torch is not installed ({e}); pip install torch==2.13.0")
    return _cache
  try:
    _register_torchvision_ops(torch)
    import torchvision
  except Exception as e:
    _cache = (
      None,
      None,
      f"torchvision is unusable ({type(e).__name__}: {e}); pip install torchvision==0.28.0",
    )
    return _cache
  _cache = (torch, torchvision, "")
  return _cache
