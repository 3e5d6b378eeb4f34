"""Tests for skrd4ad_jax.metrics against slow, independent reference loops.

The references below loop over thresholds and regions in the plainest way
(the RD4AD one is a line-by-line port of the family's `compute_pro`), so they
are easy to check by eye; the library must agree with them, with scikit-learn,
and with the values two independent implementations give for the shipped
aupro_cases.
"""

import json
import os

import numpy as np
import pytest
from scipy import ndimage
from skimage import measure
from sklearn import metrics as skm

from skrd4ad_jax.evaluation import metrics

_TESTS = os.path.dirname(os.path.abspath(__file__))
_SHARED_CASES = os.path.join(_TESTS, "..", "..", "shared", "reference", "aupro_cases")
_LOCAL_CASES = os.path.join(_TESTS, "data", "aupro_cases")
CASES_DIR = _SHARED_CASES if os.path.isdir(_SHARED_CASES) else _LOCAL_CASES


def make_case(seed, num_images=12, num_anomalous=None, size=64, levels=None):
  """Random blob-shaped defects of several sizes and smoothed-noise maps.

  Args:
    seed: random seed.
    num_images: number of images.
    num_anomalous: the first images get 1-4 defects each (default 60%).
    size: image side.
    levels: if set, maps are quantised to this many levels (many ties).

  Returns:
    (masks uint8 [N, H, W], maps float32 [N, H, W]).
  """
  rng = np.random.default_rng(seed)
  if num_anomalous is None:
    num_anomalous = round(0.6 * num_images)
  yy, xx = np.mgrid[:size, :size]
  masks = np.zeros((num_images, size, size), dtype=np.uint8)
  for i in range(num_anomalous):
    for _ in range(rng.integers(1, 5)):
      # 0.5 gives a one-pixel defect; the others small to large blobs.
      radius = rng.choice([0.5, 2.0, 5.0, 11.0])
      ry, rx = radius * rng.uniform(0.6, 1.4, 2)
      cy, cx = rng.integers(0, size, 2)
      masks[i] |= (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8)
  noise = (
    ndimage.gaussian_filter(rng.standard_normal((num_images, size, size)), sigma=(0, 2, 2)) * 4
  )
  signal = ndimage.gaussian_filter(masks.astype(float), sigma=(0, 1.5, 1.5))
  maps = noise + signal * rng.uniform(0.3, 2.0, (num_images, 1, 1))
  if levels is not None:
    lo, hi = maps.min(), maps.max()
    maps = np.round((maps - lo) / (hi - lo) * (levels - 1))
  return masks, maps.astype(np.float32)


def pro_curve_reference(masks, maps, ths):
  """(FPR, PRO) of `maps >= th` for each th, by plain loops over regions."""
  regions = []  # (image index, region), 8-connected per image
  for image, mask in enumerate(masks):
    for region in measure.regionprops(measure.label(mask, connectivity=2)):
      regions.append((image, region))
  normal = masks == 0
  fprs, pros = [], []
  for th in ths:
    binary = maps >= th
    fprs.append((binary & normal).sum() / normal.sum())
    overlaps = []
    for image, region in regions:
      rows, cols = region.coords[:, 0], region.coords[:, 1]
      overlaps.append(binary[image, rows, cols].sum() / region.area)
    pros.append(np.mean(overlaps))
  return np.array(fprs), np.array(pros)


def area_up_to_reference(fprs, pros, limit):
  """Trapezoid from FPR 0 to `limit`, interpolating the last segment."""
  area = 0.0
  for x0, y0, x1, y1 in zip(fprs[:-1], pros[:-1], fprs[1:], pros[1:]):
    if x1 <= limit:
      area += (x1 - x0) * (y0 + y1) / 2
    else:
      if x0 < limit:
        y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += (limit - x0) * (y0 + y_limit) / 2
      break
  return area


def mvtec_reference(masks, maps, ths, limit=0.3):
  """Pooled AUPRO from a threshold list (descending), plus the curve's ends."""
  fprs, pros = pro_curve_reference(masks, maps, ths)
  fprs = np.concatenate([[0.0], fprs, [1.0]])
  pros = np.concatenate([[0.0], pros, [1.0]])
  return area_up_to_reference(fprs, pros, limit) / limit


