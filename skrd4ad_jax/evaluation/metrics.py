"""Host-side anomaly-detection metrics (numpy / scipy), exact and vectorised.

Names follow anomalib: image_auroc, pixel_auroc, pixel_aupro, image_f1max,
pixel_ap. Two AUPRO protocols exist and give different numbers
(reference/rd_family.md §1.8):

* "mvtec" (Bergmann et al., anomalib `pixel_aupro`): regions = 8-connected
  components of the ground truth over all test images; FPR over all normal
  pixels of all images, normal images included; PRO = mean overlap over all
  regions; area under PRO(FPR) up to `fpr_limit`, divided by `fpr_limit`.
  Computed exactly from one sort of the defect scores and of the normal scores
  above the (1 - `fpr_limit`) quantile: every distinct score is a
  threshold, tie groups are straight segments, the curve is interpolated at the
  limit. anomalib resamples its curve in float32 and is expected to agree to
  ~1e-3 (2e-8 on the shipped aupro_cases).
* "rd4ad" (the RD4AD family's `compute_pro`): per anomalous image, thresholds
  `np.arange(min, max, (max - min) / 200)` of that image's map, binary =
  map > threshold, FPR within that image, rows with FPR < `fpr_limit` kept,
  FPR rescaled by the largest kept FPR, trapezoid; mean over anomalous images.

All functions take numpy arrays (masks bool, integer or float {0, 1}; maps
[N, H, W] or [N, H, W, 1]), never crash on degenerate input and warn
(RuntimeWarning) wherever a metric is undefined, returning NaN.

Why one module of this size: the metrics share the exact sorted-threshold
machinery and the degenerate-input rules above.
"""

import dataclasses
import functools
import warnings

import numpy as np
from scipy import ndimage

from skrd4ad_jax.evaluation import thresholds

PROTOCOLS = ("mvtec", "rd4ad")
RD4AD_NUM_THRESHOLDS = 200
# 8-connected within each image, never across the image axis.
_REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_REGION_STRUCTURE[1] = True


def _warn(message):
  warnings.warn(message, RuntimeWarning, stacklevel=3)


def _warn_if_constant(x, what):
  if x.size and x.min() == x.max():
    _warn(
      f"{what} are constant: ranking metrics are those of a random guess "
      f"(AUROC 0.5) and thresholds cannot separate anything."
    )


def _as_images(x):
  """Returns `x` as [N, H, W]; accepts [H, W] and [N, H, W, 1]."""
  x = np.asarray(x)
  if x.ndim == 2:
    return x[None]
  if x.ndim == 4 and x.shape[-1] == 1:
    return x[..., 0]
  if x.ndim != 3:
    raise ValueError(f"expected [N, H, W] or [N, H, W, 1] arrays, got shape {x.shape}.")
  return x


