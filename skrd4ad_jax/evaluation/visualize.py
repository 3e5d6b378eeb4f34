"""Heat-map pictures: image, overlay and anomaly map side by side, contours.

Host-side numpy and Pillow only (no matplotlib, no jax), so the pictures can be
written from the evaluation loop, from inference on a folder of new images
(also by the JAX-free runner of exported models), or handed to a TensorBoard
image summary via ``picture_grid``. scikit-image is imported only to resize a
map or mask whose size differs from the image's.

A picture is one horizontal strip::

  +-----------------+-----------------+-----------------+
  | image           | image + heat    | heat map        |
  | GT contour      | (alpha blend)   | (vmin..vmax)    |
  | pred contour    | pred contour    |                 |
  +-----------------+-----------------+-----------------+
  | title  score 0.734  threshold 0.500  NG  map [vmin, vmax] |
  +-------------------------------------------------------+

Colours: ground truth green, prediction red on the image panel. The prediction
is white on the overlay panel because the jet colormap is itself red where the
map is high, i.e. exactly where a predicted region lies.
"""

from __future__ import annotations

from collections.abc import Sequence
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from skrd4ad_jax import faults, normalization

GT_COLOR = (0, 255, 0)
PRED_COLOR = (255, 0, 0)
PRED_COLOR_ON_HEAT = (255, 255, 255)
OK_COLOR = (0, 140, 0)
NG_COLOR = (210, 0, 0)
TEXT_COLOR = (0, 0, 0)
BACKGROUND = 255  # Separators and the text band are white.
PANEL_GAP = 4  # Pixels between panels.
HEAT_ALPHA = 0.5  # Weight of the heat map in the overlay panel.


def colorize(
  anomaly_map: np.ndarray, vmin: float | None = None, vmax: float | None = None
) -> np.ndarray:
  """Maps an anomaly map to RGB with a jet-like colormap.

  Low values are dark blue, high values dark red (blue, cyan, yellow, red in
  between), like matplotlib's ``jet`` and OpenCV's ``COLORMAP_JET`` that the
  RD4AD scripts use.

  Args:
    anomaly_map: float map, ``[H, W]`` (any shape works; a channel axis of
      size 3 is appended).
    vmin: value drawn as the coldest colour; defaults to the map's minimum.
      Pass a fixed value (e.g. the test set's minimum) to make pictures of one
      category comparable.
    vmax: value drawn as the hottest colour; defaults to the map's maximum.

  Returns:
    uint8 array ``[H, W, 3]``. NaN values are drawn as ``vmin``.
  """
  values = np.asarray(anomaly_map, dtype=np.float64)
  finite = values[np.isfinite(values)]
  if vmin is None:
    vmin = float(finite.min()) if finite.size else 0.0
  if vmax is None:
    vmax = float(finite.max()) if finite.size else 1.0
  span = float(vmax) - float(vmin)
  if span <= 0:  # A constant map: everything maps to the cold end.
    span = 1.0
  x = np.clip((values - float(vmin)) / span, 0.0, 1.0)
  x = np.nan_to_num(x, nan=0.0)
  # The piecewise-linear jet: each channel is a tent of width 1.5 (in units
  # of x / 4) centred at 0.25 (blue), 0.5 (green) and 0.75 (red).
  rgb = np.stack(
    [
      np.clip(1.5 - np.abs(4.0 * x - 3.0), 0.0, 1.0),
      np.clip(1.5 - np.abs(4.0 * x - 2.0), 0.0, 1.0),
      np.clip(1.5 - np.abs(4.0 * x - 1.0), 0.0, 1.0),
    ],
    axis=-1,
  )
  return np.round(rgb * 255.0).astype(np.uint8)