def rd4ad_reference(masks, maps, limit=0.3):
  """Line-by-line port of the RD4AD family's compute_pro, averaged."""
  areas = []
  for mask, amap in zip(masks, maps):
    if not mask.any():
      continue
    regions = measure.regionprops(measure.label(mask, connectivity=2))
    inverse_mask = 1 - mask
    min_th, max_th = amap.min(), amap.max()
    delta = (max_th - min_th) / 200
    rows = []
    for th in np.arange(min_th, max_th, delta):
      binary = amap > th
      pros = []
      for region in regions:
        tp_pixels = binary[region.coords[:, 0], region.coords[:, 1]].sum()
        pros.append(tp_pixels / region.area)
      fpr = np.logical_and(inverse_mask, binary).sum() / inverse_mask.sum()
      rows.append((np.mean(pros), fpr))
    rows = np.array(rows)
    rows = rows[rows[:, 1] < limit]
    areas.append(skm.auc(rows[:, 1] / rows[:, 1].max(), rows[:, 0]))
  return float(np.mean(areas))


# --- AUPRO, pooled MVTec protocol -------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_mvtec_exact_on_tied_maps(seed, limit):
  # Quantised maps: thresholding at every distinct value is the exact curve,
  # with large tie groups between normal and defect pixels.
  masks, maps = make_case(seed, levels=40)
  ths = np.unique(maps)[::-1]
  expected = mvtec_reference(masks, maps, ths, limit)
  got = metrics.aupro(masks, maps, fpr_limit=limit, protocol="mvtec")
  assert got == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("levels", [None, 40, 3])
@pytest.mark.parametrize("limit", [0.3, 0.05, 0.001, 0.45])
def test_mvtec_from_the_top_normals_equals_the_full_sweep(levels, limit):
  """aupro() sorts only the normal pixels above the (1 - limit) quantile: same bits."""
  masks, maps = make_case(4, levels=levels)
  labels = masks.reshape(len(masks), -1).max(axis=1)
  scores = maps.reshape(len(maps), -1).max(axis=1)
  for m in (maps, maps.astype(np.float64)):
    # compute_metrics builds the full sweep (for AUROC) before pooled AUPRO reads it.
    full = metrics.compute_metrics(labels, scores, masks, m, fpr_limit=limit)["pixel_aupro"]
    assert metrics.aupro(masks, m, fpr_limit=limit) == full


@pytest.mark.parametrize("seed", [2, 3])
def test_mvtec_matches_dense_threshold_reference(seed):
  masks, maps = make_case(seed)
  ths = np.quantile(maps, np.linspace(1, 0, 1500))
  expected = mvtec_reference(masks, maps, ths)
  assert metrics.aupro(masks, maps) == pytest.approx(expected, abs=1e-3)


def test_mvtec_bounds_and_ordering():
  masks, maps = make_case(4)
  perfect = masks.astype(np.float32) + 0.01 * maps
  inverted = -perfect
  assert metrics.aupro(masks, perfect) == pytest.approx(1.0)
  assert metrics.aupro(masks, inverted) == pytest.approx(0.0)
  assert 0.0 < metrics.aupro(masks, maps) < 1.0


def test_normal_images_lower_pooled_but_not_rd4ad_aupro():
  # Pooled FPR counts the normal images, the RD4AD protocol ignores them.
  masks, maps = make_case(5)
  hot_normals = maps.copy()
  hot_normals[-3:] += 3.0  # the last images are normal
  assert metrics.aupro(masks, hot_normals) < metrics.aupro(masks, maps) - 0.05
  assert metrics.aupro(masks, hot_normals, protocol="rd4ad") == pytest.approx(
    metrics.aupro(masks, maps, protocol="rd4ad"), abs=1e-12
  )


# --- AUPRO, RD4AD per-image protocol ----------------------------------------


@pytest.mark.parametrize("seed", [0, 6, 7])
def test_rd4ad_matches_reference_loop(seed):
  masks, maps = make_case(seed, size=48)
  expected = rd4ad_reference(masks, maps)
  got = metrics.aupro(masks, maps, protocol="rd4ad")
  assert got == pytest.approx(expected, abs=1e-6)