class _PixelSet:
  """Validated masks and maps, with what the pixel metrics share built once."""

  def __init__(self, masks, anomaly_maps):
    masks, anomaly_maps = np.asarray(masks), np.asarray(anomaly_maps)
    self.masks = thresholds.binarize_masks(_as_images(masks))  # [N, H, W]
    maps = _as_images(anomaly_maps)  # [N, H, W]
    if self.masks.shape != maps.shape:
      raise ValueError(
        f"masks shape {masks.shape} does not match anomaly_maps shape {anomaly_maps.shape}."
      )
    self.maps = thresholds.as_scores(maps, "anomaly_maps")
    _warn_if_constant(self.maps, "anomaly_maps")

  @functools.cached_property
  def defect_images(self):
    """[M] indices of the images with at least one defect pixel, ascending."""
    return np.flatnonzero(self.masks.reshape(len(self.masks), -1).any(axis=1))

  @functools.cached_property
  def regions(self):
    """[M, H, W] int32 regions of `defect_images`: 0 = normal, else an id."""
    # Normal images hold no region; labelling only the others saves ~40%.
    return ndimage.label(self.masks[self.defect_images], structure=_REGION_STRUCTURE)[0]

  @functools.cached_property
  def pro_weights(self):
    """[P] PRO weight of each defect pixel, in the (C) order of maps[masks]."""
    # Dropping images without defect pixels keeps that order.
    region = self.regions[self.regions > 0]
    sizes = np.bincount(region)
    num_regions = np.count_nonzero(sizes)
    # Each region counts 1 / num_regions in PRO, shared by its pixels.
    return 1.0 / (num_regions * sizes[region].astype(np.float64))

  @functools.cached_property
  def sweep(self):
    """Pixel-level `ThresholdSweep` whose weights are the PRO weights."""
    return thresholds.ThresholdSweep.from_scores(
      self.maps[self.masks], self.maps[~self.masks], self.pro_weights
    )

  def sweep_to_fpr(self, fpr_limit):
    """`sweep` from the top down to the first threshold whose FPR reaches `fpr_limit`.

    What pooled AUPRO reads, with the same numbers: only the normal pixels
    above the (1 - fpr_limit) quantile are sorted (after an O(n) partition),
    which halves AUPRO's time when nothing else needs the full sweep (the
    full sort of millions of normal pixels is most of it). The full `sweep`
    when it is already built or the cut would save little.
    """
    if "sweep" in self.__dict__:
      return self.sweep
    n = self.masks.size - int(np.count_nonzero(self.masks))
    # m normal pixels >= the cut c; every value <= c has FPR >= m / n > limit.
    m = int(np.ceil(fpr_limit * n)) + 1
    if m > n // 2:
      return self.sweep
    neg = self.maps[~self.masks]
    top = np.partition(neg, n - m)[n - m :]
    cut = top[0]
    partial = thresholds.ThresholdSweep.from_scores(self.maps[self.masks], top, self.pro_weights)
    # Above the cut every normal pixel >= a value is in `top`: its counts are
    # the full ones. Of the values <= cut only the highest is kept, counted
    # over all normal pixels: its FPR passes the limit, and nothing below it
    # is read.
    first = int(np.searchsorted(partial.values, cut, side="right")) - 1
    if first < 0:
      return dataclasses.replace(partial, num_neg=n)
    value = partial.values[first]
    neg_ge = partial.neg_ge[first:].copy()
    neg_gt = partial.neg_gt[first:].copy()
    neg_ge[0], neg_gt[0] = np.count_nonzero(neg >= value), np.count_nonzero(neg > value)
    return dataclasses.replace(
      partial,
      values=partial.values[first:],
      pos_at=partial.pos_at[first:],
      weight_at=partial.weight_at[first:],
      pos_ge=partial.pos_ge[first:],
      neg_ge=neg_ge,
      neg_gt=neg_gt,
      num_neg=n,
    )


def _image_sweep(labels, scores):
  labels = thresholds.binarize_masks(labels).ravel()
  scores = thresholds.as_scores(scores, "image scores").ravel()
  if labels.shape != scores.shape:
    raise ValueError(f"labels shape {labels.shape} does not match scores shape {scores.shape}.")
  _warn_if_constant(scores, "image scores")
  return thresholds.ThresholdSweep.from_scores(scores[labels], scores[~labels])


def _auroc(sweep, what):
  """Mann-Whitney AUROC with ties counted one half (= sklearn)."""
  if sweep.num_pos == 0 or sweep.num_neg == 0:
    _warn(
      f"{what}: needs normal and anomalous samples (got {sweep.num_neg} "
      f"and {sweep.num_pos}); returning NaN."
    )
    return float("nan")
  neg_below = sweep.num_neg - sweep.neg_ge
  neg_tied = sweep.neg_ge - sweep.neg_gt
  wins = np.dot(sweep.pos_at.astype(np.float64), neg_below + 0.5 * neg_tied)
  return float(wins / (float(sweep.num_pos) * sweep.num_neg))


def _average_precision(sweep, what):
  """Step-wise AP: sum of recall gain x precision (= sklearn)."""
  if sweep.num_pos == 0:
    _warn(f"{what}: no anomalous sample, AP is undefined; returning NaN.")
    return float("nan")
  precision = sweep.pos_ge / (sweep.pos_ge + sweep.neg_ge).astype(np.float64)
  return float(np.dot(sweep.pos_at, precision) / sweep.num_pos)


def _area_up_to(x, y, limit):
  """Trapezoid area under the polyline (x, y) from x[0] to `limit`.

  Args:
    x: non-decreasing, x[0] < limit <= x[-1] (equal x = vertical step).
    y: curve values.
    limit: upper integration bound, interpolated linearly.

  Returns:
    The area as a float.
  """
  k = int(np.searchsorted(x, limit, side="left"))  # x[k - 1] < limit <= x[k]
  full = np.dot(np.diff(x[:k]), 0.5 * (y[1:k] + y[: k - 1]))
  width = limit - x[k - 1]
  y_limit = y[k - 1] + (y[k] - y[k - 1]) * width / (x[k] - x[k - 1])
  return float(full + width * 0.5 * (y[k - 1] + y_limit))


