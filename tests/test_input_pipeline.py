"""Tests for data_pipelines.input_pipeline (tf.data, CPU only)."""

import io
import os

import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from data_pipelines import input_pipeline
from skrd4ad_jax import normalization
from skrd4ad_jax.data import folder, source

tf.config.set_visible_devices([], "GPU")

MEAN = np.asarray(normalization.IMAGENET_MEAN, np.float32)
STD = np.asarray(normalization.IMAGENET_STD, np.float32)
SIZE = 16


def _encode(array_or_image, fmt="PNG", **kwargs):
  image = (
    array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
  )
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def _pil_reference(image, size=SIZE):
  """The RD4AD reference: PIL RGB, Resize((size, size)) bilinear, normalise."""
  resized = image.convert("RGB").resize((size, size), Image.BILINEAR)
  return (np.asarray(resized, np.float32) / 255.0 - MEAN) / STD


def _to_8bit(normalised):
  return (normalised * STD + MEAN) * 255.0


def _smooth_image(height, width, seed=0):
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (height // 4 + 1, width // 4 + 1, 3), np.uint8)
  return np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC))


def _decode(contents, size=SIZE):
  return input_pipeline.decode_and_resize(contents, size).numpy()


# --- decoding, conversion, resizing, normalisation --------------------------


