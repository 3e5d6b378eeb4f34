"""Tests for skrd4ad_jax.visualize (numpy / scikit-image / Pillow only)."""

import numpy as np
from PIL import Image
import pytest
from skimage import segmentation

from skrd4ad_jax import normalization
from skrd4ad_jax.evaluation import visualize

SIZE = 64


def _disk(center, radius, size=SIZE):
  yy, xx = np.mgrid[:size, :size]
  return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2


def _gray_image(size=SIZE, value=128):
  return np.full((size, size, 3), value, np.uint8)


def _bump(size=SIZE):
  yy, xx = np.mgrid[:size, :size]
  return np.exp(-((yy - 30) ** 2 + (xx - 34) ** 2) / (2 * 8.0**2))


class TestColorize:
  def test_shape_and_dtype(self):
    heat = visualize.colorize(np.random.default_rng(0).random((5, 7)))
    assert heat.shape == (5, 7, 3)
    assert heat.dtype == np.uint8

  def test_ends_are_blue_and_red(self):
    heat = visualize.colorize(np.array([[0.0, 1.0]]), vmin=0.0, vmax=1.0)
    cold, hot = heat[0, 0], heat[0, 1]
    assert cold[2] > 100 and cold[0] == 0 and cold[1] == 0
    assert hot[0] > 100 and hot[1] == 0 and hot[2] == 0

  def test_monotone_ends(self):
    # From the cold end blue rises first; towards the hot end red rises and
    # blue vanishes.
    ramp = visualize.colorize(np.linspace(0, 1, 101)[None], 0.0, 1.0)[0]
    red, blue = ramp[:, 0].astype(int), ramp[:, 2].astype(int)
    assert np.all(np.diff(blue[:14]) >= 0) and blue[13] == 255
    assert np.all(np.diff(red[-14:]) <= 0) and red[-14] == 255
    assert np.all(np.diff(red[:88]) >= 0)
    assert np.all(np.diff(blue[13:]) <= 0)
    assert blue[-1] == 0 and red[0] == 0

  def test_clips_outside_range_and_handles_constant_maps(self):
    heat = visualize.colorize(np.array([[-5.0, 0.0, 1.0, 7.0]]), 0.0, 1.0)
    np.testing.assert_array_equal(heat[0, 0], heat[0, 1])
    np.testing.assert_array_equal(heat[0, 2], heat[0, 3])
    constant = visualize.colorize(np.ones((3, 3)))
    assert np.all(constant == constant[0, 0])


class TestDenormalize:
  def test_round_trip(self):
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3)).astype(np.uint8)
    normalised = (
      (image / 255.0 - np.array(normalization.IMAGENET_MEAN)) / np.array(normalization.IMAGENET_STD)
    ).astype(np.float32)
    restored = visualize.denormalize(normalised)
    assert restored.dtype == np.uint8
    np.testing.assert_array_equal(restored, image)

  def test_clips(self):
    out = visualize.denormalize(np.full((2, 2, 3), 100.0))
    assert np.all(out == 255)


