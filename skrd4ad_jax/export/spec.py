"""What an export directory holds and how its JSON reads (numpy only: the runner uses it).

An export directory::

  DIR/model.onnx            (--format=onnx)          or
  DIR/saved_model/          (--format=saved_model)
  DIR/skrd4ad_export.json   this spec: thresholds, normalisation, sizes, names

The model's input is ``image``: uint8 RGB ``[batch, S, S, 3]`` (already resized
to the training size ``S`` with Pillow, see ``run.load_image``). Its outputs are
the raw ``anomaly_map`` ``[batch, S, S]`` and ``pred_score_raw`` ``[batch]``;
with post-processing also ``anomaly_map_normalized``, ``pred_score`` (float32,
0.5 = threshold), ``pred_label`` and ``pred_mask`` (bool, True = NG / defect).
Post-processing reads its thresholds from graph inputs of the same names as the
spec's ``thresholds`` keys (``thresholds_as='inputs'``) or from constants
(``'constants'``).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from skrd4ad_jax.evaluation import thresholds

SPEC_FILE = "skrd4ad_export.json"
ONNX_FILE = "model.onnx"
SAVED_MODEL_DIR = "saved_model"
FORMATS = ("onnx", "saved_model")
THRESHOLDS_AS = ("inputs", "constants")
INPUT_NAME = "image"
RAW_OUTPUTS = ("anomaly_map", "pred_score_raw")
POSTPROCESSING_OUTPUTS = ("anomaly_map_normalized", "pred_score", "pred_label", "pred_mask")
THRESHOLD_INPUTS = thresholds.KEYS  # the model's threshold inputs, in this order
INSTALL_FIX = 'pip install -e ".[export]"'
# What `pip install -e ".[export]"` installs (setup.py's extra), for messages.
PACKAGES = {"onnx": "onnx==1.23.2", "onnxruntime": "onnxruntime==1.31.1"}


class ExportError(ValueError):
  """An export or an exported model that cannot be used; the message says why and the fix."""


def require(module: str, needed_for: str):
  """Imports ``module`` or raises a one-line ``ExportError`` naming the install fix."""
  import importlib

  try:
    return importlib.import_module(module)
  except ImportError as e:
    package = PACKAGES.get(module, module)
    fix = INSTALL_FIX if module in PACKAGES else f"pip install {package}"
    raise ExportError(
      f"{needed_for} needs the Python package {module!r}, which cannot be imported "
      f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}). "
      f"Fix: {fix}."
    ) from None


def threshold_float32(key: str, value: float) -> np.float32:
  """A threshold as the float32 graph input that keeps ``predict``'s decisions.

  ``predict`` and the evaluation compare float32 maps and scores with a
  Python-float threshold, which numpy (NEP 50) rounds to the nearest float32
  first; so does this. ``key`` is unused (kept for the name in messages).
  """
  del key
  return np.float32(float(value))


def thresholds_float32(thresholds: dict[str, Any]) -> dict[str, np.ndarray]:
  """The graph's threshold inputs: 0-d float32 arrays (NaN where not chosen)."""
  out = {}
  for key in THRESHOLD_INPUTS:
    value = thresholds.get(key)
    value = float("nan") if value is None else float(value)
    out[key] = np.asarray(threshold_float32(key, value), np.float32)
  return out


def spec_path(model_dir: str) -> str:
  return os.path.join(model_dir, SPEC_FILE)


def read_spec(model_dir: str) -> dict[str, Any]:
  """The export's JSON, checked; raises ``ExportError`` naming the problem."""
  model_dir = os.path.abspath(os.path.expanduser(model_dir))
  path = spec_path(model_dir)
  if not os.path.isdir(model_dir):
    raise ExportError(
      f"Model directory not found: {model_dir}. Pass the --output of "
      "python -m skrd4ad_jax.export as --model."
    )
  if not os.path.isfile(path):
    raise ExportError(
      f"{model_dir} holds no {SPEC_FILE}: not an export of skrd4ad_jax. Fix: export with "
      "python -m skrd4ad_jax.export --workdir=RUN --category=C --format=onnx --output=DIR."
    )
  try:
    with open(path, encoding="utf-8") as f:
      spec = json.load(f)
  except (OSError, ValueError) as e:
    raise ExportError(f"Could not read {path}: {e}. Fix: export the model again.") from None
  missing = [k for k in ("format", "model_file", "image_size", "thresholds") if k not in spec]
  if missing or spec.get("format") not in FORMATS:
    raise ExportError(
      f"{path} lacks {', '.join(missing) or 'a known format'}: export the model again."
    )
  model = os.path.join(model_dir, spec["model_file"])
  if not os.path.exists(model):
    raise ExportError(f"{path} names the model {model}, which does not exist: export again.")
  return spec


def write_spec(model_dir: str, spec: dict[str, Any]) -> str:
  """Writes the JSON (NaN as null, so that any JSON reader takes it)."""

  def clean(x):
    if isinstance(x, dict):
      return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [clean(v) for v in x]
    if isinstance(x, (float, np.floating)):
      return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
      return int(x)
    return x

  path = spec_path(model_dir)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(clean(spec), f, indent=2, sort_keys=False)
    f.write("\n")
  return path
