"""What a prediction writes: results, OK/NG decisions, pictures, ``predictions.csv``.

Shared by ``skrd4ad_jax.predict`` (the JAX checkpoint) and the JAX-free runner of
exported models (``skrd4ad_jax.export.run``), so both write the same files with
the same numbers. numpy and Pillow only (pictures: ``visualize``; thresholds:
``thresholds.normalize_scores``).

A predictor is any ``ThresholdedPredictor`` with a ``category`` and a
``predict(paths, batch_size)`` that yields one ``ImageResult`` per path: it turns
raw maps and scores into results with ``_result``, and ``write_predictions``
does the rest.

The OK/NG rule (``decision``) and the CSV writer (``PredictionsCsv``) are the
only ones of the project: the training loop writes ``test_predictions.csv``
with them too (``write_test_predictions``), with the same columns in the same
order after two of its own (``defect_type``, ``gt_label``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import copy
import csv
import dataclasses
import math
import os
import time
from typing import Any
import warnings

import numpy as np

from skrd4ad_jax import faults
from skrd4ad_jax.evaluation import thresholds as thresholds_lib
from skrd4ad_jax.evaluation import visualize

CSV_COLUMNS = ("image_path", "pred_score", "pred_score_raw", "pred_label")
# test_predictions.csv: the labelled test set, the ground truth after the path.
TEST_CSV_COLUMNS = ("image_path", "defect_type", "gt_label") + CSV_COLUMNS[1:]
MASK_DIR = "masks"
PROGRESS_SECONDS = 5.0  # At most one progress line per this many seconds.


class PredictError(ValueError):
  """A run, category or input that cannot be predicted on; the message says why."""


@dataclasses.dataclass
class ImageResult:
  """The prediction for one input image.

  For an image that could not be read only ``image_path`` and ``error`` are set.

  Attributes:
    image_path: the input file.
    pred_score: normalised image score in [0, 1], 0.5 = the image threshold
      (NaN without a threshold).
    pred_score_raw: the raw image score of the method (as in the evaluation).
    pred_label: ``'NG'``, ``'OK'``, or ``''`` without an image threshold.
    anomaly_map: [S, S] float32 raw anomaly map at the network input size.
    anomaly_map_normalized: [S, S] float32, 0.5 = the pixel threshold (the raw
      map when there is no pixel threshold).
    pred_mask: [S, S] bool, ``anomaly_map >= pixel_threshold``; None without a
      pixel threshold.
    image: [S, S, 3] uint8, the resized image the network saw.
    error: why the image was skipped; None when it was predicted.
  """

  image_path: str
  pred_score: float = math.nan
  pred_score_raw: float = math.nan
  pred_label: str = ""
  anomaly_map: np.ndarray | None = None
  anomaly_map_normalized: np.ndarray | None = None
  pred_mask: np.ndarray | None = None
  image: np.ndarray | None = None
  error: str | None = None

  @property
  def ok(self) -> bool:
    return self.error is None


def stored_thresholds(meta: dict[str, Any]) -> dict[str, Any]:
  """The checkpoint's thresholds with every numeric field a float (NaN if missing)."""
  thr = dict(meta.get("thresholds") or {})
  for key in thresholds_lib.KEYS:
    value = thr.get(key)
    thr[key] = float("nan") if value is None else float(value)
  return thr


def decision(score: float, image_threshold: float) -> str:
  """``'NG'`` when the raw score reaches the image threshold, else ``'OK'``; ``''`` without one.

  The raw comparison is the decision; the normalised score (0.5 = the
  threshold) only shows it. It is made in float32, the scores' own precision,
  as numpy compares a float32 score array with a threshold and as an exported
  model compares inside its graph: a threshold that rounds to a score in
  float32 makes that score NG everywhere.
  """
  if not math.isfinite(image_threshold):
    return ""
  return "NG" if np.float32(score) >= np.float32(image_threshold) else "OK"


class PredictionsCsv:
  """Writes prediction rows under a header: numbers in full precision, non-finite ones empty."""

  def __init__(self, f, columns: Sequence[str] = CSV_COLUMNS):
    """Args:
    f: a text file opened with ``newline=""``.
    columns: the header, in order (``CSV_COLUMNS`` or ``TEST_CSV_COLUMNS``).
    """
    self.columns = tuple(columns)
    self._writer = csv.writer(f)
    self._writer.writerow(self.columns)

  def write(self, **row: Any) -> None:
    """One row; ``row`` holds every column by name."""
    self._writer.writerow([_csv_cell(row[c]) for c in self.columns])


def _csv_cell(x: Any) -> Any:
  if isinstance(x, (float, np.floating)):
    return "" if not math.isfinite(x) else repr(float(x))
  return x


