"""Runs an exported model on images: no JAX, no Flax; numpy, Pillow and one runtime.

  python -m skrd4ad_jax.export.run --model=DIR --input=IMAGES --output=OUT \
      [--save_masks] [--batch_size=N] [--image_threshold=X] [--pixel_threshold=Y]

``DIR`` is the ``--output`` of ``python -m skrd4ad_jax.export``. An ONNX model
needs ``onnxruntime``, a SavedModel ``tensorflow``; nothing else is imported
beyond numpy and Pillow. The outputs are ``predict``'s, in the same format and
with the same numbers (``evaluation/prediction_output.py`` writes both):
``<stem>.png`` pictures, ``predictions.csv`` (``image_path, pred_score,
pred_score_raw, pred_label``) and, with ``--save_masks``, ``masks/<stem>.png``.

Pre-processing stays in Python, exactly as the training pipeline computes it:
``skrd4ad_jax.data.decode`` (Pillow and numpy: ``convert('RGB')`` and Pillow's
bilinear ``resize`` to the training size, bit for bit as the tf.data pipeline,
16-bit images scaled to 8 bits with the pipeline's rounding). The model gets
uint8 RGB and normalises inside.

Thresholds are data: the runner reads them from ``DIR/skrd4ad_export.json``
(edit its ``thresholds`` to move the operating point) or from
``--image_threshold`` / ``--pixel_threshold``; the model is not re-exported.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
import os
import sys
from typing import Any
import warnings

import numpy as np

from skrd4ad_jax.data import decode
from skrd4ad_jax.evaluation import prediction_output
from skrd4ad_jax.evaluation.prediction_output import ImageResult, PredictError
from skrd4ad_jax.export import spec as spec_lib
from skrd4ad_jax.export.spec import ExportError

# ---------------------------------------------------------------------------
# Images.


def load_image(path: str, image_size: int) -> np.ndarray:
  """An image file as the model's input: uint8 RGB [S, S, 3], as the training pipeline's."""
  return decode.decode_image_8bit(path, image_size)


def _failure_message(path: str, error: Exception) -> str:
  from skrd4ad_jax.data import source

  return source.failure_message(path, error)


# ---------------------------------------------------------------------------
# Models.


class ExportedModel:
  """An exported model in its runtime: ``run(images uint8 [B, S, S, 3]) -> outputs``."""

  format = ""

  def __init__(self, model_dir: str, spec: dict[str, Any]):
    self.model_dir = model_dir
    self.spec = spec
    self.threshold_inputs = [k for k in spec.get("inputs", {}) if k in spec_lib.THRESHOLD_INPUTS]
    self.threshold_values = spec_lib.thresholds_float32(spec["thresholds"])

  def set_thresholds(self, thresholds: dict[str, Any]) -> None:
    """Values fed to threshold inputs (rounded so that decisions do not change)."""
    self.threshold_values = spec_lib.thresholds_float32(thresholds)

  def feeds(self) -> dict[str, np.ndarray]:
    return {k: self.threshold_values[k] for k in self.threshold_inputs}

  def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
    raise NotImplementedError


class OnnxModel(ExportedModel):
  """``model.onnx`` in onnxruntime."""

  format = "onnx"

  def __init__(self, model_dir, spec, providers: Sequence[str] | None = None):
    super().__init__(model_dir, spec)
    ort = spec_lib.require("onnxruntime", "Running an ONNX export")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    path = os.path.join(model_dir, spec["model_file"])
    self.session = ort.InferenceSession(
      path, options, providers=list(providers or ["CPUExecutionProvider"])
    )
    self.output_names = [o.name for o in self.session.get_outputs()]

  def run(self, images):
    feeds = {spec_lib.INPUT_NAME: np.ascontiguousarray(images, np.uint8), **self.feeds()}
    return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))


class SavedModelModel(ExportedModel):
  """``saved_model/`` in TensorFlow (its ``serving_default`` signature)."""

  format = "saved_model"

  def __init__(self, model_dir, spec):
    super().__init__(model_dir, spec)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    self.tf = spec_lib.require("tensorflow", "Running a SavedModel export")
    path = os.path.join(model_dir, spec["model_file"])
    self.loaded = self.tf.saved_model.load(path)
    self.signature = self.loaded.signatures[spec.get("signature", "serving_default")]

  def run(self, images):
    tf = self.tf
    feeds = {spec_lib.INPUT_NAME: tf.constant(np.asarray(images, np.uint8))}
    feeds.update({k: tf.constant(v) for k, v in self.feeds().items()})
    return {k: v.numpy() for k, v in self.signature(**feeds).items()}


def load_model(model_dir: str, providers: Sequence[str] | None = None) -> ExportedModel:
  """The exported model of ``model_dir`` in its runtime."""
  spec = spec_lib.read_spec(model_dir)
  model_dir = os.path.abspath(os.path.expanduser(model_dir))
  if spec["format"] == "onnx":
    return OnnxModel(model_dir, spec, providers)
  return SavedModelModel(model_dir, spec)


# ---------------------------------------------------------------------------
# The predictor.


class ExportedPredictor(prediction_output.ThresholdedPredictor):
  """An exported model with ``predict``'s results, pictures and masks.

  Attributes:
    spec: the export's JSON.
    model: the runtime (``OnnxModel`` / ``SavedModelModel``).
    category, image_size, thresholds: as ``predict.Predictor``'s.
  """

  def __init__(
    self,
    model_dir: str,
    thresholds: dict[str, float] | None = None,
    providers: Sequence[str] | None = None,
  ):
    """Loads ``model_dir``; ``thresholds`` override keys of the spec's ``thresholds``."""
    self.model = load_model(model_dir, providers)
    self.spec = self.model.spec
    self.category = self.spec.get("category", "")
    self.image_size = int(self.spec["image_size"])
    stored = {k: v for k, v in self.spec["thresholds"].items()}
    for k in spec_lib.THRESHOLD_INPUTS:  # JSON null = not chosen
      if k in stored and stored[k] is None:
        stored[k] = float("nan")
    self.meta = {"thresholds": {**stored, **(thresholds or {})}}
    where = "export " + os.path.join(self.model.model_dir, spec_lib.SPEC_FILE)
    self._set_thresholds(self.meta["thresholds"], where)
    self.model.set_thresholds(self.thresholds)

  def predict(self, paths: Sequence[str], batch_size: int | None = None) -> Iterator[ImageResult]:
    """Predicts ``paths`` in order, in batches; unreadable files have ``error``."""
    batch_size = int(batch_size or self.spec.get("batch_size") or 8)
    if batch_size < 1:
      raise PredictError(f"batch_size must be >= 1, got {batch_size}.")
    pending: list[tuple[str, np.ndarray | None, str | None]] = []

    def flush():
      valid = [image for _, image, _ in pending if image is not None]
      if valid:
        out = self.model.run(np.stack(valid))
        maps = np.asarray(out["anomaly_map"], np.float32)  # [B, S, S]
        scores = np.asarray(out["pred_score_raw"], np.float32)  # [B]
      j = 0
      for path, image, error in pending:
        if image is None:
          yield ImageResult(image_path=path, error=error)
        else:
          yield self._result(path, image, maps[j], scores[j])
          j += 1
      pending.clear()

    count = 0
    for path in (os.fspath(p) for p in paths):
      try:
        pending.append((path, load_image(path, self.image_size), None))
        count += 1
      except Exception as e:  # Pillow raises many types for broken files.
        pending.append((path, None, _failure_message(path, e)))
      if count == batch_size:
        yield from flush()
        count = 0
    yield from flush()