def _aupro_mvtec(pixels, fpr_limit):
  sweep = pixels.sweep_to_fpr(fpr_limit)
  if sweep.num_pos == 0 or sweep.num_neg == 0:
    _warn(
      f"pixel_aupro (mvtec): needs normal and defect pixels (got "
      f"{sweep.num_neg} and {sweep.num_pos}); returning NaN."
    )
    return float("nan")
  # Walk the distinct defect scores from high to low. The normals tied with a
  # defect value enter together with its PRO weight (a sloped segment); the
  # normals strictly between two defect values raise FPR at constant PRO.
  neg_gt = sweep.neg_gt[::-1].astype(np.float64)
  neg_ge = sweep.neg_ge[::-1].astype(np.float64)
  pro_after = np.cumsum(sweep.weight_at[::-1])
  pro_before = np.concatenate([[0.0], pro_after[:-1]])
  fpr = (
    np.concatenate([[0.0], np.stack([neg_gt, neg_ge], 1).ravel(), [sweep.num_neg]]) / sweep.num_neg
  )
  pro = np.concatenate([[0.0], np.stack([pro_before, pro_after], 1).ravel(), pro_after[-1:]])
  return _area_up_to(fpr, pro, fpr_limit) / fpr_limit


def _count_below(ths, x, start, step):
  """Returns, per value of `x`, the number of thresholds strictly below it.

  Equal to `np.searchsorted(ths, x, side="left")` for the arithmetic sequence
  `ths = np.arange(start, ..., step)`, but a guess from the arithmetic (in
  float64, as arange computes) plus an exact check is several times faster
  than a binary search per pixel.

  Args:
    ths: [T] increasing thresholds.
    x: [P] values.
    start: ths[0].
    step: spacing of `ths`.

  Returns:
    [P] intp; pixel p is above ths[j] (x > th) exactly for j < result[p].
  """
  num_th = ths.size
  # padded[k] = ths[k - 1]; the answer is the k with
  # padded[k] < x <= padded[k + 1] (= following[k]).
  padded = np.concatenate([[-np.inf], ths, [np.inf]])
  following = padded[1:]
  count = np.ceil((x.astype(np.float64) - np.float64(start)) / np.float64(step))
  if not np.isfinite(count).all():
    count = np.nan_to_num(count)
  count = np.clip(count, 0, num_th, out=count).astype(np.intp)
  too_high = padded.take(count) >= x
  too_low = following.take(count) < x
  # Rounding may put a guess off by one; only those pixels are corrected and
  # checked again, until none is off.
  wrong = np.flatnonzero(too_high | too_low)
  move = too_low[wrong].astype(np.intp) - too_high[wrong]
  while wrong.size:
    count[wrong] += move
    guess, value = count[wrong], x[wrong]
    too_high = padded.take(guess) >= value
    too_low = following.take(guess) < value
    still = too_high | too_low
    wrong = wrong[still]
    move = too_low[still].astype(np.intp) - too_high[still]
  return count


def _rd4ad_image_area(amap, regions, fpr_limit):
  """RD4AD `compute_pro` for one anomalous image, without its Python loops.

  Args:
    amap: [H, W] anomaly map.
    regions: [H, W] region ids (0 = normal), at least one non-zero.
    fpr_limit: rows with FPR < fpr_limit are kept.

  Returns:
    (area, issue): the image's area (NaN if the image has no normal pixel) and
    None, or a description of the degenerate case the area stands for (where
    the reference crashes or returns NaN).
  """
  # Native dtype on purpose: the reference thresholds and compares in the
  # map's own dtype (float32 maps give float32 thresholds), and a cast moves
  # pixels across thresholds by ~1e-5 in AUPRO.
  amap = amap.ravel()
  regions = regions.ravel()
  defect = regions != 0
  num_normal = defect.size - int(np.count_nonzero(defect))
  if num_normal == 0:
    return float("nan"), "no normal pixel (FPR undefined): left out of the mean"
  low, high = amap.min(), amap.max()
  if high == low:
    return 0.0, "a constant map (no threshold): area 0"
  # The reference's exact thresholds (200 or 201 of them, float rounding).
  step = (high - low) / RD4AD_NUM_THRESHOLDS
  ths = np.arange(low, high, step)
  num_th = ths.size
  above = _count_below(ths, amap, low, step)
  # Regions in ascending id order (as np.unique gives them), empty ids dropped.
  ids = regions[defect]
  first = ids.min()
  sizes = np.bincount(ids - first)
  present = sizes > 0
  hist = np.bincount(
    (ids - first) * (num_th + 1) + above[defect], minlength=sizes.size * (num_th + 1)
  )
  hist = hist.reshape(sizes.size, num_th + 1)[present]
  # Reverse cumulative sums: column j + 1 counts pixels above ths[j].
  overlap = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1][:, 1:]  # [K, T]
  pro = (overlap / sizes[present][:, None]).mean(axis=0)  # [T]
  # Normal pixels per threshold count: all pixels' minus the defect pixels'.
  fp_hist = np.bincount(above, minlength=num_th + 1) - hist.sum(axis=0)
  fpr = np.cumsum(fp_hist[::-1])[::-1][1:] / num_normal  # [T], non-increasing
  keep = fpr < fpr_limit
  fpr, pro = fpr[keep], pro[keep]
  if fpr.size and fpr.max() == 0:
    # The reference divides 0 by 0 here. No normal pixel is ever flagged, so
    # the image scores the best overlap it reaches at zero FPR.
    return float(pro.max()), "FPR 0 at every kept threshold: area = best PRO"
  if fpr.size < 2:
    return 0.0, f"fewer than 2 thresholds with FPR < {fpr_limit}: area 0"
  fpr = fpr / fpr.max()
  # sklearn.metrics.auc on a non-increasing x: minus the trapezoid.
  return float(np.dot(-np.diff(fpr), 0.5 * (pro[1:] + pro[:-1]))), None


