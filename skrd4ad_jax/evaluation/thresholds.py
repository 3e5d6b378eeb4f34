"""Decision thresholds and score normalisation (host side, numpy only).

A trained model is deployed with two thresholds (image OK/NG and pixel defect
mask) and the min/max statistics that map raw scores to [0, 1] with the
threshold at 0.5. All of them are chosen on a validation set:

* F1-optimal when the validation set holds anomalies (anomalib's rule);
* a high quantile of the normal scores when it holds none. anomalib's F1 rule
  degenerates there: with no positive the best "F1" sits at the minimum score
  and every image is flagged.

Everything returned by `choose_thresholds` is a python float or str, so the dict
goes straight into the JSON item of a checkpoint.

This module is also the low level shared by `metrics`: mask binarisation, the
finite-value check and `ThresholdSweep`, the counts of positives and negatives
at or above every candidate threshold from which F1, AUROC, AP and the pooled
AUPRO are all integrals.
"""

import dataclasses
import warnings

import numpy as np

# Flag when score >= threshold (anomalib's convention), everywhere.
RULE_F1 = "f1_optimal"
RULE_QUANTILE = "normal_quantile"
# The numbers of a threshold choice (``choose_thresholds``'s dict, besides its
# rule and source): what a checkpoint stores and an exported model takes as inputs.
KEYS = ("image_threshold", "pixel_threshold", "image_min", "image_max", "pixel_min", "pixel_max")


def binarize_masks(masks):
  """Returns ground-truth masks as bool.

  Args:
    masks: bool, integer ({0, 1} or {0, 255}) or float ({0, 1}, possibly
      resized) array.

  Returns:
    A bool array of the same shape: `> 0.5` for floats, `!= 0` otherwise.
  """
  masks = np.asarray(masks)
  if masks.dtype == bool:
    return masks
  if np.issubdtype(masks.dtype, np.floating):
    # Bilinearly resized masks hold fractions; the reference binarises at 0.5.
    return masks > 0.5
  return masks != 0


def as_scores(x, name):
  """Returns `x` as a float array, raising if it holds NaN or inf.

  Args:
    x: scores; the first axis indexes images.
    name: what `x` is, used in the error message.

  Returns:
    A float array (float32 stays float32; integers become float64).

  Raises:
    ValueError: naming the number of non-finite values and the first images
      that hold them.
  """
  x = np.asarray(x)
  if not np.issubdtype(x.dtype, np.floating) or x.dtype.itemsize < 4:
    x = x.astype(np.float64 if x.dtype.itemsize > 2 else np.float32)
  finite = np.isfinite(x)
  if not finite.all():
    bad = ~finite
    per_image = bad.reshape(bad.shape[0], -1).any(axis=1) if x.ndim else bad
    images = np.flatnonzero(per_image).tolist()
    shown = ", ".join(str(i) for i in images[:10])
    more = f" (and {len(images) - 10} more)" if len(images) > 10 else ""
    raise ValueError(
      f"{name} holds {int(bad.sum())} NaN/inf value(s), in image index(es) {shown}{more}."
    )
  return x


def _warn(message):
  warnings.warn(message, RuntimeWarning, stacklevel=3)


