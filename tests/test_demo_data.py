"""Tests of the offline demo data set and of the colour-statistics baseline."""

import json
import os
import time

import numpy as np
from PIL import Image
import pytest
from scipy import ndimage as ndi
from sklearn.metrics import roc_auc_score

from skrd4ad_jax.data import demo_data
from skrd4ad_jax.evaluation import baseline

SMALL = dict(image_size=64, num_train=2, num_test_good=1, num_test_per_defect=1)


def _files(root):
  out = {}
  for dirpath, _, names in os.walk(root):
    for name in names:
      path = os.path.join(dirpath, name)
      out[os.path.relpath(path, root)] = path
  return out


def _read_all(root):
  return {rel: open(path, "rb").read() for rel, path in _files(root).items()}


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
  return demo_data.ensure_demo_dataset(
    str(tmp_path_factory.mktemp("demo") / "data"), seed=0, **SMALL
  )


def test_determinism_by_seed(small_root, tmp_path):
  again = demo_data.ensure_demo_dataset(str(tmp_path / "again"), seed=0, **SMALL)
  other = demo_data.ensure_demo_dataset(str(tmp_path / "other"), seed=1, **SMALL)
  a, b, c = _read_all(small_root), _read_all(again), _read_all(other)
  assert a == b  # Byte-identical, manifest included.
  assert set(a) == set(c)
  pngs = [k for k in a if k.endswith(".png")]
  assert all(a[k] != c[k] for k in pngs if "train" in k or "/test/" in k)


def test_layout(small_root):
  n_kinds = len(demo_data.DEFECT_KINDS)
  files = _files(small_root)
  assert "manifest.json" in files
  assert len(files) == 1 + len(demo_data.DEMO_CATEGORIES) * (2 + 1 + 2 * n_kinds)
  for cat in demo_data.DEMO_CATEGORIES:
    base = os.path.join(small_root, cat)
    assert sorted(os.listdir(os.path.join(base, "test"))) == sorted(
      ("good",) + demo_data.DEFECT_KINDS
    )
    assert sorted(os.listdir(os.path.join(base, "ground_truth"))) == sorted(demo_data.DEFECT_KINDS)
    assert sorted(os.listdir(os.path.join(base, "train", "good"))) == ["000.png", "001.png"]
    for kind in demo_data.DEFECT_KINDS:
      img = np.asarray(Image.open(os.path.join(base, "test", kind, "000.png")))
      mask = np.asarray(Image.open(os.path.join(base, "ground_truth", kind, "000_mask.png")))
      assert img.shape == (64, 64, 3) and img.dtype == np.uint8
      assert mask.shape == (64, 64) and mask.dtype == np.uint8
      assert set(np.unique(mask)) <= {0, 255} and mask.max() == 255


def test_idempotent_and_regenerates_on_new_parameters(small_root, tmp_path):
  manifest = os.path.join(small_root, "manifest.json")
  with open(manifest) as f:
    params = json.load(f)
  assert params["version"] == demo_data.DATASET_VERSION
  assert params["seed"] == 0 and params["image_size"] == 64
  stamp = {p: os.stat(p).st_mtime_ns for p in _files(small_root).values()}
  assert demo_data.ensure_demo_dataset(small_root, seed=0, **SMALL) == small_root
  assert {p: os.stat(p).st_mtime_ns for p in _files(small_root).values()} == stamp

  root = str(tmp_path / "regen")
  demo_data.ensure_demo_dataset(root, seed=0, **SMALL)
  demo_data.ensure_demo_dataset(root, seed=0, **dict(SMALL, num_train=3))
  assert len(os.listdir(os.path.join(root, "brick", "train", "good"))) == 3
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".demo-")]

  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "keep.txt").write_text("not ours")
  with pytest.raises(FileExistsError):
    demo_data.ensure_demo_dataset(str(foreign), **SMALL)