def test_rd4ad_matches_reference_on_float64_tied_maps():
  masks, maps = make_case(8, size=40, levels=25)
  maps = maps.astype(np.float64)
  assert metrics.aupro(masks, maps, protocol="rd4ad") == pytest.approx(
    rd4ad_reference(masks, maps), abs=1e-6
  )


def test_rd4ad_other_limit_matches_reference():
  masks, maps = make_case(9, size=40)
  assert metrics.aupro(masks, maps, fpr_limit=0.1, protocol="rd4ad") == pytest.approx(
    rd4ad_reference(masks, maps, limit=0.1), abs=1e-6
  )


# --- Independent implementations (anomalib; RD4AD compute_pro) ---------------


@pytest.mark.parametrize("name", ["case_101.npz", "case_202.npz"])
def test_aupro_cases(name):
  with open(os.path.join(CASES_DIR, "values.json")) as f:
    expected = json.load(f)[name]
  case = np.load(os.path.join(CASES_DIR, name))
  masks, maps = case["masks"], case["anomaly_maps"]
  assert metrics.aupro(masks, maps, protocol="mvtec") == pytest.approx(
    expected["mvtec_anomalib"], abs=1e-3
  )
  assert metrics.aupro(masks, maps, protocol="rd4ad") == pytest.approx(
    expected["rd4ad_per_image"], abs=1e-6
  )


# --- AUROC, AP, F1 ------------------------------------------------------------


@pytest.mark.parametrize("levels", [None, 30])
def test_pixel_auroc_and_ap_match_sklearn(levels):
  masks, maps = make_case(10, levels=levels)
  assert metrics.pixel_auroc(masks, maps) == pytest.approx(
    skm.roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12
  )
  assert metrics.pixel_ap(masks, maps) == pytest.approx(
    skm.average_precision_score(masks.ravel(), maps.ravel()), abs=1e-12
  )


@pytest.mark.parametrize("seed", range(4))
def test_image_auroc_ap_match_sklearn(seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, 57)
  # Rounded scores: ties inside and across classes.
  scores = np.round(rng.standard_normal(57) + labels, 1)
  assert metrics.image_auroc(labels, scores) == pytest.approx(
    skm.roc_auc_score(labels, scores), abs=1e-12
  )
  assert metrics.image_ap(labels, scores) == pytest.approx(
    skm.average_precision_score(labels, scores), abs=1e-12
  )


def f1max_reference(labels, scores):
  best_f1, best_th = -1.0, None
  for th in np.unique(scores):
    f1 = skm.f1_score(labels, scores >= th, zero_division=0)
    if f1 >= best_f1:  # ascending thresholds: ties go to the higher one
      best_f1, best_th = f1, th
  return best_f1, best_th


@pytest.mark.parametrize("seed", range(3))
def test_f1max_matches_threshold_loop(seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, 40)
  scores = np.round(rng.standard_normal(40) + 1.5 * labels, 1)
  f1, th = metrics.image_f1max(labels, scores)
  ref_f1, ref_th = f1max_reference(labels, scores)
  assert f1 == pytest.approx(ref_f1, abs=1e-12)
  assert th == ref_th
  # The threshold really attains that F1 with the >= rule.
  assert skm.f1_score(labels, scores >= th) == pytest.approx(f1, abs=1e-12)


def test_pixel_f1max_matches_threshold_loop():
  masks, maps = make_case(11, num_images=4, num_anomalous=3, size=24, levels=20)
  f1, th = metrics.pixel_f1max(masks, maps)
  ref_f1, ref_th = f1max_reference(masks.ravel(), maps.ravel())
  assert (f1, th) == pytest.approx((ref_f1, ref_th), abs=1e-12)