# ---------------------------------------------------------------------------
# Command line.


def run(
  model_dir: str,
  input_path: str,
  output: str,
  save_masks: bool = False,
  batch_size: int | None = None,
  thresholds: dict[str, float] | None = None,
  log=print,
) -> dict[str, Any]:
  """The command line's work: load, list, predict, write (``predict.run``'s twin)."""
  from skrd4ad_jax.data import folder

  predictor = ExportedPredictor(model_dir, thresholds)
  paths = folder.list_images(input_path)
  spec = predictor.spec
  log(
    f"[{predictor.category}] {spec['format']} export of {spec['method']} (step "
    f"{spec.get('checkpoint_step')}); {predictor.describe_thresholds()}"
  )
  log(f"[{predictor.category}] predicting {len(paths)} image(s) into {output}")
  summary = prediction_output.write_predictions(
    predictor, paths, output, batch_size or None, save_masks, log
  )
  if not summary["predicted"]:
    raise PredictError(f"None of the {len(paths)} image(s) could be read; nothing predicted.")
  log(
    f"[{predictor.category}] {summary['predicted']} predicted ({summary['ng']} NG), "
    f"{len(summary['skipped'])} skipped; results in {summary['csv']}"
  )
  return summary


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m skrd4ad_jax.export.run",
    description="Predict with an exported model (ONNX or SavedModel), without JAX.",
  )
  parser.add_argument("--model", required=True, help="The export directory.")
  parser.add_argument("--input", required=True, help="An image, a folder, or a glob.")
  parser.add_argument("--output", required=True, help="Directory for pictures and CSV.")
  parser.add_argument("--save_masks", action="store_true", help="Also write masks/<stem>.png.")
  parser.add_argument("--batch_size", type=int, default=0, help="0 = the run's eval batch size.")
  parser.add_argument("--image_threshold", type=float, default=None, help="Override (raw scale).")
  parser.add_argument("--pixel_threshold", type=float, default=None, help="Override (raw scale).")
  args = parser.parse_args(argv)
  overrides = {
    k: getattr(args, k)
    for k in ("image_threshold", "pixel_threshold")
    if getattr(args, k) is not None
  }
  # A warning (e.g. no thresholds) reads as one line, not as a source excerpt.
  warnings.showwarning = lambda message, *a, **k: print(f"warning: {message}", file=sys.stderr)
  try:
    run(
      args.model,
      args.input,
      args.output,
      args.save_masks,
      args.batch_size,
      overrides,
      log=lambda s: print(s, flush=True),
    )
  except (ExportError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
