"""DRAEM-style synthetic anomalies of RD with Expert (URD ``utils/perlin.py``).

Per image (``dataset_noise.py:MVTecADNoiseDataset.__getitem__``):

1. Perlin noise at scales (2^tx, 2^ty), tx, ty ~ U{0..5}, rotated by
   U(-90, 90) degrees (bilinear, zero fill), thresholded at 0.5 -> mask m;
2. object categories: m <- m * foreground;
3. a texture image t (DTD in the official code), resized to the image size;
4. beta ~ U(0, 0.8); x~ = x (1 - m) + (1 - beta) t m + beta x m.

The blend is affine with weights summing to one, so it is done directly in
ImageNet-normalised space with the texture normalised the same way. The mask
returned is m restricted to the pixels that actually changed (the official
mask is m; they differ only where texture and image agree exactly).

Texture source (``config.rd_expert.texture_dir``): a folder of images searched
recursively (DTD's ``dtd/images`` works as is), or ``''`` for the offline bank:
five colour photos that ship with scikit-image (coffee, chelsea, astronaut,
rocket, immunohistochemistry; not brick/grass/gravel, the demo categories) and
six procedural textures generated from a fixed seed.

Foreground (``config.rd_expert.foreground``): the official code restricts m with
OpenCV -- ``cv2.grabCut`` (rect = image minus a 1-pixel frame, 11 iterations)
for bottle, cable, hazelnut, metal_nut, pill, toothbrush, zipper (and every
VisA class), inverse Otsu for capsule and screw, nothing for textures and
transistor. There is no OpenCV in this stack: ``'otsu'`` keeps the inverse Otsu
rule of capsule / screw and replaces grabCut by Otsu whose polarity follows
grabCut's prior (the class covering most of the 1-pixel frame is background);
``'none'`` disables the restriction.
"""

from __future__ import annotations

import functools
import math
import os
import pathlib

import numpy as np
from PIL import Image
from scipy import ndimage

from skrd4ad_jax import categories, normalization

FOREGROUND_MODES = ("otsu", "none")
# URD train.py / dataset_noise.py: Otsu (inverse) for these, grabCut for the rest
# of the object classes; VisA (train_visa.py) uses grabCut for every class.
OTSU_INVERSE_CATEGORIES = ("capsule", "screw")
GRABCUT_CATEGORIES = (
  "bottle",
  "cable",
  "hazelnut",
  "metal_nut",
  "pill",
  "toothbrush",
  "zipper",
  *categories.VISA,
)
PHOTO_TEXTURES = ("coffee", "chelsea", "astronaut", "rocket", "immunohistochemistry")
NUM_PROCEDURAL_TEXTURES = 6
TEXTURE_SEED = 20250101  # the offline bank is the same on every machine
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
BETA_MAX = 0.8
PERLIN_SCALES = (0, 6)  # tx, ty ~ U{0..5}
PERLIN_THRESHOLD = 0.5


# -- Perlin masks ---------------------------------------------------------------


def _fade(t: np.ndarray) -> np.ndarray:
  return 6 * t**5 - 15 * t**4 + 10 * t**3