def test_compute_metrics_names_and_consistency():
  masks, maps = make_case(12)
  labels = masks.reshape(len(masks), -1).max(axis=1)
  scores = maps.reshape(len(maps), -1).max(axis=1)
  result = metrics.compute_metrics(labels, scores, masks, maps)
  assert list(result) == [
    "image_auroc",
    "pixel_auroc",
    "pixel_aupro",
    "pixel_aupro_rd4ad",
    "image_f1max",
    "image_f1max_threshold",
    "pixel_ap",
    "image_ap",
    "pixel_f1max",
    "pixel_f1max_threshold",
  ]
  assert all(type(v) is float for v in result.values())
  json.dumps(result)
  assert result["pixel_aupro"] == metrics.aupro(masks, maps)
  assert result["pixel_aupro_rd4ad"] == metrics.aupro(masks, maps, protocol="rd4ad")
  assert result["pixel_auroc"] == metrics.pixel_auroc(masks, maps)
  assert result["pixel_ap"] == metrics.pixel_ap(masks, maps)
  assert (result["pixel_f1max"], result["pixel_f1max_threshold"]) == metrics.pixel_f1max(
    masks, maps
  )
  assert result["image_auroc"] == metrics.image_auroc(labels, scores)
  assert result["image_ap"] == metrics.image_ap(labels, scores)
  assert (result["image_f1max"], result["image_f1max_threshold"]) == metrics.image_f1max(
    labels, scores
  )


def test_compute_metrics_without_masks(recwarn):
  labels = np.array([0, 0, 1, 1, 0])
  scores = np.array([0.1, 0.4, 0.35, 0.8, 0.2])
  result = metrics.compute_metrics(labels, scores, None, None)
  assert result["image_auroc"] == pytest.approx(skm.roc_auc_score(labels, scores))
  for key in (
    "pixel_auroc",
    "pixel_aupro",
    "pixel_aupro_rd4ad",
    "pixel_ap",
    "pixel_f1max",
    "pixel_f1max_threshold",
  ):
    assert np.isnan(result[key])
  assert not recwarn.list  # absent masks are normal, not a problem


# --- Input handling -----------------------------------------------------------


def test_mask_dtypes_and_shapes_are_equivalent():
  masks, maps = make_case(13, num_images=5, size=32)
  expected = metrics.aupro(masks, maps)
  # Resized masks hold fractions; 0.5 is the cut.
  blurred = masks * 0.8 + 0.1
  for variant in (masks.astype(bool), masks * 255, masks.astype(np.float32), blurred):
    assert metrics.aupro(variant, maps) == expected
  assert metrics.aupro(masks[..., None], maps[..., None]) == expected
  assert metrics.pixel_auroc(masks * 255, maps) == metrics.pixel_auroc(masks, maps)


def test_non_finite_maps_name_count_and_image():
  masks, maps = make_case(14, num_images=6, size=16)
  maps[3, 2, 2] = np.nan
  maps[5, 0, 0] = np.inf
  maps[5, 0, 1] = -np.inf
  for fn in (metrics.aupro, metrics.pixel_auroc, metrics.pixel_ap):
    with pytest.raises(ValueError, match=r"3 NaN/inf value.*3, 5"):
      fn(masks, maps)
  with pytest.raises(ValueError, match=r"1 NaN/inf value.*index\(es\) 2"):
    metrics.image_auroc([0, 1, 0], [0.1, 0.2, np.nan])


def test_shape_mismatch_names_both_shapes():
  masks, maps = make_case(15, num_images=3, size=16)
  with pytest.raises(ValueError, match=r"\(3, 16, 16\).*\(3, 16, 15\)"):
    metrics.aupro(masks, maps[:, :, :15])
  with pytest.raises(ValueError, match=r"\(3,\).*\(4,\)"):
    metrics.image_auroc([0, 1, 0], [0.1, 0.2, 0.3, 0.4])


def test_bad_protocol_and_limit():
  masks, maps = make_case(16, num_images=3, size=16)
  with pytest.raises(ValueError, match="protocol"):
    metrics.aupro(masks, maps, protocol="anomalib")
  with pytest.raises(ValueError, match="fpr_limit"):
    metrics.aupro(masks, maps, fpr_limit=0.0)


# --- Edge cases: a defined result and a warning, never a crash ---------------


def test_no_anomalous_image():
  _, maps = make_case(17, num_images=4, size=16)
  masks = np.zeros(maps.shape, dtype=np.uint8)
  for protocol in metrics.PROTOCOLS:
    with pytest.warns(RuntimeWarning, match="defect"):
      assert np.isnan(metrics.aupro(masks, maps, protocol=protocol))
  with pytest.warns(RuntimeWarning, match="pixel_auroc"):
    assert np.isnan(metrics.pixel_auroc(masks, maps))
  with pytest.warns(RuntimeWarning, match="image_auroc"):
    assert np.isnan(metrics.image_auroc([0, 0, 0, 0], [1.0, 2.0, 3.0, 4.0]))
  with pytest.warns(RuntimeWarning):
    result = metrics.compute_metrics([0] * 4, [1.0, 2.0, 3.0, 4.0], masks, maps)
  assert all(np.isnan(v) for v in result.values())