class TestOverlayPicture:
  def test_shape_and_dtype(self):
    picture = visualize.overlay_picture(
      _gray_image(),
      _bump(),
      _disk((30, 34), 10),
      _bump() > 0.5,
      score=0.73,
      label="NG",
      threshold=0.5,
      title="carpet/color/000.png",
    )
    assert picture.dtype == np.uint8
    assert picture.ndim == 3 and picture.shape[2] == 3
    assert picture.shape[1] == 3 * SIZE + 2 * visualize.PANEL_GAP
    assert picture.shape[0] > SIZE  # The text line is below the panels.

  def test_contours_are_on_the_mask_boundaries(self):
    gt = _disk((20, 20), 8)
    pred = _disk((44, 44), 8)
    picture = visualize.overlay_picture(
      _gray_image(), np.zeros((SIZE, SIZE)), gt, pred, contour_thickness=1
    )
    panel = picture[:SIZE, :SIZE].astype(int)
    green = (panel[..., 1] == 255) & (panel[..., 0] == 0) & (panel[..., 2] == 0)
    red = (panel[..., 0] == 255) & (panel[..., 1] == 0) & (panel[..., 2] == 0)
    np.testing.assert_array_equal(green, segmentation.find_boundaries(gt, mode="outer") & ~gt)
    np.testing.assert_array_equal(red, segmentation.find_boundaries(pred, mode="inner") & pred)
    # Away from the contours the image is untouched.
    untouched = ~(green | red)
    assert np.all(panel[untouched] == 128)

  def test_prediction_on_overlay_panel_and_heat_panel(self):
    pred = _disk((32, 32), 10)
    heat = _bump()
    picture = visualize.overlay_picture(_gray_image(), heat, None, pred, vmin=0.0, vmax=1.0)
    start = SIZE + visualize.PANEL_GAP
    overlay = picture[:SIZE, start : start + SIZE]
    ring = visualize.contour(pred, 2, inside=True)
    assert np.all(overlay[ring] == 255)
    heat_panel = picture[:SIZE, 2 * start : 2 * start + SIZE]
    np.testing.assert_array_equal(heat_panel, visualize.colorize(heat, 0.0, 1.0))
    # No ground truth given: no green contour anywhere on the image panel.
    image_panel = picture[:SIZE, :SIZE]
    assert not np.any((image_panel[..., 1] == 255) & (image_panel[..., 0] == 0))

  def test_both_contours_visible_where_masks_agree(self):
    mask = _disk((32, 32), 12)
    picture = visualize.overlay_picture(_gray_image(), _bump(), mask, mask)
    panel = picture[:SIZE, :SIZE]
    assert np.any(np.all(panel == visualize.GT_COLOR, axis=-1))
    assert np.any(np.all(panel == visualize.PRED_COLOR, axis=-1))

  def test_resizes_map_and_masks_to_the_image(self):
    picture = visualize.overlay_picture(
      _gray_image(2 * SIZE), _bump(), _disk((30, 34), 10), _disk((30, 34), 10)
    )
    assert picture.shape[1] == 6 * SIZE + 2 * visualize.PANEL_GAP

  def test_text_line_is_drawn(self):
    quiet = visualize.overlay_picture(_gray_image(), _bump())
    loud = visualize.overlay_picture(
      _gray_image(), _bump(), score=0.9, label="NG", threshold=0.5, title="x" * 500
    )
    assert quiet.shape == loud.shape
    band = loud[SIZE:]
    assert np.any(band < 128)  # Some dark text pixels.
    # NG is red.
    assert np.any((band[..., 0] > 150) & (band[..., 1] < 60))

  def test_rejects_float_images(self):
    with pytest.raises(ValueError, match="denormalize"):
      visualize.overlay_picture(np.zeros((SIZE, SIZE, 3)), _bump())


def test_save_picture_creates_directories(tmp_path):
  picture = visualize.overlay_picture(_gray_image(), _bump())
  path = tmp_path / "a" / "b" / "picture.png"
  visualize.save_picture(path, picture)
  with Image.open(path) as saved:
    assert saved.format == "PNG"
    np.testing.assert_array_equal(np.asarray(saved), picture)


class TestPictureGrid:
  def test_layout(self):
    pictures = [np.full((10, 20, 3), i, np.uint8) for i in range(5)]
    grid = visualize.picture_grid(pictures, max_columns=2)
    gap = visualize.PANEL_GAP
    assert grid.dtype == np.uint8
    assert grid.shape == (3 * 10 + 2 * gap, 2 * 20 + gap, 3)
    assert np.all(grid[:10, :20] == 0)
    assert np.all(grid[:10, 20 + gap :] == 1)
    assert np.all(grid[2 * (10 + gap) :, :20] == 4)
    assert np.all(grid[2 * (10 + gap) :, 20 + gap :] == visualize.BACKGROUND)

  def test_mixed_sizes(self):
    grid = visualize.picture_grid(
      [np.zeros((10, 20, 3), np.uint8), np.zeros((15, 5, 3), np.uint8)], max_columns=4
    )
    assert grid.shape == (15, 2 * 20 + visualize.PANEL_GAP, 3)

  def test_empty(self):
    with pytest.raises(ValueError):
      visualize.picture_grid([])