def perlin_noise(
  shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
  """``rand_perlin_2d_np``: 2-D Perlin noise [H, W] with ``res`` cells per axis.

  Same numbers as the official function (which tiles the corner gradients with
  ``np.repeat``), computed by gathering each pixel's cell corners. Sizes that
  ``res`` does not divide behave as the next multiple, cropped (the official
  function requires divisibility).
  """
  angles = 2 * math.pi * rng.random((res[0] + 1, res[1] + 1))
  gx, gy = np.cos(angles), np.sin(angles)

  def axis(a):
    padded = int(math.ceil(shape[a] / res[a]) * res[a])
    pos = np.arange(shape[a]) * res[a] / padded
    cell = np.floor(pos).astype(np.intp)
    return cell, pos - cell  # cell index, position inside the cell in [0, 1)

  ci, fi = axis(0)
  cj, fj = axis(1)
  fx, fy = fi[:, None], fj[None, :]

  def corner(di, dj):  # dot(gradient at corner (di, dj), offset from that corner)
    i, j = ci[:, None] + di, cj[None, :] + dj
    return (fx - di) * gx[i, j] + (fy - dj) * gy[i, j]

  n00, n10, n01, n11 = corner(0, 0), corner(1, 0), corner(0, 1), corner(1, 1)
  tx, ty = _fade(fx), _fade(fy)
  n0 = n00 + tx * (n10 - n00)
  n1 = n01 + tx * (n11 - n01)
  return math.sqrt(2) * (n0 + ty * (n1 - n0))


def perlin_mask(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
  """The thresholded, rotated Perlin mask [H, W] bool of ``perlin.py:perlin_noise``."""
  tx = int(rng.integers(*PERLIN_SCALES))
  ty = int(rng.integers(*PERLIN_SCALES))
  noise = perlin_noise(shape, (2**tx, 2**ty), rng)
  angle = float(rng.uniform(-90.0, 90.0))
  # imgaug Affine(rotate=...): about the centre, bilinear, constant 0 outside.
  noise = ndimage.rotate(noise, angle, reshape=False, order=1, mode="constant", cval=0.0)
  return noise > PERLIN_THRESHOLD


# -- foreground -------------------------------------------------------------------


def _otsu_threshold(gray: np.ndarray) -> float:
  from skimage.filters import threshold_otsu

  if gray.max() == gray.min():
    return float(gray.max())
  return float(threshold_otsu(gray))


def foreground_mask(rgb255: np.ndarray, category: str, mode: str = "otsu") -> np.ndarray | None:
  """Where anomalies may be placed: [H, W] bool, or None for the whole image.

  Args:
    rgb255: [H, W, 3] RGB in [0, 255].
    category: selects the official rule (inverse Otsu / grabCut / none).
    mode: 'otsu' (grabCut replaced by border-polarity Otsu) or 'none'.
  """
  if mode not in FOREGROUND_MODES:
    raise ValueError(
      f"Unknown config.rd_expert.foreground {mode!r}; choose one of {FOREGROUND_MODES}."
    )
  if mode == "none" or category not in OTSU_INVERSE_CATEGORIES + GRABCUT_CATEGORIES:
    return None
  # cv2.COLOR_BGR2GRAY weights.
  gray = rgb255[..., 0] * 0.299 + rgb255[..., 1] * 0.587 + rgb255[..., 2] * 0.114
  dark = gray <= _otsu_threshold(gray)
  if category in OTSU_INVERSE_CATEGORIES:
    return dark  # cv2.THRESH_BINARY_INV + THRESH_OTSU
  frame = np.ones_like(dark)
  frame[1:-1, 1:-1] = False
  # grabCut's rectangle makes the frame background: the class covering most of
  # the frame is the background.
  return ~dark if dark[frame].mean() > 0.5 else dark


# -- textures -------------------------------------------------------------------


def _resize_rgb(image: np.ndarray, size: int) -> np.ndarray:
  """PIL bilinear resize to [size, size, 3] uint8 (URD resizes DTD this way)."""
  pil = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
  return np.asarray(pil.resize((size, size), Image.BILINEAR), np.uint8)


def procedural_texture(index: int, size: int, rng: np.random.Generator) -> np.ndarray:
  """One of ``NUM_PROCEDURAL_TEXTURES`` colour textures [size, size, 3] uint8."""
  yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
  colours = rng.uniform(0, 1, (2, 3))
  kind = index % NUM_PROCEDURAL_TEXTURES
  if kind == 0:  # fractal colour Perlin noise
    out = np.zeros((size, size, 3))
    for c in range(3):
      for octave in range(4):
        res = 2 ** (octave + 1)
        out[..., c] += 0.5**octave * perlin_noise((size, size), (res, res), rng)
    weight = (out - out.min()) / (np.ptp(out) + 1e-8)
  elif kind == 1:  # oriented stripes
    theta, freq = rng.uniform(0, math.pi), rng.uniform(6, 20)
    weight = 0.5 + 0.5 * np.sin(2 * math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta)))
  elif kind == 2:  # rotated checkerboard
    theta, cells = rng.uniform(0, math.pi), rng.uniform(4, 12)
    u = xx * math.cos(theta) - yy * math.sin(theta)
    v = xx * math.sin(theta) + yy * math.cos(theta)
    weight = ((np.floor(u * cells) + np.floor(v * cells)) % 2).astype(np.float64)
  elif kind == 3:  # Voronoi cells with random shades
    seeds = rng.uniform(0, 1, (48, 2))
    shades = rng.uniform(0, 1, 48)
    dist = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
    weight = shades[np.argmin(dist, axis=-1)]
  elif kind == 4:  # blurred speckle
    weight = ndimage.gaussian_filter(rng.uniform(0, 1, (size, size)), size / 96.0 + 0.5)
    weight = (weight - weight.min()) / (np.ptp(weight) + 1e-8)
  else:  # concentric rings around a random centre
    cy, cx, freq = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(8, 24)
    weight = 0.5 + 0.5 * np.cos(2 * math.pi * freq * np.hypot(yy - cy, xx - cx))
  if kind == 0:
    rgb = weight  # already three independent channels
  else:
    rgb = colours[0] * (1 - weight[..., None]) + colours[1] * weight[..., None]
  return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=4)
def default_textures(size: int) -> np.ndarray:
  """The offline texture bank [N, size, size, 3] uint8 (photos, then procedural)."""
  import skimage.data

  bank = [_resize_rgb(getattr(skimage.data, name)()[..., :3], size) for name in PHOTO_TEXTURES]
  rng = np.random.default_rng(TEXTURE_SEED)
  bank += [procedural_texture(i, size, rng) for i in range(NUM_PROCEDURAL_TEXTURES)]
  out = np.stack(bank)
  out.setflags(write=False)
  return out