def test_only_anomalous_images():
  masks, maps = make_case(18, num_images=5, num_anomalous=5, size=32)
  labels = np.ones(5)
  scores = maps.reshape(5, -1).max(axis=1)
  with pytest.warns(RuntimeWarning, match="image_auroc"):
    result = metrics.compute_metrics(labels, scores, masks, maps)
  assert np.isnan(result["image_auroc"])
  assert result["image_ap"] == 1.0
  assert result["image_f1max"] == 1.0
  assert result["image_f1max_threshold"] == scores.min()
  assert 0 < result["pixel_aupro"] < 1 and 0 < result["pixel_aupro_rd4ad"] < 1
  assert result["pixel_auroc"] == pytest.approx(
    skm.roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12
  )


def test_one_pixel_defect():
  rng = np.random.default_rng(19)
  maps = rng.random((3, 20, 20)).astype(np.float32)
  masks = np.zeros(maps.shape, dtype=np.uint8)
  masks[1, 7, 9] = 1
  maps[1, 7, 9] = 2.0  # the defect is the hottest pixel of all
  assert metrics.aupro(masks, maps) == pytest.approx(1.0)
  assert metrics.aupro(masks, maps, protocol="rd4ad") == pytest.approx(1.0)
  maps[1, 7, 9] = -1.0  # now the coldest
  assert metrics.aupro(masks, maps) == pytest.approx(0.0)
  assert metrics.aupro(masks, maps, protocol="rd4ad") == pytest.approx(
    rd4ad_reference(masks, maps), abs=1e-6
  )


def test_constant_maps():
  masks, _ = make_case(20, num_images=4, num_anomalous=2, size=16)
  maps = np.full(masks.shape, 0.25, dtype=np.float32)
  # Everything ties: the pooled curve is the diagonal, area L^2/2 over L.
  with pytest.warns(RuntimeWarning, match="constant"):
    assert metrics.aupro(masks, maps, fpr_limit=0.3) == pytest.approx(0.15)
  with pytest.warns(RuntimeWarning, match="constant"):
    assert metrics.aupro(masks, maps, protocol="rd4ad") == 0.0
  with pytest.warns(RuntimeWarning, match="constant"):
    assert metrics.pixel_auroc(masks, maps) == 0.5
  with pytest.warns(RuntimeWarning, match="constant"):
    assert metrics.pixel_f1max(masks, maps)[1] == 0.25


def test_rd4ad_degenerate_images_warn_once_per_kind():
  rng = np.random.default_rng(21)
  maps = rng.random((4, 16, 16))
  masks = np.zeros(maps.shape, dtype=np.uint8)
  masks[0, 4:8, 4:8] = 1  # an ordinary image
  masks[1] = 1  # no normal pixel: left out
  masks[2, 2:4, 2:4] = 1
  maps[2] = 0.0  # normal pixels all at the minimum: FPR 0 everywhere
  maps[2, 2:4, 2:4] = 1.0
  with pytest.warns(RuntimeWarning) as record:
    got = metrics.aupro(masks, maps, protocol="rd4ad")
  messages = " ".join(str(w.message) for w in record)
  assert "[1] have no normal pixel" in messages
  assert "[2] have FPR 0" in messages
  # Image 2 is a perfect detection (area 1); image 1 does not count.
  expected_0 = rd4ad_reference(masks[:1], maps[:1])
  assert got == pytest.approx((expected_0 + 1.0) / 2, abs=1e-6)


def test_labels_disagreeing_with_masks_warn():
  masks, maps = make_case(22, num_images=4, num_anomalous=2, size=16)
  labels = [1, 1, 1, 0]  # image 2 is labelled anomalous, its mask is empty
  with pytest.warns(RuntimeWarning, match=r"disagree.*\[2\]"):
    metrics.compute_metrics(labels, [0.5, 0.6, 0.7, 0.1], masks, maps)