def write_test_predictions(
  path: str,
  paths: Sequence[str],
  defect_types: Sequence[str],
  gt_labels: Sequence[int],
  scores_raw: Sequence[float],
  scores: Sequence[float],
  image_threshold: float,
) -> None:
  """``test_predictions.csv``: per test image its raw and normalised score and OK/NG.

  Args:
    path: the file to write.
    paths: the test images.
    defect_types: their folders (``good`` or the defect).
    gt_labels: 0 normal, 1 anomalous.
    scores_raw: the method's image scores.
    scores: the normalised scores (0.5 = the image threshold).
    image_threshold: the stored image threshold (NaN: no decision).
  """
  faults.point("test_predictions_csv", path=path)  # [ckpt]
  with open(path, "w", newline="") as f:
    out = PredictionsCsv(f, TEST_CSV_COLUMNS)
    for i, image_path in enumerate(paths):
      out.write(
        image_path=image_path,
        defect_type=defect_types[i],
        gt_label=int(gt_labels[i]),
        pred_score=float(scores[i]),
        pred_score_raw=float(scores_raw[i]),
        pred_label=decision(float(scores_raw[i]), image_threshold),
      )


class ThresholdedPredictor:
  """Decisions, pictures and masks from raw maps and scores, given thresholds.

  Subclasses set ``meta`` (a dict whose ``thresholds`` item holds the stored
  thresholds), ``category``, call ``_set_thresholds`` once, and implement
  ``predict(paths, batch_size) -> Iterator[ImageResult]``.
  """

  category: str = ""
  meta: dict[str, Any]

  def predict(self, paths: Sequence[str], batch_size: int | None = None) -> Iterator[ImageResult]:
    raise NotImplementedError

  def _set_thresholds(self, thresholds: dict[str, Any] | None, where: str) -> None:
    self.thresholds = stored_thresholds({"thresholds": thresholds})
    self.warnings = []
    if not thresholds:
      self.warnings.append(
        f"The {where} holds no thresholds (training did not finish?): pred_score and "
        "pred_label are left empty, pictures show raw scores, no mask is drawn."
      )
    else:
      if not self.has_image_threshold:
        self.warnings.append(
          f"The {where} holds no image threshold (NaN): pred_score and pred_label are left empty."
        )
      if not self.has_pixel_threshold:
        self.warnings.append(
          f"The {where} holds no pixel threshold (NaN): no defect contour or mask."
        )
    for message in self.warnings:
      warnings.warn(message, RuntimeWarning, stacklevel=3)

  def with_thresholds(self, thresholds: dict[str, Any]) -> ThresholdedPredictor:
    """The same restored model with other thresholds (another operating point).

    Args:
      thresholds: the keys of the checkpoint's ``thresholds`` (missing ones
        are taken from the checkpoint); NaN disables the image or pixel
        decision.

    Returns:
      A shallow copy: the same model (and compiled step), other thresholds.
    """
    other = copy.copy(self)
    merged = {**(self.meta.get("thresholds") or {}), **thresholds}
    other._set_thresholds(merged, "with_thresholds call")
    return other

  @property
  def has_image_threshold(self) -> bool:
    return math.isfinite(self.thresholds["image_threshold"])

  @property
  def has_pixel_threshold(self) -> bool:
    return math.isfinite(self.thresholds["pixel_threshold"])

  def describe_thresholds(self) -> str:
    thr = self.thresholds
    return (
      f"image threshold {thr['image_threshold']:.6g}, pixel threshold "
      f"{thr['pixel_threshold']:.6g} (rule {thr.get('rule', '?')}, chosen on "
      f"{thr.get('source', '?')})"
    )

  def _result(self, path: str, image: np.ndarray, amap: np.ndarray, score: float) -> ImageResult:
    thr = self.thresholds
    result = ImageResult(
      image_path=path,
      pred_score_raw=float(score),
      anomaly_map=amap,
      image=image,
      anomaly_map_normalized=amap,
    )
    if self.has_image_threshold:
      # float32 as in evaluate.normalized, so test_predictions.csv matches too.
      result.pred_score = float(
        np.float32(
          thresholds_lib.normalize_scores(
            score, thr["image_threshold"], thr["image_min"], thr["image_max"]
          )
        )
      )
      result.pred_label = decision(float(score), thr["image_threshold"])
    if self.has_pixel_threshold:
      result.anomaly_map_normalized = np.asarray(
        thresholds_lib.normalize_scores(
          amap, thr["pixel_threshold"], thr["pixel_min"], thr["pixel_max"]
        ),
        np.float32,
      )
      result.pred_mask = amap >= thr["pixel_threshold"]
    return result

  def picture(self, result: ImageResult) -> np.ndarray:
    """The overlay picture of a result (normalised scale: 0.5 = threshold)."""
    title = os.path.basename(result.image_path)
    label = result.pred_label or None
    if self.has_pixel_threshold:
      vmin, vmax = 0.0, 1.0
    else:  # Raw map: the run's range keeps the colours comparable between images.
      vmin = self.thresholds["pixel_min"] if math.isfinite(self.thresholds["pixel_min"]) else None
      vmax = self.thresholds["pixel_max"] if math.isfinite(self.thresholds["pixel_max"]) else None
    if self.has_image_threshold:
      score, threshold = result.pred_score, 0.5
    else:
      score, threshold = result.pred_score_raw, None
    return visualize.overlay_picture(
      result.image,
      result.anomaly_map_normalized,
      None,
      result.pred_mask,
      score=score,
      label=label,
      threshold=threshold,
      vmin=vmin,
      vmax=vmax,
      title=title,
    )

  def mask_image(self, result: ImageResult) -> np.ndarray | None:
    """uint8 {0, 255} defect mask at the original image size; None without threshold.

    The raw map is resized (bilinear) to the original size and compared with
    the pixel threshold, so the mask lies on the user's own image.
    """
    if not self.has_pixel_threshold or result.anomaly_map is None:
      return None
    from PIL import Image

    with Image.open(result.image_path) as im:
      size = im.size
    amap = Image.fromarray(np.asarray(result.anomaly_map, np.float32))  # mode F
    if amap.size != size:
      amap = amap.resize(size, Image.Resampling.BILINEAR)
    mask = np.asarray(amap) >= self.thresholds["pixel_threshold"]
    return mask.astype(np.uint8) * 255


