"""Synthetic anomalies on the host: MRKD's ILM and RD with Expert's DRAEM (numpy only)."""

import math

import numpy as np
from PIL import Image
import pytest
from scipy import ndimage

from skrd4ad_jax import normalization
from skrd4ad_jax.methods.mrkd import ilm
from skrd4ad_jax.methods.rd_expert import draem

SIZE = 64


def normalised_images(n=4, size=SIZE, seed=0):
  """ImageNet-normalised float32 [n, size, size, 3] with smooth structure."""
  rng = np.random.default_rng(seed)
  rgb = ndimage.gaussian_filter(rng.uniform(0, 1, (n, size, size, 3)), (0, 2, 2, 0))
  rgb = (rgb - rgb.min()) / np.ptp(rgb)
  return normalization.normalize(rgb)


def object_image(size=SIZE, background=230.0, obj=40.0):
  """0-255 RGB: a dark disc on a bright background, and its disc mask."""
  yy, xx = np.mgrid[:size, :size]
  disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
  rng = np.random.default_rng(1)
  rgb = np.where(disc[..., None], obj, background) + rng.uniform(-8, 8, (size, size, 3))
  return np.clip(rgb, 0, 255), disc


# -- ILM ----------------------------------------------------------------------


@pytest.mark.parametrize(
  "category", ["carpet", "grid", "cable", "bottle", "hazelnut", "toothbrush", "brick"]
)
def test_ilm_mask_marks_exactly_the_changed_pixels(category):
  images = normalised_images()
  if ilm.ilm_params(category).background is not None:
    rgb, _ = object_image()
    images = np.stack([normalization.normalize(rgb / 255.0)] * 4)
  aug, masks = ilm.ilm_batch(images, np.random.default_rng(3), category)
  assert aug.shape == images.shape and aug.dtype == np.float32
  assert masks.shape == images.shape[:3]
  changed = np.any(aug != images, axis=-1)
  np.testing.assert_array_equal(masks.astype(bool), changed)
  assert changed.any()


def test_ilm_pastes_pixels_of_the_same_image():
  images = normalised_images(n=2)
  aug, masks = ilm.ilm_batch(images, np.random.default_rng(0), "carpet")
  for b in range(2):
    original = {tuple(p) for p in images[b].reshape(-1, 3)}
    pasted = aug[b][masks[b].astype(bool)]
    assert all(tuple(p) in original for p in pasted)


def test_ilm_is_deterministic_given_the_generator():
  images = normalised_images()
  a1, m1 = ilm.ilm_batch(images, np.random.default_rng(11), "carpet")
  a2, m2 = ilm.ilm_batch(images, np.random.default_rng(11), "carpet")
  a3, _ = ilm.ilm_batch(images, np.random.default_rng(12), "carpet")
  np.testing.assert_array_equal(a1, a2)
  np.testing.assert_array_equal(m1, m2)
  assert np.any(a1 != a3)


def test_ilm_background_rule_skips_images_without_object():
  flat = np.full((SIZE, SIZE, 3), 200.0)  # exactly the bottle background
  images = np.stack([normalization.normalize(flat / 255.0)] * 2)
  aug, masks = ilm.ilm_batch(images, np.random.default_rng(0), "bottle")
  np.testing.assert_array_equal(aug, images)
  assert not masks.any()


def test_ilm_background_rule_pastes_onto_the_object():
  rgb, disc = object_image(background=200.0)  # bottle: background 200, threshold 60
  images = np.stack([normalization.normalize(rgb / 255.0)] * 8)
  _, masks = ilm.ilm_batch(images, np.random.default_rng(5), "bottle")
  # Only object pixels of the source or destination are replaced, and the
  # destination overlaps the object: most changed pixels lie on the disc.
  assert masks.any()
  assert masks[:, disc].sum() > 0.5 * masks.sum()


def test_ilm_table_and_defaults():
  assert len(ilm.ILM_PARAMS) == 15
  assert ilm.ilm_params("toothbrush").width_bounds_pct == ((0.01, 0.01), (0.01, 0.01))
  assert ilm.ilm_params("bottle").background == (200, 60)
  assert ilm.ilm_params("carpet").num_patches == 4
  assert ilm.ilm_params("pcb1") is ilm.DEFAULT_ILM_PARAMS


def test_majority_filter_is_a_binary_median_filter():
  mask = np.random.default_rng(0).uniform(size=(40, 50)) > 0.45
  expected = ndimage.median_filter(mask.astype(np.uint8), size=7, mode="nearest")
  np.testing.assert_array_equal(ilm.majority_filter(mask, 7), expected.astype(bool))


# -- DRAEM --------------------------------------------------------------------