def _aupro_rd4ad(pixels, fpr_limit):
  if pixels.defect_images.size == 0:
    _warn("pixel_aupro_rd4ad: no image has a defect pixel; returning NaN.")
    return float("nan")
  areas, issues = [], {}
  for index, regions in zip(pixels.defect_images, pixels.regions):
    area, issue = _rd4ad_image_area(pixels.maps[index], regions, fpr_limit)
    areas.append(area)
    if issue:
      issues.setdefault(issue, []).append(int(index))
  for issue, indices in issues.items():
    # One warning per kind of problem, not one per image.
    _warn(
      f"pixel_aupro_rd4ad: image index(es) {indices[:10]}"
      f"{'...' if len(indices) > 10 else ''} have {issue}."
    )
  if np.isnan(areas).all():
    _warn("pixel_aupro_rd4ad: no anomalous image has a defined area; returning NaN.")
    return float("nan")
  return float(np.nanmean(areas))


def image_auroc(labels, scores):
  """Image-level AUROC.

  Args:
    labels: [N] image labels (1/True = anomalous).
    scores: [N] image scores.

  Returns:
    AUROC as a float; NaN (with a warning) without both classes.
  """
  return _auroc(_image_sweep(labels, scores), "image_auroc")


def image_ap(labels, scores):
  """Image-level average precision (sklearn's step-wise definition).

  Args:
    labels: [N] image labels.
    scores: [N] image scores.

  Returns:
    AP as a float; NaN (with a warning) without anomalous images.
  """
  return _average_precision(_image_sweep(labels, scores), "image_ap")


def image_f1max(labels, scores):
  """Best image-level F1 and its threshold (flag when score >= threshold).

  Args:
    labels: [N] image labels.
    scores: [N] image scores.

  Returns:
    (f1, threshold) floats; NaNs (with a warning) without anomalous images.
  """
  return _image_sweep(labels, scores).f1_max("image_f1max")


def pixel_auroc(masks, anomaly_maps):
  """Pixel-level AUROC pooled over all pixels of all images.

  Args:
    masks: [N, H, W] ground truth.
    anomaly_maps: [N, H, W] anomaly maps.

  Returns:
    AUROC as a float; NaN (with a warning) without defect or normal pixels.
  """
  return _auroc(_PixelSet(masks, anomaly_maps).sweep, "pixel_auroc")


def pixel_ap(masks, anomaly_maps):
  """Pixel-level average precision pooled over all pixels.

  Args:
    masks: [N, H, W] ground truth.
    anomaly_maps: [N, H, W] anomaly maps.

  Returns:
    AP as a float; NaN (with a warning) without defect pixels.
  """
  return _average_precision(_PixelSet(masks, anomaly_maps).sweep, "pixel_ap")


def pixel_f1max(masks, anomaly_maps):
  """Best pixel-level F1 and its threshold (flag when map >= threshold).

  Args:
    masks: [N, H, W] ground truth.
    anomaly_maps: [N, H, W] anomaly maps.

  Returns:
    (f1, threshold) floats; NaNs (with a warning) without defect pixels.
  """
  return _PixelSet(masks, anomaly_maps).sweep.f1_max("pixel_f1max")