@dataclasses.dataclass(frozen=True)
class ThresholdSweep:
  """Counts at every candidate threshold `t` (flag when score >= t).

  Only distinct positive scores are candidates: between two of them the true
  positives are constant and the false positives only grow as `t` falls, so
  every precision/F1/ROC/PRO breakpoint that matters is one of them.

  Attributes:
    values: [A] distinct positive scores, ascending.
    pos_at: [A] number of positives equal to each value.
    weight_at: [A] summed positive weights at each value (equal to `pos_at`
      unless weights were given, e.g. per-region PRO weights).
    pos_ge: [A] positives >= value.
    neg_ge: [A] negatives >= value.
    neg_gt: [A] negatives > value.
    num_pos: number of positives.
    num_neg: number of negatives.
  """

  values: np.ndarray
  pos_at: np.ndarray
  weight_at: np.ndarray
  pos_ge: np.ndarray
  neg_ge: np.ndarray
  neg_gt: np.ndarray
  num_pos: int
  num_neg: int

  @classmethod
  def from_scores(cls, pos_scores, neg_scores, pos_weights=None):
    """Builds the sweep with one sort of each class.

    Args:
      pos_scores: 1-D scores of the positives (anomalous images or pixels).
      neg_scores: 1-D scores of the negatives.
      pos_weights: optional 1-D weights aligned with `pos_scores`.

    Returns:
      A `ThresholdSweep`.
    """
    # np.sort is SIMD-accelerated and ~10x faster than argsort, so the large
    # class (normal pixels) is only sorted, never arg-sorted.
    neg = np.sort(np.ravel(neg_scores))
    pos_scores = np.ravel(pos_scores)
    weights = (
      np.ones(pos_scores.size) if pos_weights is None else np.ravel(pos_weights).astype(np.float64)
    )
    # Ties are summed per value below, so an unstable (SIMD) sort is fine.
    order = np.argsort(pos_scores)
    pos, weights = pos_scores[order], weights[order]
    new_value = np.ones(pos.size, dtype=bool)
    new_value[1:] = pos[1:] != pos[:-1]
    starts = np.flatnonzero(new_value)
    values = pos[starts]
    pos_at = np.diff(np.append(starts, pos.size))
    # reduceat cannot take an empty index list.
    weight_at = np.add.reduceat(weights, starts) if pos.size else np.zeros(0)
    neg_lt = np.searchsorted(neg, values, side="left")
    neg_le = neg_lt.copy()
    if neg.size:
      # Cross-class ties are rare in float maps: search again only for them.
      tied = neg[np.minimum(neg_lt, neg.size - 1)] == values
      neg_le[tied] = np.searchsorted(neg, values[tied], side="right")
    return cls(
      values=values,
      pos_at=pos_at,
      weight_at=weight_at,
      pos_ge=pos.size - starts,
      neg_ge=neg.size - neg_lt,
      neg_gt=neg.size - neg_le,
      num_pos=int(pos.size),
      num_neg=int(neg.size),
    )

  def f1_max(self, what="F1"):
    """Returns (best F1, its threshold); (nan, nan) without positives.

    Args:
      what: name used in the warning.

    Returns:
      (f1, threshold) as python floats. Among equal F1 values the highest
      threshold wins (fewest flags).
    """
    if self.num_pos == 0:
      _warn(f"{what}: no anomalous sample, F1 is undefined; returning NaN.")
      return float("nan"), float("nan")
    tp = self.pos_ge.astype(np.float64)
    f1 = 2.0 * tp / (tp + self.neg_ge + self.num_pos)
    best = f1.size - 1 - int(np.argmax(f1[::-1]))
    return float(f1[best]), float(self.values[best])


def _split(labels, scores, what):
  labels = binarize_masks(labels).ravel()
  scores = as_scores(scores, what).ravel()
  if labels.shape != scores.shape:
    raise ValueError(
      f"{what}: labels shape {labels.shape} does not match scores shape {scores.shape}."
    )
  return scores[labels], scores[~labels]


def f1_max(labels, scores):
  """Best F1 over thresholds and the threshold reaching it.

  Args:
    labels: [N] ground truth (1/True = anomalous).
    scores: [N] scores, higher = more anomalous.

  Returns:
    (f1, threshold): python floats; flag when score >= threshold. NaN (with a
    warning) when there is no anomalous sample.
  """
  pos, neg = _split(labels, scores, "f1_max")
  return ThresholdSweep.from_scores(pos, neg).f1_max()


def f1_optimal_threshold(labels, scores):
  """Returns the score threshold maximising F1 (flag when score >= it).

  Args:
    labels: [N] ground truth (1/True = anomalous).
    scores: [N] scores.

  Returns:
    The threshold as a python float (NaN with a warning without anomalies).
  """
  return f1_max(labels, scores)[1]


def normal_only_threshold(scores, quantile=0.99):
  """Threshold from normal scores alone: their `quantile` (linear).

  Rule: t = numpy's linear-interpolation quantile of the normal scores, so about
  a fraction (1 - quantile) of normal validation samples score >= t. If t would
  flag every sample (constant scores, a single sample) it is moved just above
  the maximum, so that no validation sample is flagged; the rule never
  degenerates into anomalib's "flag everything".

  Args:
    scores: scores of normal samples (any shape).
    quantile: in (0, 1].

  Returns:
    The threshold as a python float.
  """
  if not 0.0 < quantile <= 1.0:
    raise ValueError(f"quantile must be in (0, 1], got {quantile}.")
  scores = as_scores(scores, "normal scores").ravel()
  if scores.size == 0:
    raise ValueError("normal_only_threshold needs at least one score.")
  threshold = np.quantile(scores.astype(np.float64), quantile)
  if threshold <= scores.min():
    # The next value above the largest score in the scores' own precision: float32
    # scores compared with a threshold just above in float64 would round it back down.
    top = scores.max()
    threshold = np.nextafter(top, np.asarray(np.inf, top.dtype))
  return float(threshold)