def test_interrupted_run_leaves_no_tree(tmp_path, monkeypatch):
  def boom(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(demo_data, "_save_png", boom)
  with pytest.raises(KeyboardInterrupt):
    demo_data.ensure_demo_dataset(str(tmp_path / "data"), **SMALL)
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("category", demo_data.DEMO_CATEGORIES)
def test_masks_mark_exactly_the_changed_pixels(category):
  photo = demo_data.load_photo(category)
  for j, kind in enumerate(demo_data.DEFECT_KINDS):
    for i in range(2):
      rng = np.random.default_rng([7, j, i])
      crop = demo_data.sample_crop(photo, rng, "test")
      clean, bad, mask = demo_data.make_defect_example(crop, kind, rng, 128, photo)
      diff = np.abs(bad.astype(int) - clean.astype(int)).max(-1)
      changed = diff > demo_data.MASK_EPS
      # Every changed pixel is marked; marked-but-unchanged pixels are only
      # the holes enclosed by changed pixels.
      assert not (changed & ~mask).any(), kind
      assert np.array_equal(mask, ndi.binary_fill_holes(changed)), kind
      # (A quarter-turned disk of brick keeps ~25 % of its pixels at half
      # resolution: mortar and brick faces land on their like.)
      assert changed[mask].mean() > 0.7, kind
      # Local: nothing changes outside a small neighbourhood of the mask.
      near = ndi.binary_dilation(mask, iterations=3)
      assert diff[~near].max(initial=0) <= demo_data.MASK_EPS, kind
      assert mask.sum() > 0.015 * mask.size, kind  # Not a speck.
      # Grey-level mean/std around the defect (its bounding box + 4 px) stay
      # those of the clean image for the statistics-preserving kinds; the
      # stain (the colour control) darkens it.
      ys, xs = np.nonzero(mask)
      box = (slice(max(ys.min() - 4, 0), ys.max() + 5), slice(max(xs.min() - 4, 0), xs.max() + 5))
      c, b = clean[..., 0][box].astype(float), bad[..., 0][box].astype(float)
      shift, ratio = (b.mean() - c.mean()) / c.std(), b.std() / c.std()
      if kind in demo_data.STATISTICS_PRESERVING_KINDS:
        assert abs(shift) < 0.3 and 0.8 < ratio < 1.25, (kind, shift, ratio)
      elif kind == "stain":
        assert shift < -0.3, (kind, shift)
      elif kind == "scratch":  # Visible: the line's contrast is ~2 grey-level stds.
        contrast = np.percentile(diff[mask], 90) / clean[..., 0].std()
        assert contrast > 1.5, (kind, contrast)


def test_defects_survive_resizing_to_64(small_root):
  for cat in demo_data.DEMO_CATEGORIES:
    data = demo_data.generate_category(
      cat, seed=3, image_size=128, num_train=0, num_test_good=0, num_test_per_defect=3
    )
    for kind in demo_data.DEFECT_KINDS:
      for _, mask in data[f"test/{kind}"]:
        m64 = Image.fromarray(mask.astype(np.uint8) * 255).resize((64, 64), Image.BILINEAR)
        assert (np.asarray(m64) > 127).sum() >= 8, (cat, kind)
  for cat in demo_data.DEMO_CATEGORIES:  # Generated directly at 64 px.
    for kind in demo_data.DEFECT_KINDS:
      mask = np.asarray(
        Image.open(os.path.join(small_root, cat, "ground_truth", kind, "000_mask.png"))
      )
      assert (mask > 127).sum() >= 8, (cat, kind)


def test_baseline_shapes_and_speed():
  rng = np.random.default_rng(0)
  train = rng.integers(0, 256, (60, 128, 128, 3), dtype=np.uint8)
  test = rng.integers(0, 256, (40, 128, 128, 3), dtype=np.uint8)
  t0 = time.time()
  maps = baseline.colour_statistics_baseline(train, test)
  assert time.time() - t0 < 15.0  # ~1-2 s on an idle 2-core CPU.
  assert maps.shape == (40, 128, 128) and maps.dtype == np.float32
  assert np.isfinite(maps).all()
  assert baseline.image_scores(maps).shape == (40,)
  # Gray images stored as RGB (identical channels) are handled.
  gray = np.repeat(train[..., :1], 3, -1)
  assert np.isfinite(baseline.colour_statistics_baseline(gray, gray[:2])).all()


@pytest.fixture(scope="module")
def brick_split():
  data = demo_data.generate_category(
    "brick", seed=0, image_size=128, num_train=24, num_test_good=8, num_test_per_defect=8
  )
  return np.stack(data["train"]), np.stack(data["test/good"]), data


def _aurocs(train, good, defects, window=11):
  imgs = np.concatenate([good, np.stack([im for im, _ in defects])])
  masks = np.concatenate([np.zeros(good.shape[:3], bool), np.stack([m for _, m in defects])])
  labels = np.r_[np.zeros(len(good)), np.ones(len(defects))]
  maps = baseline.colour_statistics_baseline(train, imgs, window=window)
  return (
    roc_auc_score(labels, baseline.image_scores(maps)),
    roc_auc_score(masks.ravel(), maps.ravel()),
    maps,
    masks,
  )


def test_baseline_finds_a_strong_colour_defect(brick_split):
  train, good, data = brick_split
  _, pix, maps, masks = _aurocs(train, good, data["test/stain"])
  assert pix > 0.9
  n = len(good)
  ratios = [
    maps[n + k][masks[n + k]].mean() / maps[n + k][~masks[n + k]].mean()
    for k in range(len(data["test/stain"]))
  ]  # Inside / outside.
  assert min(ratios) > 1.5 and np.median(ratios) > 2.5, ratios


def test_baseline_misses_structural_defects(brick_split):
  train, good, data = brick_split
  for kind in ("misorientation", "distortion"):
    img, pix, _, _ = _aurocs(train, good, data[f"test/{kind}"])
    assert img < 0.8 and pix < 0.75, (kind, img, pix)
