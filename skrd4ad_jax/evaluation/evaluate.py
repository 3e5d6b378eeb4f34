"""Evaluation of one category: predictions on a split, metrics, thresholds, pictures.

Inference is a jitted batched step; everything after it (AUROC, AUPRO, F1,
thresholds, pictures) runs on the host in numpy, once per evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
import dataclasses
import os
from typing import Any

import numpy as np

from skrd4ad_jax.evaluation import metrics as metrics_lib
from skrd4ad_jax.evaluation import thresholds as thresholds_lib
from skrd4ad_jax.evaluation import visualize


@dataclasses.dataclass
class Predictions:
  """Host-side results of one split, valid (non-padded) images only."""

  maps: np.ndarray  # [N, H, W] float32 raw anomaly maps
  scores: np.ndarray  # [N] float32 raw image scores
  labels: np.ndarray  # [N] int32 (0 normal, 1 anomalous)
  masks: np.ndarray | None  # [N, H, W] uint8 {0, 1}; None without pixel labels
  paths: list[str]
  defect_types: list[str]
  images: np.ndarray | None = None  # [N, H, W, 3] uint8, for pictures

  def __len__(self):
    return len(self.scores)


def predict(
  eval_fn: Callable[[np.ndarray], tuple[Any, Any]],
  batches: Iterable[dict[str, np.ndarray]],
  has_masks: bool,
  keep_images: bool = False,
) -> Predictions:
  """Runs ``eval_fn(images) -> (maps, scores)`` over padded eval batches.

  Args:
    eval_fn: the category's jitted eval step with state and teacher bound.
    batches: ``CategoryData.eval_batches`` dicts (``image``, ``gt_mask``,
      ``gt_label``, ``image_path``, ``defect_type``, ``valid``).
    has_masks: whether the split has pixel ground truth.
    keep_images: also keep the de-normalised images (for pictures).
  """
  out = {k: [] for k in ("maps", "scores", "labels", "masks", "paths", "defects", "images")}
  for batch in batches:
    maps, scores = eval_fn(batch["image"])
    valid = np.asarray(batch["valid"], bool)
    out["maps"].append(np.asarray(maps, np.float32)[valid])
    out["scores"].append(np.asarray(scores, np.float32)[valid])
    out["labels"].append(np.asarray(batch["gt_label"], np.int32)[valid])
    out["masks"].append((np.asarray(batch["gt_mask"])[valid] > 0.5).astype(np.uint8))
    out["paths"].extend(str(p) for p in np.asarray(batch["image_path"], object)[valid])
    out["defects"].extend(str(d) for d in np.asarray(batch["defect_type"], object)[valid])
    if keep_images:
      out["images"].extend(visualize.denormalize(im) for im in np.asarray(batch["image"])[valid])
  if not out["scores"]:
    raise ValueError("The evaluation split is empty: no image to evaluate.")
  cat = lambda k: np.concatenate(out[k], axis=0)
  return Predictions(
    maps=cat("maps"),
    scores=cat("scores"),
    labels=cat("labels"),
    masks=cat("masks") if has_masks else None,
    paths=out["paths"],
    defect_types=out["defects"],
    images=np.stack(out["images"]) if keep_images else None,
  )


# Evaluation conventions: ours, or the official RD4AD / SK-RD4AD ``test.py:evaluation``.
PROTOCOLS = ("project", "official")
OFFICIAL_ROUNDED = ("image_auroc", "pixel_auroc", "pixel_aupro_rd4ad")


def compute_metrics(
  pred: Predictions, fpr_limit: float = 0.3, protocol: str = "project"
) -> dict[str, float]:
  """The anomalib-named metrics (pixel metrics NaN without masks).

  Args:
    pred: the split's predictions.
    fpr_limit: FPR bound of both AUPRO protocols.
    protocol: 'project' (image labels from the folders, full precision) or
      'official', the conventions of the official ``test.py:evaluation``:
      an image's label is the maximum of its binarised mask (a defect that
      vanished when the mask was resized makes the image normal), and image
      AUROC, pixel AUROC and the per-image AUPRO are rounded to 3 decimals.
  """
  if protocol not in PROTOCOLS:
    raise ValueError(f"Unknown config.eval.protocol {protocol!r}; choose one of {PROTOCOLS}.")
  labels = pred.labels
  if protocol == "official" and pred.masks is not None:
    labels = pred.masks.reshape(len(pred), -1).max(axis=1).astype(np.int32)
  m = metrics_lib.compute_metrics(
    labels,
    pred.scores,
    pred.masks,
    pred.maps if pred.masks is not None else None,
    fpr_limit=fpr_limit,
  )
  if protocol == "official":
    for key in OFFICIAL_ROUNDED:
      if np.isfinite(m[key]):
        m[key] = round(float(m[key]), 3)
  return m


def protocol_note(protocol: str) -> str:
  """One line for the results table saying which evaluation conventions were used."""
  if protocol == "official":
    return (
      "Evaluation conventions of the official test.py (config.eval.protocol='official'): "
      "image labels = max of the binarised mask; image AUROC, pixel AUROC and the "
      "per-image AUPRO rounded to 3 decimals."
    )
  return (
    "Evaluation conventions: this project's (image labels from the folders, full precision; "
    "config.eval.protocol='official' gives the official test.py's)."
  )


def choose_thresholds(pred: Predictions, normal_quantile: float) -> dict[str, Any]:
  """Image/pixel thresholds and normalisation from a validation (or test) split."""
  return thresholds_lib.choose_thresholds(
    pred.labels, pred.scores, pred.masks, pred.maps, normal_quantile=normal_quantile
  )


def normalized(pred: Predictions, thr: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
  """(normalised scores [N], normalised maps [N, H, W]); 0.5 = the threshold."""
  scores = thresholds_lib.normalize_scores(
    pred.scores, thr["image_threshold"], thr["image_min"], thr["image_max"]
  )
  maps = thresholds_lib.normalize_scores(
    pred.maps, thr["pixel_threshold"], thr["pixel_min"], thr["pixel_max"]
  )
  return np.asarray(scores, np.float32), np.asarray(maps, np.float32)


def threshold_metrics(pred: Predictions, thr: dict[str, Any]) -> dict[str, float]:
  """Image F1 / precision / recall at the stored image threshold."""
  predicted = pred.scores >= thr["image_threshold"]
  actual = pred.labels > 0
  tp = float(np.sum(predicted & actual))
  fp = float(np.sum(predicted & ~actual))
  fn = float(np.sum(~predicted & actual))
  precision = tp / (tp + fp) if tp + fp else float("nan")
  recall = tp / (tp + fn) if tp + fn else float("nan")
  f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
  return {"image_f1_at_threshold": f1, "image_precision": precision, "image_recall": recall}


def picture(
  pred: Predictions, i: int, thr: dict[str, Any], norm_scores: np.ndarray, norm_maps: np.ndarray
) -> np.ndarray:
  """The overlay picture of image ``i`` on the normalised scale (0.5 = threshold)."""
  pred_mask = norm_maps[i] >= 0.5 if np.isfinite(thr["pixel_threshold"]) else None
  label = None
  if np.isfinite(thr["image_threshold"]):
    label = "NG" if norm_scores[i] >= 0.5 else "OK"
  return visualize.overlay_picture(
    pred.images[i],
    norm_maps[i],
    None if pred.masks is None else pred.masks[i],
    pred_mask,
    score=float(norm_scores[i]),
    label=label,
    threshold=0.5,
    vmin=0.0,
    vmax=1.0,
    title=f"{pred.defect_types[i]}/{os.path.basename(pred.paths[i])}",
  )


def save_pictures(pred: Predictions, thr: dict[str, Any], out_dir: str) -> int:
  """Writes ``<out_dir>/<defect>/<stem>.png`` for every image; returns the count."""
  norm_scores, norm_maps = normalized(pred, thr)
  for i in range(len(pred)):
    stem = os.path.splitext(os.path.basename(pred.paths[i]))[0]
    visualize.save_picture(
      os.path.join(out_dir, pred.defect_types[i], f"{stem}.png"),
      picture(pred, i, thr, norm_scores, norm_maps),
    )
  return len(pred)


def picture_grid(pred: Predictions, thr: dict[str, Any], count: int) -> np.ndarray:
  """A grid of up to ``count`` overlays, anomalous images first, for TensorBoard."""
  norm_scores, norm_maps = normalized(pred, thr)
  order = np.argsort(-pred.labels, kind="stable")[:count]
  pics = [picture(pred, int(i), thr, norm_scores, norm_maps) for i in order]
  return visualize.picture_grid(pics, max_columns=4)