def official_rand_perlin_2d_np(shape, res, rng):
  """URD utils/perlin.py:rand_perlin_2d_np (np.random replaced by ``rng``)."""
  delta = (res[0] / shape[0], res[1] / shape[1])
  d = (shape[0] // res[0], shape[1] // res[1])
  grid = np.mgrid[0 : res[0] : delta[0], 0 : res[1] : delta[1]].transpose(1, 2, 0) % 1
  angles = 2 * math.pi * rng.random((res[0] + 1, res[1] + 1))
  gradients = np.stack((np.cos(angles), np.sin(angles)), axis=-1)
  tile = lambda s1, s2: np.repeat(
    np.repeat(gradients[s1[0] : s1[1], s2[0] : s2[1]], d[0], 0), d[1], 1
  )
  dot = lambda g, s: (np.stack((grid[..., 0] + s[0], grid[..., 1] + s[1]), -1) * g).sum(-1)
  n00 = dot(tile([0, -1], [0, -1]), [0, 0])
  n10 = dot(tile([1, None], [0, -1]), [-1, 0])
  n01 = dot(tile([0, -1], [1, None]), [0, -1])
  n11 = dot(tile([1, None], [1, None]), [-1, -1])
  t = 6 * grid**5 - 15 * grid**4 + 10 * grid**3
  lerp = lambda x, y, w: (y - x) * w + x
  return math.sqrt(2) * lerp(lerp(n00, n10, t[..., 0]), lerp(n01, n11, t[..., 0]), t[..., 1])


@pytest.mark.parametrize("res", [(1, 1), (2, 32), (8, 4), (32, 32)])
def test_perlin_noise_matches_the_official_function(res):
  ours = draem.perlin_noise((64, 64), res, np.random.default_rng(7))
  ref = official_rand_perlin_2d_np((64, 64), res, np.random.default_rng(7))
  np.testing.assert_allclose(ours, ref, atol=1e-12)


def test_perlin_noise_any_size():
  noise = draem.perlin_noise((60, 45), (8, 4), np.random.default_rng(0))
  assert noise.shape == (60, 45) and np.isfinite(noise).all()


@pytest.mark.parametrize("category", ["carpet", "bottle", "capsule", "brick"])
def test_draem_mask_marks_exactly_the_changed_pixels(category):
  images = normalised_images(n=6)
  textures = draem.TextureSource("", SIZE)
  aug, masks = draem.draem_batch(images, np.random.default_rng(2), textures, category)
  assert aug.shape == images.shape and aug.dtype == np.float32
  assert masks.shape == images.shape[:3] and masks.dtype == np.float32
  changed = np.any(aug != images, axis=-1)
  np.testing.assert_array_equal(masks.astype(bool), changed)
  assert changed.any()


def test_draem_blend_formula_in_normalised_space():
  rng = np.random.default_rng(0)
  x01 = rng.uniform(0, 1, (SIZE, SIZE, 3))
  t01 = rng.uniform(0, 1, (SIZE, SIZE, 3))
  mask = rng.uniform(size=(SIZE, SIZE)) > 0.5
  beta = 0.3
  ours = draem.blend(normalization.normalize(x01), normalization.normalize(t01), mask, beta)
  m = mask[..., None]
  reference = x01 * (1 - m) + (1 - beta) * t01 * m + beta * x01 * m  # URD, in [0, 1]
  np.testing.assert_allclose(ours, normalization.normalize(reference), atol=1e-5)


def test_draem_is_deterministic_given_the_generator():
  images = normalised_images()
  textures = draem.TextureSource("", SIZE)
  a1, m1 = draem.draem_batch(images, np.random.default_rng(4), textures, "carpet")
  a2, m2 = draem.draem_batch(images, np.random.default_rng(4), textures, "carpet")
  a3, _ = draem.draem_batch(images, np.random.default_rng(5), textures, "carpet")
  np.testing.assert_array_equal(a1, a2)
  np.testing.assert_array_equal(m1, m2)
  assert np.any(a1 != a3)


def test_foreground_restriction():
  rgb, disc = object_image()  # dark disc on a bright background
  images = np.stack([normalization.normalize(rgb / 255.0)] * 16)
  textures = draem.TextureSource("", SIZE)
  for category in ("bottle", "capsule"):  # grabCut substitute / inverse Otsu
    fg = draem.foreground_mask(rgb, category, "otsu")
    assert (fg == disc).mean() > 0.98
    _, masks = draem.draem_batch(images, np.random.default_rng(0), textures, category, "otsu")
    assert masks.any() and not masks[:, ~fg].any()
  # A bright object on a dark background: grabCut's prior (frame = background) flips polarity.
  inverted, _ = object_image(background=20.0, obj=220.0)
  assert (draem.foreground_mask(inverted, "bottle", "otsu") == disc).mean() > 0.98
  assert draem.foreground_mask(rgb, "carpet", "otsu") is None
  assert draem.foreground_mask(rgb, "transistor", "otsu") is None
  assert draem.foreground_mask(rgb, "bottle", "none") is None
  _, masks = draem.draem_batch(images, np.random.default_rng(0), textures, "bottle", "none")
  assert masks[:, ~disc].any()
  with pytest.raises(ValueError, match="config.rd_expert.foreground"):
    draem.draem_batch(images, np.random.default_rng(0), textures, "bottle", "grabcut")


def test_default_texture_bank():
  bank = draem.default_textures(SIZE)
  assert bank.shape == (len(draem.PHOTO_TEXTURES) + draem.NUM_PROCEDURAL_TEXTURES, SIZE, SIZE, 3)
  assert bank.dtype == np.uint8
  assert not {"brick", "grass", "gravel"} & set(draem.PHOTO_TEXTURES)  # the demo categories
  assert all(np.ptp(t) > 50 for t in bank)  # no blank texture
  np.testing.assert_array_equal(bank, draem.default_textures.__wrapped__(SIZE))


def test_texture_dir(tmp_path):
  for i, sub in enumerate(["banded", "dotted"]):
    (tmp_path / sub).mkdir()
    rgb = np.full((40, 30, 3), 60 * (i + 1), np.uint8)
    Image.fromarray(rgb).save(tmp_path / sub / f"{sub}_0001.jpg")
  source = draem.TextureSource(str(tmp_path), SIZE)
  assert len(source) == 2
  tex = source.sample(np.random.default_rng(0))
  assert tex.shape == (SIZE, SIZE, 3) and tex.dtype == np.uint8
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="config.rd_expert.texture_dir"):
    len(draem.TextureSource(str(tmp_path / "empty"), SIZE))