def denormalize(
  image_normalised: np.ndarray,
  mean: Sequence[float] = normalization.IMAGENET_MEAN,
  std: Sequence[float] = normalization.IMAGENET_STD,
) -> np.ndarray:
  """Undoes mean/std normalisation and returns a displayable uint8 image.

  Args:
    image_normalised: float image ``[..., H, W, 3]`` normalised as
      ``(x / 255 - mean) / std``.
    mean: per-channel mean used for the normalisation.
    std: per-channel standard deviation used for the normalisation.

  Returns:
    uint8 array of the same shape, values clipped to ``[0, 255]``.
  """
  image = np.asarray(image_normalised, dtype=np.float64)
  image = image * np.asarray(std, np.float64) + np.asarray(mean, np.float64)
  return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def _cross_neighbourhood(region: np.ndarray, reduce) -> np.ndarray:
  """``reduce`` (np.logical_or / np.logical_and) of a pixel and its 4 neighbours.

  The border is replicated, as scikit-image's grey dilation / erosion
  (``mode='reflect'``, one pixel deep) do.
  """
  p = np.pad(region, 1, mode="edge")
  out = reduce(p[1:-1, 1:-1], p[:-2, 1:-1])
  for neighbour in (p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]):
    out = reduce(out, neighbour)
  return out


def find_boundaries(region: np.ndarray, mode: str) -> np.ndarray:
  """``skimage.segmentation.find_boundaries`` of a bool mask, modes 'inner' and 'outer'.

  Connectivity 1: 'inner' are the mask pixels with a background 4-neighbour,
  'outer' the background pixels with a mask 4-neighbour.
  """
  region = np.asarray(region, bool)
  if mode == "inner":
    return region & ~_cross_neighbourhood(region, np.logical_and)
  if mode == "outer":
    return ~region & _cross_neighbourhood(region, np.logical_or)
  raise ValueError(f"mode must be 'inner' or 'outer', got {mode!r}.")


def contour(mask: np.ndarray, thickness: int = 2, inside: bool = False) -> np.ndarray:
  """Returns the boundary ring of a binary mask.

  Args:
    mask: ``[H, W]`` binary mask (non-zero is foreground).
    thickness: ring width in pixels.
    inside: draw the ring on the mask's own pixels (``True``) or on the
      background pixels that touch it (``False``). Drawing the ground truth
      outside and the prediction inside keeps both visible where they agree.

  Returns:
    bool array ``[H, W]``.
  """
  region = np.asarray(mask) != 0
  ring = np.zeros_like(region)
  for _ in range(max(int(thickness), 1)):
    if inside:
      step = find_boundaries(region, mode="inner") & region
      region = region & ~step
    else:
      step = find_boundaries(region, mode="outer") & ~region
      region = region | step
    ring |= step
  return ring


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(
      f"overlay_picture expects a uint8 image, got {image.dtype}; convert a "
      "normalised model input with visualize.denormalize first."
    )
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(f"expected an image [H, W, 3], got shape {image.shape}.")
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  return image[..., :3]


def _fit(
  array: np.ndarray | None, shape: tuple[int, int], order: int, name: str
) -> np.ndarray | None:
  """Resizes a map or mask to the image size (maps often come at 256x256)."""
  if array is None:
    return None
  array = np.asarray(array)
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim != 2:
    raise ValueError(f"{name} must be [H, W], got shape {array.shape}.")
  if array.shape == shape:
    return array
  from skimage import transform  # Only here: predict and the runner never resize.

  if order == 0:
    return transform.resize(array.astype(np.float32), shape, order=0, anti_aliasing=False) >= 0.5
  return transform.resize(
    array.astype(np.float64), shape, order=order, anti_aliasing=False, preserve_range=True
  )


def _font(size: int) -> ImageFont.ImageFont:
  try:
    return ImageFont.load_default(size=size)
  except (TypeError, OSError, ImportError):  # Pillow without FreeType.
    return ImageFont.load_default()


def _format_value(value: float) -> str:
  return f"{value:.4g}"