def list_texture_files(texture_dir: str | os.PathLike) -> list[str]:
  """Image files under ``texture_dir`` (recursive, sorted)."""
  root = pathlib.Path(texture_dir).expanduser()
  if not root.is_dir():
    raise FileNotFoundError(
      f"config.rd_expert.texture_dir={str(texture_dir)!r} is not a "
      "directory (use '' for the offline default textures)."
    )
  files = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
  if not files:
    raise FileNotFoundError(
      f"No images ({', '.join(IMAGE_SUFFIXES)}) under "
      f"config.rd_expert.texture_dir={str(texture_dir)!r}."
    )
  return files


@functools.lru_cache(maxsize=512)
def _load_texture(path: str, size: int) -> np.ndarray:
  with Image.open(path) as im:
    return _resize_rgb(np.asarray(im.convert("RGB")), size)


class TextureSource:
  """Texture images for the blend, from a folder or the offline bank.

  Attributes:
    texture_dir: folder searched recursively, or '' for ``default_textures``.
    size: side length the textures are resized to.
  """

  def __init__(self, texture_dir: str, size: int):
    self.texture_dir = str(texture_dir or "")
    self.size = int(size)
    self._files: list[str] | None = None

  def __len__(self) -> int:
    if self.texture_dir:
      return len(self.files)
    return len(default_textures(self.size))

  @property
  def files(self) -> list[str]:
    if self._files is None:
      self._files = list_texture_files(self.texture_dir)
    return self._files

  def describe(self) -> str:
    if self.texture_dir:
      return f"{len(self)} images under {self.texture_dir}"
    return (
      f"offline bank: skimage {', '.join(PHOTO_TEXTURES)} + "
      f"{NUM_PROCEDURAL_TEXTURES} procedural textures"
    )

  def sample(self, rng: np.random.Generator) -> np.ndarray:
    """A random texture [size, size, 3] uint8."""
    index = int(rng.integers(len(self)))
    if self.texture_dir:
      return _load_texture(self.files[index], self.size)
    return default_textures(self.size)[index]


# -- the anomaly ------------------------------------------------------------------


def blend(image: np.ndarray, texture: np.ndarray, mask: np.ndarray, beta: float) -> np.ndarray:
  """x (1 - m) + (1 - beta) t m + beta x m, exact outside the mask.

  Args:
    image: [H, W, C] (any affine colour space).
    texture: [H, W, C] in the same space.
    mask: [H, W] bool.
    beta: opacity of the image inside the mask.
  """
  mixed = (1.0 - beta) * texture + beta * image
  return np.where(mask[..., None], mixed, image).astype(image.dtype)


def draem_anomaly(
  image: np.ndarray,
  rng: np.random.Generator,
  textures: TextureSource,
  foreground: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """One DRAEM-style anomaly.

  Args:
    image: [H, W, 3] ImageNet-normalised float32.
    rng: the host generator.
    textures: the texture source (images resized to H).
    foreground: optional [H, W] bool where anomalies may appear.

  Returns:
    (augmented [H, W, 3] float32, mask [H, W] bool of exactly the changed pixels).
  """
  texture = normalization.normalize(textures.sample(rng).astype(np.float32) / 255.0)
  mask = perlin_mask(image.shape[:2], rng)
  if foreground is not None:
    mask &= foreground
  beta = float(rng.uniform(0.0, BETA_MAX))
  out = blend(image, texture, mask, beta)
  return out, mask & normalization.changed_pixels(image, out)


def draem_batch(
  images: np.ndarray,
  rng: np.random.Generator,
  textures: TextureSource,
  category: str,
  foreground: str = "otsu",
) -> tuple[np.ndarray, np.ndarray]:
  """DRAEM anomalies for an ImageNet-normalised batch (every sample augmented).

  Args:
    images: float32 [B, H, W, 3].
    rng: the host generator; samples are drawn in batch order.
    textures: a ``TextureSource`` of size H.
    category: selects the foreground rule.
    foreground: 'otsu' or 'none' (``config.rd_expert.foreground``).

  Returns:
    (augmented float32 [B, H, W, 3], masks float32 [B, H, W]).
  """
  images = np.asarray(images, np.float32)
  if images.shape[1] != textures.size or images.shape[2] != textures.size:
    raise ValueError(
      f"Images of {images.shape[1:3]} need textures of that size, got "
      f"{textures.size} (square images only)."
    )
  if foreground not in FOREGROUND_MODES:
    raise ValueError(
      f"Unknown config.rd_expert.foreground {foreground!r}; choose one of {FOREGROUND_MODES}."
    )
  restricted = foreground != "none" and category in (OTSU_INVERSE_CATEGORIES + GRABCUT_CATEGORIES)
  outs, masks = [], []
  for b in range(images.shape[0]):
    fg = None
    if restricted:
      fg = foreground_mask(normalization.to_uint8_range(images[b]), category, foreground)
    out, mask = draem_anomaly(images[b], rng, textures, fg)
    outs.append(out)
    masks.append(mask)
  return np.stack(outs).astype(np.float32), np.stack(masks).astype(np.float32)