def test_normalisation_values():
  image = np.zeros((SIZE, SIZE, 3), np.uint8)
  image[..., 0], image[..., 1], image[..., 2] = 0, 128, 255
  out = _decode(_encode(image))
  assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.float32
  expected = (np.array([0, 128, 255]) / 255.0 - MEAN) / STD
  np.testing.assert_allclose(out[3, 5], expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(input_pipeline.normalize(image).numpy(), out)


@pytest.mark.parametrize(
  "shape,size",
  [
    ((40, 56), 16),
    ((20, 20), 16),
    ((10, 12), 16),
    ((16, 16), 16),
    ((3, 50), 16),
    ((300, 300), 256),
  ],
)
def test_resize_is_bit_exact_pil_bilinear(shape, size):
  rng = np.random.default_rng(0)
  for image in (_smooth_image(*shape), rng.integers(0, 256, shape + (3,), np.uint8)):
    out = _to_8bit(_decode(_encode(image), size))
    ref = _to_8bit(_pil_reference(Image.fromarray(image), size))
    np.testing.assert_allclose(out, ref, atol=1e-3)


@pytest.mark.parametrize("shape", [(30, 20), (56, 40), (60, 20)])
def test_resize_portrait_within_one_level_of_pil(shape):
  # Pillow 13 may run the vertical pass first on portrait images; the
  # pipeline keeps Pillow's classic horizontal-first order.
  image = np.random.default_rng(0).integers(0, 256, shape + (3,), np.uint8)
  out = _to_8bit(_decode(_encode(image)))
  ref = _to_8bit(_pil_reference(Image.fromarray(image)))
  assert np.abs(out - ref).max() <= 1.001


def test_grayscale_to_rgb():
  gray = _smooth_image(20, 20)[..., 0]
  out = _decode(_encode(gray))
  rgb = _decode(_encode(np.repeat(gray[..., None], 3, axis=-1)))
  np.testing.assert_allclose(out, rgb, atol=1e-6)


def test_rgba_and_gray_alpha_drop_alpha():
  rgb = _smooth_image(20, 24)
  alpha = np.random.default_rng(1).integers(0, 256, (20, 24, 1), np.uint8)
  rgba = np.concatenate([rgb, alpha], axis=-1)
  np.testing.assert_allclose(_decode(_encode(rgba)), _decode(_encode(rgb)), atol=1e-6)
  la = Image.fromarray(rgba).convert("LA")
  np.testing.assert_allclose(_decode(_encode(la)), _decode(_encode(la.convert("RGB"))), atol=1e-6)


def test_palette_png():
  image = Image.fromarray(_smooth_image(20, 20)).convert("P")
  np.testing.assert_allclose(
    _decode(_encode(image)), _decode(_encode(image.convert("RGB"))), atol=1e-6
  )


def test_16_bit_png_scaled_to_8_bit():
  rng = np.random.default_rng(0)
  gray16 = (
    (rng.integers(0, 256, (20, 20)) * 257 + rng.integers(-100, 101, (20, 20)))
    .clip(0, 65535)
    .astype(np.uint16)
  )
  out = _decode(_encode(Image.fromarray(gray16)))
  gray8 = np.round(gray16 / 257.0).astype(np.uint8)
  np.testing.assert_allclose(out, _decode(_encode(gray8)), atol=1e-6)
  rgb16 = rng.integers(0, 65536, (20, 20, 3)).astype(np.uint16)
  out = _decode(tf.io.encode_png(rgb16).numpy())
  rgb8 = np.round(rgb16 / 257.0).astype(np.uint8)
  np.testing.assert_allclose(out, _decode(_encode(rgb8)), atol=1e-6)


@pytest.mark.parametrize("fmt", ["JPEG", "BMP", "TIFF"])
def test_other_formats_match_pil(fmt):
  image = Image.fromarray(_smooth_image(40, 40))
  contents = _encode(image, fmt)
  ref = _pil_reference(Image.open(io.BytesIO(contents)))
  np.testing.assert_allclose(_to_8bit(_decode(contents)), _to_8bit(ref), atol=1e-3)


def test_decode_from_path_equals_bytes(tmp_path):
  path = str(tmp_path / "a.png")
  Image.fromarray(_smooth_image(20, 30)).save(path)
  np.testing.assert_array_equal(_decode(path), _decode(open(path, "rb").read()))


def test_mask_nonzero_values_and_threshold():
  mask = np.zeros((32, 32), np.uint8)
  mask[:, :16] = 1  # VisA-style class value: counts as defect.
  mask[0, 31] = 3  # A single pixel shrinks away below 0.5.
  out = input_pipeline.decode_and_resize_mask(_encode(mask), 16).numpy()
  assert out.shape == (16, 16) and out.dtype == np.float32
  expected = np.zeros((16, 16), np.float32)
  expected[:, :8] = 1
  np.testing.assert_array_equal(out, expected)
  # 16-bit mask with tiny values is not lost in the 8-bit conversion.
  out16 = input_pipeline.decode_and_resize_mask(
    _encode(Image.fromarray(mask.astype(np.uint16))), 16
  ).numpy()
  np.testing.assert_array_equal(out16, expected)


def test_mask_matches_reference_binarisation():
  rng = np.random.default_rng(0)
  mask = (
    np.asarray(Image.fromarray(rng.integers(0, 2, (6, 6), np.uint8) * 255).resize((50, 50))) > 127
  )
  mask = mask.astype(np.uint8) * 255
  ref = np.asarray(Image.fromarray(mask).resize((16, 16), Image.BILINEAR))
  ref = (ref / 255.0 > 0.5).astype(np.float32)
  out = input_pipeline.decode_and_resize_mask(_encode(mask), 16).numpy()
  assert np.mean(out != ref) < 0.02


# --- CategoryData ------------------------------------------------------------


def _write(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


def make_tree(root, num_train=7, masks=True):
  """Constant images whose value (10 * index) identifies them after loading."""
  base = os.path.join(root, "cat")
  for i in range(num_train):
    _write(
      os.path.join(base, "train", "good", f"{i:03d}.png"), np.full((20, 24, 3), 10 * i, np.uint8)
    )
  for i in range(2):
    _write(
      os.path.join(base, "test", "good", f"{i:03d}.png"), np.full((20, 24, 3), 100 + i, np.uint8)
    )
  for defect in ("crack", "hole"):
    for i in range(2):
      _write(
        os.path.join(base, "test", defect, f"{i:03d}.png"), np.full((20, 24, 3), 200, np.uint8)
      )
      if masks:
        mask = np.zeros((20, 24), np.uint8)
        mask[:10] = 255
        _write(os.path.join(base, "ground_truth", defect, f"{i:03d}_mask.png"), mask)
  return base


def data_config(root, **kwargs):
  cfg = ml_collections.ConfigDict(
    dict(
      source="folder",
      dataset="mvtec_ad",
      root=root,
      categories=(),
      image_size=SIZE,
      mask_threshold=0.5,
      val_fraction=0.0,
      tfds_data_dir="",
      manual_dir="",
      shuffle_seed=0,
    )
  )
  cfg.update(kwargs)
  return cfg


# Both data sources build CategoryData the same way (tests/test_data_sources.py compares them).
MAKERS = {
  "tf.data": input_pipeline.make_category_data,
  "pillow": lambda cfg, category: source.PillowSource().category_data(cfg, category),
}


def _ids(batch):
  """Image indices of a train batch of constant images."""
  value = _to_8bit(batch)[:, 0, 0, 0]
  return [int(round(v / 10)) for v in value]


class _Images:
  """A method stub: the training batch is the images themselves."""

  @staticmethod
  def make_batch(images, np_rng, category):
    del np_rng, category
    return {"image": images}


def _job(data, batch_size, seed):
  from skrd4ad_jax.training import batches

  return batches.JobInput("cat", "cat", seed, batch_size, _Images(), images=data.train_images)


def test_train_batches_full_deterministic_reshuffled(tmp_path):
  make_tree(str(tmp_path), num_train=6)
  data = input_pipeline.make_category_data(data_config(str(tmp_path)), "cat")
  assert (data.num_train, data.num_val, data.num_test) == (6, 0, 6)
  job = _job(data, 3, seed=1)
  batches = [job.batch(t)["image"] for t in range(8)]
  assert all(b.shape == (3, SIZE, SIZE, 3) and b.dtype == np.float32 for b in batches)
  ids = [_ids(b) for b in batches]
  epochs = [ids[2 * e] + ids[2 * e + 1] for e in range(4)]
  assert all(sorted(e) == list(range(6)) for e in epochs)
  assert len({tuple(e) for e in epochs}) > 1  # Reshuffled each epoch.
  # A pure function of (seed, step): another data object, steps asked out of order.
  again = input_pipeline.make_category_data(data_config(str(tmp_path)), "cat")
  job2 = _job(again, 3, seed=1)
  assert [_ids(job2.batch(t)["image"]) for t in reversed(range(8))] == ids[::-1]
  assert [_ids(_job(data, 3, seed=2).batch(t)["image"]) for t in range(8)] != ids


def test_train_batches_always_full(tmp_path):
  make_tree(str(tmp_path), num_train=5)
  data = input_pipeline.make_category_data(data_config(str(tmp_path)), "cat")
  job = _job(data, 4, seed=0)
  ids = sum((_ids(job.batch(t)["image"]) for t in range(5)), [])  # 20 = 4 epochs.
  assert all(sorted(ids[5 * e : 5 * e + 5]) == list(range(5)) for e in range(4))
  assert _job(data, 12, seed=0).batch(0)["image"].shape == (12, SIZE, SIZE, 3)


@pytest.mark.parametrize("maker", sorted(MAKERS))
def test_eval_covers_every_image_with_padding(tmp_path, maker):
  make_tree(str(tmp_path))
  cfg = data_config(str(tmp_path), val_fraction=0.3)
  data = MAKERS[maker](cfg, "cat")
  splits = folder.scan_category(str(tmp_path), "cat", 0.3, 0)
  assert data.has_masks and (data.num_train, data.num_val) == (5, 2)
  for _ in range(2):  # The second pass reads the decoded images from memory.
    batches = list(data.eval_batches("test", batch_size=4))
    assert len(batches) == 2
    valid = np.concatenate([b["valid"] for b in batches])
    assert valid.tolist() == [True] * 6 + [False] * 2
    paths = np.concatenate([b["image_path"] for b in batches])
    assert paths[:6].tolist() == [s.image_path for s in splits.test]
    assert paths[6:].tolist() == ["", ""]
    assert isinstance(paths[0], str)
    labels = np.concatenate([b["gt_label"] for b in batches])
    assert labels.dtype == np.int32
    assert labels.tolist() == [1, 1, 0, 0, 1, 1, 0, 0]
    defects = np.concatenate([b["defect_type"] for b in batches])
    assert defects[:6].tolist() == ["crack"] * 2 + ["good"] * 2 + ["hole"] * 2
    masks = np.concatenate([b["gt_mask"] for b in batches])
    assert masks.shape == (8, SIZE, SIZE) and masks.dtype == np.float32
    assert set(np.unique(masks)) <= {0.0, 1.0}
    np.testing.assert_array_equal(masks.mean((1, 2)), [0.5, 0.5, 0, 0, 0.5, 0.5, 0, 0])
    images = np.concatenate([b["image"] for b in batches])
    assert images.shape == (8, SIZE, SIZE, 3)
    np.testing.assert_allclose(images[2], input_pipeline.decode_and_resize(paths[2], SIZE).numpy())
    assert not images[6:].any()
  val = list(data.eval_batches("val", batch_size=4))
  assert len(val) == 1 and val[0]["valid"].sum() == 2
  assert val[0]["image_path"][:2].tolist() == [s.image_path for s in splits.val]
  assert not val[0]["gt_label"].any()


@pytest.mark.parametrize("maker", sorted(MAKERS))
def test_no_masks_gives_zero_masks(tmp_path, maker):
  make_tree(str(tmp_path), masks=False)
  data = MAKERS[maker](data_config(str(tmp_path)), "cat")
  assert not data.has_masks
  batch = next(data.eval_batches("test", batch_size=8))
  assert not batch["gt_mask"].any() and batch["gt_label"].sum() == 4
  assert not list(data.eval_batches("val", batch_size=8))  # No hold-out.


@pytest.mark.parametrize("maker", sorted(MAKERS))
def test_decode_failures_are_all_named_before_use(tmp_path, maker):
  base = make_tree(str(tmp_path))
  data = MAKERS[maker](data_config(str(tmp_path)), "cat")
  bad = os.path.join(base, "test", "hole", "000.png")
  with open(bad, "wb") as f:
    f.write(b"\x89PNG broken")
  bad_train = os.path.join(base, "train", "good", "003.png")
  os.remove(bad_train)
  with pytest.raises(folder.DatasetError) as info:
    data.load()
  message = str(info.value)
  # Every bad file of every split in one message, with the split and the fix.
  assert bad in message and bad_train in message and "2 file(s)" in message
  assert "[test]" in message and "[train]" in message and "Fix:" in message
  with pytest.raises(folder.DatasetError, match="cannot be read"):
    list(data.eval_batches("val", batch_size=2))  # nothing half-loaded is used


def test_demo_source_uses_demo_generator(tmp_path, monkeypatch):
  from skrd4ad_jax.data import demo_data

  make_tree(str(tmp_path))
  calls = []

  def fake(root, seed):
    calls.append((root, seed))
    return str(tmp_path)

  monkeypatch.setattr(demo_data, "ensure_demo_dataset", fake)
  cfg = data_config("", source="demo")
  assert input_pipeline.resolve_categories(cfg) == ("cat",)
  data = input_pipeline.make_category_data(cfg, "cat")
  assert data.num_test == 6 and calls[0] == (None, 0)


@pytest.mark.parametrize("maker", sorted(MAKERS))
def test_unknown_source_and_category(tmp_path, maker):
  make_tree(str(tmp_path))
  with pytest.raises(folder.DatasetError, match="source"):
    MAKERS[maker](data_config(str(tmp_path), source="ftp"), "cat")
  with pytest.raises(folder.DatasetError, match="cat"):
    MAKERS[maker](data_config(str(tmp_path)), "dog")