def _text_items(score, threshold, label, vmin, vmax, title):
  """The text line as (text, colour) pieces, drawn left to right."""
  items = []
  if title:
    items.append((str(title), TEXT_COLOR))
  if score is not None:
    items.append((f"score {_format_value(float(score))}", TEXT_COLOR))
  if threshold is not None:
    items.append((f"threshold {_format_value(float(threshold))}", TEXT_COLOR))
  if label is not None:
    color = NG_COLOR if str(label).upper() == "NG" else OK_COLOR
    items.append((str(label), color))
  items.append((f"map [{_format_value(vmin)}, {_format_value(vmax)}]", TEXT_COLOR))
  return items


def _draw_text_band(width: int, items, font_size: int, title_first: bool) -> np.ndarray:
  font = _font(font_size)
  probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  _, top, _, bottom = probe.textbbox((0, 0), "Ag|[]", font=font)
  height = int(bottom - top) + 2 * max(font_size // 3, 2)
  band = Image.new("RGB", (width, height), (BACKGROUND,) * 3)
  draw = ImageDraw.Draw(band)
  margin = float(max(font_size // 2, 2))
  separator = "   "
  texts = [(separator if i else "") + text for i, (text, _) in enumerate(items)]
  if title_first and texts:
    # A long title (an image path) gives way to the numbers and loses its
    # beginning, the least informative part of a path.
    rest = sum(draw.textlength(t, font=font) for t in texts[1:])
    room = width - 2 * margin - rest
    title = texts[0]
    if draw.textlength(title, font=font) > room:
      while len(title) > 1 and draw.textlength("..." + title, font=font) > room:
        title = title[1:]
      texts[0] = "..." + title
  x = margin
  y = (height - (bottom - top)) / 2 - top
  for text, (_, color) in zip(texts, items):
    if x >= width:
      break
    draw.text((x, y), text, fill=color, font=font)
    x += draw.textlength(text, font=font)
  return np.asarray(band, dtype=np.uint8)


def overlay_picture(
  image_uint8: np.ndarray,
  anomaly_map: np.ndarray,
  gt_mask: np.ndarray | None = None,
  pred_mask: np.ndarray | None = None,
  score: float | None = None,
  label: str | None = None,
  threshold: float | None = None,
  vmin: float | None = None,
  vmax: float | None = None,
  title: str | None = None,
  contour_thickness: int = 2,
) -> np.ndarray:
  """Draws image, heat-map overlay and heat map side by side, with a text line.

  Panels, left to right: (a) the image with the ground-truth contour (green,
  just outside the defect) and the predicted contour (red, just inside the
  predicted region); (b) the heat map alpha-blended on the image with the
  predicted contour (white); (c) the heat map alone. Below them a text line
  with the title, score, threshold, OK/NG label and the heat-map range.

  Args:
    image_uint8: the image ``[H, W, 3]`` (or ``[H, W]``) uint8; use
      ``denormalize`` for a normalised model input.
    anomaly_map: float map ``[h, w]``; resized (bilinear) to the image size
      when it differs.
    gt_mask: optional ground-truth mask ``[h, w]`` (non-zero = defect);
      resized (nearest) when it differs.
    pred_mask: optional predicted defect mask ``[h, w]`` bool (e.g.
      ``anomaly_map >= pixel_threshold``).
    score: optional image score ``pred_score``.
    label: optional ``'OK'`` / ``'NG'``; NG is drawn red, anything else green.
    threshold: optional image threshold the score was compared with.
    vmin: heat-map value drawn coldest; defaults to the map's minimum. Pass
      the same ``vmin``/``vmax`` for every picture of a category to make the
      colours comparable across images.
    vmax: heat-map value drawn hottest; defaults to the map's maximum.
    title: optional text first on the line (e.g. category and file name);
      shortened from the left when it does not fit.
    contour_thickness: contour width in pixels.

  Returns:
    uint8 array ``[H + text_height, 3 * W + 2 * PANEL_GAP, 3]``.
  """
  image = _as_rgb_uint8(image_uint8)
  shape = image.shape[:2]
  heat_values = _fit(anomaly_map, shape, order=1, name="anomaly_map")
  gt = _fit(gt_mask, shape, order=0, name="gt_mask")
  pred = _fit(pred_mask, shape, order=0, name="pred_mask")

  finite = heat_values[np.isfinite(heat_values)]
  if vmin is None:
    vmin = float(finite.min()) if finite.size else 0.0
  if vmax is None:
    vmax = float(finite.max()) if finite.size else 1.0
  heat = colorize(heat_values, vmin, vmax)

  with_contours = image.copy()
  blended = np.round(
    (1.0 - HEAT_ALPHA) * image.astype(np.float64) + HEAT_ALPHA * heat.astype(np.float64)
  ).astype(np.uint8)
  if gt is not None:
    with_contours[contour(gt, contour_thickness, inside=False)] = GT_COLOR
  if pred is not None:
    pred_ring = contour(pred, contour_thickness, inside=True)
    with_contours[pred_ring] = PRED_COLOR
    blended[pred_ring] = PRED_COLOR_ON_HEAT

  height, width = shape
  gap = np.full((height, PANEL_GAP, 3), BACKGROUND, np.uint8)
  strip = np.concatenate([with_contours, gap, blended, gap, heat], axis=1)

  font_size = max(10, height // 20)
  items = _text_items(score, threshold, label, float(vmin), float(vmax), title)
  band = _draw_text_band(strip.shape[1], items, font_size, title_first=bool(title))
  return np.concatenate([strip, band], axis=0)


def save_picture(path: str | os.PathLike, picture: np.ndarray) -> None:
  """Writes a picture as PNG, creating missing directories.

  Args:
    path: file path; written as PNG whatever the suffix.
    picture: uint8 ``[H, W, 3]`` or ``[H, W]`` array.
  """
  picture = np.asarray(picture)
  if picture.dtype != np.uint8:
    raise ValueError(f"save_picture expects uint8, got {picture.dtype}.")
  directory = os.path.dirname(os.fspath(path))
  if directory:
    os.makedirs(directory, exist_ok=True)
  faults.point("picture_write", path=path)
  Image.fromarray(picture).save(path, format="PNG")


def picture_grid(pictures: Sequence[np.ndarray], max_columns: int = 4) -> np.ndarray:
  """Tiles pictures row by row into one image, e.g. for a TensorBoard summary.

  Pictures of different sizes are top-left aligned in cells of the largest
  size; the rest of the cell is white. For clu's ``write_images`` add a
  leading axis: ``writer.write_images(step, {"test": grid[None]})``.

  Args:
    pictures: uint8 arrays ``[h_i, w_i, 3]`` (or ``[h_i, w_i]``).
    max_columns: number of pictures per row at most.

  Returns:
    uint8 array ``[rows * (H + gap) - gap, columns * (W + gap) - gap, 3]``.
  """
  if not len(pictures):
    raise ValueError("picture_grid needs at least one picture.")
  if max_columns < 1:
    raise ValueError(f"max_columns must be >= 1, got {max_columns}.")
  pictures = [_as_rgb_uint8(p) for p in pictures]
  cell_h = max(p.shape[0] for p in pictures)
  cell_w = max(p.shape[1] for p in pictures)
  columns = min(max_columns, len(pictures))
  rows = -(-len(pictures) // columns)
  grid = np.full(
    (rows * (cell_h + PANEL_GAP) - PANEL_GAP, columns * (cell_w + PANEL_GAP) - PANEL_GAP, 3),
    BACKGROUND,
    np.uint8,
  )
  for i, picture in enumerate(pictures):
    top = (i // columns) * (cell_h + PANEL_GAP)
    left = (i % columns) * (cell_w + PANEL_GAP)
    grid[top : top + picture.shape[0], left : left + picture.shape[1]] = picture
  return grid