def choose_thresholds(val_labels, val_image_scores, val_masks, val_maps, normal_quantile=0.99):
  """Chooses image and pixel thresholds and normalisation statistics.

  Image threshold: F1-optimal if the validation labels hold an anomaly, else
  `normal_only_threshold(scores, normal_quantile)`. Pixel threshold: F1-optimal
  over pixels if `val_masks` hold a defect pixel; else the quantile of the
  pixels of normal images (all images if none is labelled normal).

  Args:
    val_labels: [N] validation image labels.
    val_image_scores: [N] validation image scores.
    val_masks: [N, H, W] ground-truth masks, or None.
    val_maps: [N, H, W] anomaly maps, or None (pixel entries then NaN).
    normal_quantile: quantile of the normal-only rule.

  Returns:
    dict(image_threshold, pixel_threshold, rule, image_min, image_max,
    pixel_min, pixel_max): python floats and a str naming the rule(s).
  """
  labels = binarize_masks(val_labels).ravel()
  scores = as_scores(val_image_scores, "val_image_scores").ravel()
  if labels.shape != scores.shape:
    raise ValueError(
      f"val_labels shape {labels.shape} does not match val_image_scores shape {scores.shape}."
    )
  quantile_rule = f"{RULE_QUANTILE}_{normal_quantile:g}"
  if labels.any():
    image_threshold = f1_optimal_threshold(labels, scores)
    image_rule = RULE_F1
  else:
    image_threshold = normal_only_threshold(scores, normal_quantile)
    image_rule = quantile_rule

  nan = float("nan")
  pixel_threshold, pixel_min, pixel_max, pixel_rule = nan, nan, nan, None
  if val_maps is not None:
    maps = as_scores(val_maps, "val_maps")
    if maps.shape[0] != labels.size:
      raise ValueError(
        f"val_maps shape {maps.shape} does not match val_labels shape {labels.shape}."
      )
    pixel_min, pixel_max = float(maps.min()), float(maps.max())
    masks = None if val_masks is None else binarize_masks(val_masks)
    if masks is not None and masks.shape != maps.shape:
      raise ValueError(f"val_masks shape {masks.shape} does not match val_maps shape {maps.shape}.")
    if masks is not None and masks.any():
      pos, neg = maps[masks], maps[~masks]
      pixel_threshold = ThresholdSweep.from_scores(pos, neg).f1_max()[1]
      pixel_rule = RULE_F1
    else:
      normal = maps[~labels]
      if not normal.size:
        _warn(
          "choose_thresholds: no normal validation image; the pixel "
          "quantile is taken over all validation maps."
        )
        normal = maps
      pixel_threshold = normal_only_threshold(normal, normal_quantile)
      pixel_rule = quantile_rule

  rule = (
    image_rule if pixel_rule in (None, image_rule) else (f"image={image_rule},pixel={pixel_rule}")
  )
  return dict(
    image_threshold=float(image_threshold),
    pixel_threshold=float(pixel_threshold),
    rule=rule,
    image_min=float(scores.min()),
    image_max=float(scores.max()),
    pixel_min=pixel_min,
    pixel_max=pixel_max,
  )


def normalize_scores(x, threshold, min_value, max_value):
  """Maps scores to [0, 1] with `threshold` at exactly 0.5.

  Piecewise linear: [min_value, threshold] -> [0, 0.5] and
  [threshold, max_value] -> [0.5, 1], then clipped to [0, 1]. A side of zero
  (or negative) width maps to its end: below a threshold <= min_value gives 0,
  above a threshold >= max_value gives 1. So `normalized >= 0.5` is the same
  decision as `x >= threshold`.

  Args:
    x: scores or maps (array or scalar).
    threshold: decision threshold on the raw scale.
    min_value: raw value mapped to 0.
    max_value: raw value mapped to 1.

  Returns:
    Normalised scores (float64 array; a python float for scalar input).
  """
  scalar = np.ndim(x) == 0
  x = np.asarray(x, dtype=np.float64)
  threshold, min_value, max_value = (float(threshold), float(min_value), float(max_value))
  low_width = threshold - min_value
  high_width = max_value - threshold
  # np.where evaluates both branches; the guarded widths keep it warning-free.
  low = 0.5 * (x - min_value) / low_width if low_width > 0 else np.zeros_like(x)
  high = 0.5 + 0.5 * (x - threshold) / high_width if high_width > 0 else np.ones_like(x)
  out = np.where(x < threshold, low, np.where(x == threshold, 0.5, high))
  out = np.clip(np.where(np.isnan(x), np.nan, out), 0.0, 1.0)
  return float(out) if scalar else out
