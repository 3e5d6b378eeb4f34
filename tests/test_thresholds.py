"""Tests for skrd4ad_jax.thresholds: known answers and brute-force loops."""

import json
import warnings

import numpy as np
import pytest

from skrd4ad_jax.evaluation import metrics, thresholds


def brute_force_f1max(labels, scores):
  """Best F1 over every distinct score as threshold (>=); higher wins ties."""
  labels = np.asarray(labels, dtype=bool)
  best_f1, best_th = -1.0, None
  for th in np.unique(scores):
    flagged = scores >= th
    tp = np.sum(flagged & labels)
    fp = np.sum(flagged & ~labels)
    fn = np.sum(~flagged & labels)
    f1 = 2 * tp / (2 * tp + fp + fn)
    if f1 >= best_f1:
      best_f1, best_th = f1, th
  return best_f1, best_th


def make_validation(seed, num_images=10, size=24, anomalous=True):
  """Validation images: square defects on the first half when `anomalous`."""
  rng = np.random.default_rng(seed)
  maps = rng.random((num_images, size, size)).astype(np.float32)
  masks = np.zeros(maps.shape, dtype=np.uint8)
  if anomalous:
    for i in range(num_images // 2):
      y, x = rng.integers(0, size - 6, 2)
      masks[i, y : y + 6, x : x + 6] = 1
      maps[i, y : y + 6, x : x + 6] += 0.7
  labels = masks.reshape(num_images, -1).max(axis=1)
  scores = maps.reshape(num_images, -1).max(axis=1)
  return labels, scores, masks, maps


def test_binarize_masks():
  np.testing.assert_array_equal(
    thresholds.binarize_masks(np.array([0, 255, 1], np.uint8)), [False, True, True]
  )
  # Resized float masks are cut at 0.5.
  np.testing.assert_array_equal(
    thresholds.binarize_masks(np.array([0.0, 0.49, 0.51, 1.0])), [False, False, True, True]
  )
  mask = np.array([True, False])
  assert thresholds.binarize_masks(mask) is mask


def test_as_scores_names_bad_values():
  with pytest.raises(ValueError, match=r"maps holds 2 NaN/inf.*1, 4"):
    thresholds.as_scores(np.array([[0.0], [np.nan], [1.0], [2.0], [np.inf]]), "maps")
  assert thresholds.as_scores(np.arange(3), "x").dtype == np.float64
  assert thresholds.as_scores(np.ones(3, np.float32), "x").dtype == np.float32


def test_sweep_counts_match_brute_force():
  rng = np.random.default_rng(0)
  pos = rng.integers(0, 12, 40).astype(float)
  neg = rng.integers(0, 12, 60).astype(float)
  weights = rng.random(40)
  sweep = thresholds.ThresholdSweep.from_scores(pos, neg, weights)
  np.testing.assert_array_equal(sweep.values, np.unique(pos))
  for k, value in enumerate(sweep.values):
    assert sweep.pos_at[k] == np.sum(pos == value)
    assert sweep.pos_ge[k] == np.sum(pos >= value)
    assert sweep.neg_ge[k] == np.sum(neg >= value)
    assert sweep.neg_gt[k] == np.sum(neg > value)
    assert sweep.weight_at[k] == pytest.approx(weights[pos == value].sum())
  assert (sweep.num_pos, sweep.num_neg) == (40, 60)


def test_f1_optimal_threshold_known_answer():
  # Separable: the threshold is the lowest anomalous score, F1 = 1.
  rng = np.random.default_rng(1)
  labels = np.r_[np.zeros(50), np.ones(20)]
  scores = np.r_[rng.uniform(0, 1, 50), rng.uniform(2, 3, 20)]
  assert thresholds.f1_optimal_threshold(labels, scores) == scores[50:].min()
  assert thresholds.f1_max(labels, scores)[0] == 1.0
  # Overlapping: normals 0..9, anomalies 8..17. At t = 8: TP 10, FP 2, F1 =
  # 20/22; t = 9: 18/20; t = 10: 16/18; so t = 8 is best.
  labels = np.r_[np.zeros(10), np.ones(10)]
  scores = np.r_[np.arange(10), np.arange(8, 18)].astype(float)
  f1, threshold = thresholds.f1_max(labels, scores)
  assert (f1, threshold) == (pytest.approx(20 / 22), 8.0)
  assert isinstance(threshold, float)
  # A tie: t = 3 (TP 1, FP 0) and t = 1 (TP 2, FP 2) both give F1 = 2/3; the
  # higher threshold, which flags less, is kept.
  f1, threshold = thresholds.f1_max([1, 0, 0, 1], [1.0, 2.0, 2.5, 3.0])
  assert (f1, threshold) == (pytest.approx(2 / 3), 3.0)


@pytest.mark.parametrize("seed", range(4))
def test_f1_max_matches_brute_force(seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, 80)
  scores = np.round(rng.standard_normal(80) + labels, 1)
  f1, threshold = thresholds.f1_max(labels, scores)
  ref_f1, ref_threshold = brute_force_f1max(labels, scores)
  assert f1 == pytest.approx(ref_f1, abs=1e-12)
  assert threshold == ref_threshold


def test_f1_without_anomalies_is_nan_with_warning():
  with pytest.warns(RuntimeWarning, match="no anomalous"):
    f1, threshold = thresholds.f1_max([0, 0, 0], [0.1, 0.2, 0.3])
  assert np.isnan(f1) and np.isnan(threshold)


def test_normal_only_threshold_is_the_quantile():
  scores = np.random.default_rng(2).standard_normal(2000)
  threshold = thresholds.normal_only_threshold(scores, quantile=0.99)
  assert threshold == pytest.approx(np.quantile(scores, 0.99))
  assert isinstance(threshold, float)
  assert 0.005 <= np.mean(scores >= threshold) <= 0.015


@pytest.mark.parametrize(
  "scores",
  [
    [0.3],
    [0.3, 0.3, 0.3],
    [0.1, 0.2],
    [5.0, 5.0, 5.0, 5.0, 6.0],
    list(np.random.default_rng(3).random(7)),
  ],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_normal_only_threshold_never_flags_every_normal_image(scores, dtype):
  scores = np.asarray(scores, dtype)
  threshold = thresholds.normal_only_threshold(scores)
  # Compared as predict and the exported models compare: in the scores' precision.
  assert not np.all(scores >= threshold)
  assert not np.all(scores >= np.asarray(threshold, dtype))
  assert threshold >= np.quantile(scores, 0.99)


def test_normal_only_threshold_rejects_bad_quantile():
  with pytest.raises(ValueError, match="quantile"):
    thresholds.normal_only_threshold([1.0, 2.0], quantile=0.0)


def test_choose_thresholds_with_anomalies_is_f1_optimal():
  labels, scores, masks, maps = make_validation(4)
  chosen = thresholds.choose_thresholds(labels, scores, masks, maps)
  assert chosen["rule"] == thresholds.RULE_F1
  assert chosen["image_threshold"] == thresholds.f1_optimal_threshold(labels, scores)
  assert chosen["pixel_threshold"] == brute_force_f1max(masks.ravel(), maps.ravel())[1]
  assert chosen["pixel_threshold"] == metrics.pixel_f1max(masks, maps)[1]
  assert (chosen["image_min"], chosen["image_max"]) == (scores.min(), scores.max())
  assert (chosen["pixel_min"], chosen["pixel_max"]) == (maps.min(), maps.max())
  # Known answer: the defects (+0.7) are the top scores, so F1 = 1.
  assert np.array_equal(scores >= chosen["image_threshold"], labels == 1)


@pytest.mark.parametrize("with_masks", [True, False])
def test_choose_thresholds_normal_only(with_masks):
  labels, scores, masks, maps = make_validation(5, anomalous=False)
  chosen = thresholds.choose_thresholds(
    labels, scores, masks if with_masks else None, maps, normal_quantile=0.95
  )
  assert chosen["rule"] == "normal_quantile_0.95"
  assert not np.all(scores >= chosen["image_threshold"])
  assert chosen["image_threshold"] == pytest.approx(np.quantile(scores, 0.95))
  assert chosen["pixel_threshold"] == pytest.approx(np.quantile(maps, 0.95))
  assert 0.04 <= np.mean(maps >= chosen["pixel_threshold"]) <= 0.06


def test_choose_thresholds_without_masks_uses_normal_maps():
  labels, scores, _, maps = make_validation(6)
  chosen = thresholds.choose_thresholds(labels, scores, None, maps)
  assert chosen["rule"] == "image=f1_optimal,pixel=normal_quantile_0.99"
  assert chosen["pixel_threshold"] == pytest.approx(np.quantile(maps[labels == 0], 0.99))


def test_choose_thresholds_all_anomalous_without_masks_warns():
  labels, scores, _, maps = make_validation(8, num_images=4)
  labels[:] = 1
  with pytest.warns(RuntimeWarning, match="no normal validation image"):
    chosen = thresholds.choose_thresholds(labels, scores, None, maps)
  assert chosen["pixel_threshold"] == pytest.approx(np.quantile(maps, 0.99))


def test_choose_thresholds_is_json_serialisable():
  labels, scores, masks, maps = make_validation(7)
  for chosen in (
    thresholds.choose_thresholds(labels, scores, masks, maps),
    thresholds.choose_thresholds(labels, scores, None, None),
  ):
    assert set(chosen) == {
      "image_threshold",
      "pixel_threshold",
      "rule",
      "image_min",
      "image_max",
      "pixel_min",
      "pixel_max",
    }
    assert all(type(v) in (float, str) for v in chosen.values())
    assert json.loads(json.dumps(chosen)).keys() == chosen.keys()


def test_normalize_scores_threshold_at_half_and_clipped():
  low, threshold, high = 2.0, 3.0, 7.0
  x = np.array([0.0, 2.0, 2.5, 3.0, 5.0, 7.0, 9.0])
  np.testing.assert_allclose(
    thresholds.normalize_scores(x, threshold, low, high), [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
  )
  assert thresholds.normalize_scores(3.0, threshold, low, high) == 0.5
  assert isinstance(thresholds.normalize_scores(3.0, threshold, low, high), float)
  grid = np.linspace(-1, 10, 500)
  out = thresholds.normalize_scores(grid, threshold, low, high)
  assert np.all(np.diff(out) >= 0)
  # The decision survives normalisation.
  np.testing.assert_array_equal(out >= 0.5, grid >= threshold)


@pytest.mark.parametrize(
  "threshold, low, high, x, expected",
  [
    # threshold at the minimum
    (2.0, 2.0, 4.0, [1.0, 2.0, 3.0, 10.0], [0.0, 0.5, 0.75, 1.0]),
    # threshold at the maximum
    (4.0, 2.0, 4.0, [1.0, 4.0, 5.0, 10.0], [0.0, 0.5, 1.0, 1.0]),
    # zero-width range
    (3.0, 3.0, 3.0, [1.0, 3.0, 4.0, 10.0], [0.0, 0.5, 1.0, 1.0]),
    # threshold above the maximum (a normal-only rule can give this)
    (5.0, 2.0, 4.0, [1.0, 4.0, 5.0, 10.0], [0.0, 1 / 3, 0.5, 1.0]),
  ],
)
def test_normalize_scores_guards_zero_width(threshold, low, high, x, expected):
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no division-by-zero warning
    out = thresholds.normalize_scores(np.array(x), threshold, low, high)
  np.testing.assert_allclose(out, expected)


def test_the_ok_ng_decision_is_made_in_float32():
  """One rule for predict, test_predictions.csv, the runner and an exported graph."""
  from skrd4ad_jax.evaluation.prediction_output import decision

  score = np.float32(0.7)
  just_above = float(np.nextafter(np.float64(score), np.inf))  # rounds to the score
  assert just_above > float(score)
  assert decision(float(score), just_above) == "NG"
  assert (np.array([score]) >= just_above)[0]  # numpy's float32 comparison agrees
  next_float32 = float(np.nextafter(score, np.float32(1)))
  assert decision(float(score), next_float32) == "OK"
  assert decision(float(score), float("nan")) == ""