def _check_aupro_args(fpr_limit, protocol):
  if protocol not in PROTOCOLS:
    raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}.")
  if not 0.0 < fpr_limit <= 1.0:
    raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}.")


def aupro(masks, anomaly_maps, fpr_limit=0.3, protocol="mvtec"):
  """Area under the per-region-overlap curve up to `fpr_limit`, normalised.

  Args:
    masks: [N, H, W] ground truth of all test images (normal ones included).
    anomaly_maps: [N, H, W] anomaly maps.
    fpr_limit: FPR bound of the integration.
    protocol: "mvtec" (pooled, Bergmann et al. / anomalib) or "rd4ad"
      (per-image mean of the RD4AD family); see the module docstring.

  Returns:
    AUPRO in [0, 1] as a float; NaN (with a warning) when undefined: no
    defect pixel, or (mvtec) no normal pixel. Where the RD4AD reference
    crashes or returns NaN for one image, "rd4ad" warns once per kind and
    uses: no normal pixel -> image left out of the mean; constant map, or
    fewer than 2 thresholds with FPR < fpr_limit -> area 0; FPR 0 at every
    kept threshold (the reference divides 0 by 0) -> the best PRO reached.
  """
  _check_aupro_args(fpr_limit, protocol)
  pixels = _PixelSet(masks, anomaly_maps)
  if protocol == "mvtec":
    return _aupro_mvtec(pixels, fpr_limit)
  return _aupro_rd4ad(pixels, fpr_limit)


def compute_metrics(labels, image_scores, masks, anomaly_maps, fpr_limit=0.3):
  """All image and pixel metrics of one evaluation, under anomalib's names.

  Pixel data are validated, labelled and sorted once for all pixel metrics.

  Args:
    labels: [N] image labels (1 = anomalous).
    image_scores: [N] image scores.
    masks: [N, H, W] ground truth, or None for image-level data sets (pixel
      metrics are then NaN).
    anomaly_maps: [N, H, W] anomaly maps (may be None when masks is None).
    fpr_limit: FPR bound of both AUPRO protocols.

  Returns:
    dict of python floats: image_auroc, pixel_auroc, pixel_aupro (mvtec),
    pixel_aupro_rd4ad, image_f1max, image_f1max_threshold, pixel_ap, image_ap,
    pixel_f1max, pixel_f1max_threshold.
  """
  _check_aupro_args(fpr_limit, "mvtec")
  image = _image_sweep(labels, image_scores)
  image_f1, image_threshold = image.f1_max("image_f1max")
  nan = float("nan")
  pixel = dict(auroc=nan, aupro=nan, aupro_rd4ad=nan, ap=nan, f1=nan, threshold=nan)
  if masks is not None:
    if anomaly_maps is None:
      raise ValueError("masks are given but anomaly_maps is None.")
    pixels = _PixelSet(masks, anomaly_maps)
    num_images = image.num_pos + image.num_neg
    if len(pixels.masks) != num_images:
      raise ValueError(f"{num_images} labels but masks of shape {np.shape(masks)}.")
    has_defect = np.zeros(num_images, dtype=bool)
    has_defect[pixels.defect_images] = True
    disagree = np.flatnonzero(has_defect != thresholds.binarize_masks(labels).ravel())
    if disagree.size:
      # E.g. a tiny defect that vanished when the mask was resized: AUPRO
      # follows the masks, image metrics follow the labels.
      _warn(
        f"compute_metrics: labels and masks disagree for image index(es) "
        f"{disagree[:10].tolist()}; pixel metrics follow the masks."
      )
    f1, threshold = pixels.sweep.f1_max("pixel_f1max")
    pixel = dict(
      auroc=_auroc(pixels.sweep, "pixel_auroc"),
      aupro=_aupro_mvtec(pixels, fpr_limit),
      aupro_rd4ad=_aupro_rd4ad(pixels, fpr_limit),
      ap=_average_precision(pixels.sweep, "pixel_ap"),
      f1=f1,
      threshold=threshold,
    )
  return dict(
    image_auroc=_auroc(image, "image_auroc"),
    pixel_auroc=pixel["auroc"],
    pixel_aupro=pixel["aupro"],
    pixel_aupro_rd4ad=pixel["aupro_rd4ad"],
    image_f1max=image_f1,
    image_f1max_threshold=image_threshold,
    pixel_ap=pixel["ap"],
    image_ap=_average_precision(image, "image_ap"),
    pixel_f1max=pixel["f1"],
    pixel_f1max_threshold=pixel["threshold"],
  )