def output_names(paths: Sequence[str]) -> list[str]:
  """Unique picture names (no extension).

  The stems when they are unique; otherwise ``<folder>_<stem>`` for every image
  (MVTec test folders all hold ``000.png``), and ``_1``, ``_2``... on a clash
  that remains.
  """
  names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  if len(set(names)) < len(names):
    names = [
      f"{os.path.basename(os.path.dirname(os.path.abspath(p)))}_{s}" for p, s in zip(paths, names)
    ]
  used: set[str] = set()
  for i, name in enumerate(names):
    unique, k = name, 1
    while unique in used:
      unique, k = f"{name}_{k}", k + 1
    used.add(unique)
    names[i] = unique
  return names


def write_predictions(
  predictor: ThresholdedPredictor,
  paths: Sequence[str],
  output: str,
  batch_size: int | None = None,
  save_masks: bool = False,
  log=print,
) -> dict[str, Any]:
  """Predicts ``paths`` and writes pictures, ``predictions.csv`` and masks.

  Args:
    predictor: a restored checkpoint (``predict.Predictor``) or an exported model
      (``export.run.ExportedPredictor``).
    paths: image files.
    output: output directory (created).
    batch_size: inference batch size (None = the predictor's default).
    save_masks: also write ``masks/<name>.png``.
    log: where progress and skip reports go (a print-like function).

  Returns:
    dict(predicted=int, skipped=list of (path, message), ng=int, csv=path).
  """
  names = output_names(paths)
  inputs = {os.path.abspath(p) for p in paths}
  for name in names:
    target = os.path.abspath(os.path.join(output, f"{name}.png"))
    if target in inputs:
      raise PredictError(
        f"Writing the picture {target} would overwrite an input image; "
        "choose another --output directory."
      )
  os.makedirs(output, exist_ok=True)
  if save_masks and not predictor.has_pixel_threshold:
    log("warning: no pixel threshold in the checkpoint: no mask is written.")
    save_masks = False
  csv_path = os.path.join(output, "predictions.csv")
  summary = {"predicted": 0, "skipped": [], "ng": 0, "csv": csv_path}
  t0 = last = time.time()
  faults.point("predictions_csv", path=csv_path)
  with open(csv_path, "w", newline="") as f:
    writer = PredictionsCsv(f)
    # One result per path, in order: the names line up.
    results = zip(names, predictor.predict(paths, batch_size))
    for done, (name, result) in enumerate(results, start=1):
      if not result.ok:
        summary["skipped"].append((result.image_path, result.error))
        log(f"warning: skipped {result.image_path}: {result.error}")
      else:
        visualize.save_picture(os.path.join(output, f"{name}.png"), predictor.picture(result))
        if save_masks:
          visualize.save_picture(
            os.path.join(output, MASK_DIR, f"{name}.png"), predictor.mask_image(result)
          )
        writer.write(
          image_path=result.image_path,
          pred_score=result.pred_score,
          pred_score_raw=result.pred_score_raw,
          pred_label=result.pred_label,
        )
        summary["predicted"] += 1
        summary["ng"] += result.pred_label == "NG"
      now = time.time()
      if now - last >= PROGRESS_SECONDS or done == len(paths):
        f.flush()
        last = now
        log(
          f"[{predictor.category}] {done}/{len(paths)} images "
          f"({done / max(now - t0, 1e-9):.1f} images/s, {len(summary['skipped'])} skipped)"
        )
  return summary
