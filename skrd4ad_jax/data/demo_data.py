"""Offline demo data set built from the CC0 texture photos shipped with scikit-image.

The demo needs an anomaly-detection data set that (a) loads without a network,
(b) trains in minutes on a CPU and (c) is *honest*: most of its defects keep the
colour statistics of the texture, so that a non-learned detector comparing local
colour statistics with the training images (see
`skrd4ad_jax.baseline.colour_statistics_baseline`) does not solve it.

Three categories are cut from the real 512x512 grayscale photos
`skimage.data.brick()`, `grass()` and `gravel()`. Every image is a
`crop_size` x `crop_size` crop (default 256, a quarter of the photo), resized
(bilinear, anti-aliased) to `image_size` (default 128, i.e. the photo at half
resolution, as MVTec AD's 1024 px photos are shrunk for a 256 px network), with
a small per-image gain/offset jitter (+-6 %, +-4 grey levels), replicated to
three channels (RGB). Training and test crops come from anywhere in the photo
(the usual one-class setting: normal training and test images from the same
distribution); `disjoint=True` takes test crops from a band of the photo never
used for training instead (a domain shift; needs `crop_size` <= 248).
Measured with the demo's HED teacher (360 steps): native-resolution 128 px
crops give grass and gravel image AUROCs of ~0.7, 256 px crops ~0.9 - at native
resolution the teacher's deepest taps see too little of the texture.

Defect kinds (one instance per image, drawn at crop resolution; sizes below in
pixels of a 128 px image at `defect_scale=1` - they scale with the crop, so
they cover the same fraction of every image - all still >= ~9 px wide at 64 px):

* `distortion`: a swirl (local smooth warp with compact support, radius
  23-29 px, 2.5-3.5 rad at the centre): the pattern bends, grey values are only
  moved.
* `misorientation`: a disk (radius 20-26 px) of texture with the wrong
  orientation. Oriented textures (brick): rotated in place by 90/270 degrees or
  transposed (an exact pixel permutation). Isotropic textures (grass, gravel:
  structure-tensor coherence < 0.3), where a rotation is invisible: the disk's
  content is stretched 2.2-2.8x along a random direction (combed grass,
  elongated stones).
* `misplaced`: an ellipse (radii 18-26 px) of texture copied from another place
  of the same photo at a 2-2.6x larger scale; the best of 8 source places by
  grey-level spread, shifted to the destination's mean, so the grain/brick size
  does not fit but the colour does.
* `missing`: the pattern vanishes in an ellipse (radii 18-26 px): replaced by
  structureless grain with the original's local mean and standard deviation.
* `scratch`: a thin (Gaussian profile, sigma 1.4 px), long (84-115 px),
  smoothly curved line, lighter or darker by 1.8-2.4 times the texture's
  grey-level standard deviation. (Version 3 used 0.9-1.2: on grass and gravel
  such a line is invisible to a human inspector, so it measured noise, not
  detection.)
* `stain`: the easy, colour-changing control: an irregular darker blob (radii
  17-25 px, up to 40-55 % darker).

Ground truth: a defect is rendered on the clean crop, both are resized and
quantised to uint8 exactly as the written image, and the mask is
`fill_holes(|defective - clean| > MASK_EPS)` - i.e. exactly the pixels that
changed by more than `MASK_EPS` grey levels, plus pixels fully enclosed by
changed pixels (a rotated or re-synthesised patch can coincide with the
original at isolated pixels; these still belong to the defect). Nothing outside
the defect's support changes.

The tree follows the MVTec AD layout::

  <root>/manifest.json
  <root>/<category>/train/good/000.png
  <root>/<category>/test/good/000.png
  <root>/<category>/test/<defect>/000.png
  <root>/<category>/ground_truth/<defect>/000_mask.png   (255 = defect)

Generation is deterministic (byte-identical PNGs for the same parameters) and
idempotent: `manifest.json` records the parameters and `DATASET_VERSION`; the
tree is regenerated only when it is missing or the parameters differ. A new tree
is written into a temporary sibling directory and renamed into place, so an
interrupted run never leaves a half tree that looks complete.

Why one module of this size: the generator is one recipe (crops, the defect
kinds, their masks, the manifest); its parts are only meaningful together, and
the honesty property above is a property of the whole.
"""

import json
import os
import shutil
import tempfile

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

DEMO_CATEGORIES = ("brick", "grass", "gravel")
DEFECT_KINDS = ("distortion", "misorientation", "misplaced", "missing", "scratch", "stain")
# Kinds that keep the local colour statistics (mean/std) of the texture.
STATISTICS_PRESERVING_KINDS = ("distortion", "misorientation", "misplaced", "missing")
DATASET_VERSION = 4
# A pixel counts as changed when |defective - clean| > MASK_EPS grey levels
# (uint8, after resizing and quantisation).
MASK_EPS = 3
# Defect geometry below is in pixels of a 128 px crop and scales with the crop.
_REF_CROP = 128.0
_PHOTO_SIZE = 512
# Test crops start within this many rows of the bottom band's top.
_TEST_ROW_JITTER = 8
# Correlation length (px at a 128 px crop) of the grain that fills `missing`.
_MISSING_GRAIN = 2.0
_SPLIT_IDS = {"train": 0, "test_good": 1}
# Scratch contrast (multiples of the crop's grey-level standard deviation) and
# line width (Gaussian sigma, px at a 128 px crop).
_SCRATCH_AMPLITUDE = (1.8, 2.4)
_SCRATCH_SIGMA = 1.4


def default_root() -> str:
  """Returns `$SKRD4AD_CACHE/demo` or `~/.cache/skrd4ad_jax/demo`."""
  cache = os.environ.get("SKRD4AD_CACHE")
  if not cache:
    cache = os.path.join(os.path.expanduser("~"), ".cache", "skrd4ad_jax")
  return os.path.join(cache, "demo")


def load_photo(category: str) -> np.ndarray:
  """Loads a scikit-image texture photo as float32 [512, 512] in [0, 255]."""
  if category not in DEMO_CATEGORIES:
    raise ValueError(f"Unknown demo category {category!r}; expected one of {DEMO_CATEGORIES}.")
  from skimage import data as skdata

  photo = np.asarray(getattr(skdata, category)(), dtype=np.float32)
  if photo.ndim == 3:
    photo = photo[..., :3].mean(axis=-1)
  return photo


def _rng(seed: int, *keys: int) -> np.random.Generator:
  """A generator that depends only on (seed, keys), not on call order."""
  return np.random.default_rng([int(seed), *[int(k) for k in keys]])


def _split_rows(crop_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """Ranges of crop top rows for train and test; the two bands are disjoint."""
  test_lo = _PHOTO_SIZE - crop_size - _TEST_ROW_JITTER
  train_hi = test_lo - 8 - crop_size  # last train row ends 8 px above test.
  if train_hi < 0:
    largest = (_PHOTO_SIZE - _TEST_ROW_JITTER - 8) // 2
    raise ValueError(
      f"crop_size={crop_size} is too large for a disjoint split of "
      f"a {_PHOTO_SIZE} px photo; use crop_size <= {largest}."
    )
  return (0, train_hi), (test_lo, _PHOTO_SIZE - crop_size)


def sample_crop(
  photo: np.ndarray,
  rng: np.random.Generator,
  split: str,
  crop_size: int = 256,
  disjoint: bool = False,
) -> np.ndarray:
  """Cuts a random crop.

  Args:
    photo: the 512x512 photo.
    rng: random generator.
    split: 'train' or 'test'.
    crop_size: side of the crop.
    disjoint: train crops from the top band and test crops from a disjoint
      bottom band (normal test content never seen in training: much harder, a
      domain shift rather than a one-class problem). False: both from anywhere
      in the photo, the usual one-class setting where normal training and test
      images come from the same distribution.
  """
  if not disjoint:
    lo, hi = 0, photo.shape[0] - crop_size
  else:
    train_rows, test_rows = _split_rows(crop_size)
    lo, hi = train_rows if split == "train" else test_rows
  y = int(rng.integers(lo, hi + 1))
  x = int(rng.integers(0, photo.shape[1] - crop_size + 1))
  return photo[y : y + crop_size, x : x + crop_size].astype(np.float32)


def _resize(img: np.ndarray, size: int) -> np.ndarray:
  """Bilinear (anti-aliased when shrinking) resize of a float [H, W] image."""
  if img.shape == (size, size):
    return img.astype(np.float32)
  pil = Image.fromarray(img.astype(np.float32), mode="F")
  return np.asarray(pil.resize((size, size), Image.BILINEAR), dtype=np.float32)


def render(crop: np.ndarray, image_size: int, gain: float = 1.0, offset: float = 0.0) -> np.ndarray:
  """Resizes, jitters and quantises a gray crop to uint8 RGB [S, S, 3]."""
  img = _resize(crop, image_size) * gain + offset
  img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
  return np.repeat(img[..., None], 3, axis=-1)


def defect_mask(clean: np.ndarray, defective: np.ndarray, eps: int = MASK_EPS) -> np.ndarray:
  """Mask of changed pixels: `fill_holes(max_c |defective - clean| > eps)`."""
  diff = np.abs(defective.astype(np.int16) - clean.astype(np.int16))
  if diff.ndim == 3:
    diff = diff.max(axis=-1)
  return ndi.binary_fill_holes(diff > eps)


# ----------------------------------------------------------------------------
# Defect synthesis, all on a float gray crop [C, C] (values ~[0, 255]).
# ----------------------------------------------------------------------------


def _centre(rng, size, radius):
  margin = int(np.ceil(radius)) + 6
  return (float(rng.uniform(margin, size - margin)), float(rng.uniform(margin, size - margin)))


def _soft_ellipse(shape, cy, cx, ry, rx, theta, edge):
  """Alpha in [0, 1]: 1 inside the ellipse, linear ramp of ~`edge` px, 0 out."""
  yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
  dy, dx = yy - cy, xx - cx
  c, s = np.cos(theta), np.sin(theta)
  u = (c * dx + s * dy) / rx
  v = (-s * dx + c * dy) / ry
  r = np.sqrt(u * u + v * v)
  return np.clip((1.0 - r) * min(rx, ry) / max(edge, 1e-3), 0.0, 1.0)


def _blend(base, patch, alpha):
  return base * (1.0 - alpha) + patch * alpha


def _distortion(crop, rng, photo, k):
  """Swirl with compact support: rotation angle theta_max * (1 - r/R)^2."""
  del photo
  radius = rng.uniform(23, 29) * k
  cy, cx = _centre(rng, crop.shape[0], radius)
  theta_max = rng.uniform(2.5, 3.5) * rng.choice([-1.0, 1.0])
  yy, xx = np.mgrid[: crop.shape[0], : crop.shape[1]].astype(np.float64)
  dy, dx = yy - cy, xx - cx
  r = np.sqrt(dy * dy + dx * dx)
  ang = theta_max * np.clip(1.0 - r / radius, 0.0, 1.0) ** 2
  c, s = np.cos(ang), np.sin(ang)
  sy = cy + c * dy - s * dx
  sx = cx + s * dy + c * dx
  warped = ndi.map_coordinates(crop.astype(np.float64), [sy, sx], order=3, mode="reflect")
  return np.where(r < radius, warped, crop).astype(np.float32)


def orientation_coherence(img: np.ndarray, sigma: float = 4.0) -> float:
  """Global structure-tensor coherence in [0, 1] (0: isotropic texture)."""
  img = np.asarray(img, np.float64)
  gy, gx = ndi.sobel(img, 0), ndi.sobel(img, 1)
  jxx, jyy, jxy = (ndi.gaussian_filter(a, sigma).mean() for a in (gx * gx, gy * gy, gx * gy))
  return float(np.sqrt((jxx - jyy) ** 2 + 4 * jxy**2) / (jxx + jyy + 1e-9))


def _misorientation(crop, rng, photo, k):
  """A disk of texture with the wrong orientation.

  Oriented textures (brick): the disk is rotated in place by 90/270 degrees or
  transposed (an exact pixel permutation). Isotropic textures (grass, gravel;
  coherence < 0.3), where a rotation is invisible: the disk is given an
  orientation - its content is stretched 2.2-2.8x along a random direction
  ("combed" grass, elongated stones).
  """
  radius = rng.uniform(20, 26) * k
  cy, cx = _centre(rng, crop.shape[0], radius)
  op = int(rng.integers(3))
  stretch = rng.uniform(2.2, 2.8)
  ang = rng.uniform(0, np.pi)
  if orientation_coherence(photo) >= 0.3:
    half = int(np.ceil(radius)) + 1
    y0, x0 = int(round(cy)) - half, int(round(cx)) - half
    box = crop[y0 : y0 + 2 * half, x0 : x0 + 2 * half]
    moved = np.rot90(box, 1 if op == 0 else 3) if op < 2 else box.T
    patch = crop.copy()
    patch[y0 : y0 + 2 * half, x0 : x0 + 2 * half] = moved
    cy, cx = y0 + half - 0.5, x0 + half - 0.5
  else:
    yy, xx = np.mgrid[: crop.shape[0], : crop.shape[1]].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    u = np.cos(ang) * dx + np.sin(ang) * dy  # Along the stretch direction.
    v = -np.sin(ang) * dx + np.cos(ang) * dy
    u /= stretch
    sy = cy + np.sin(ang) * u + np.cos(ang) * v
    sx = cx + np.cos(ang) * u - np.sin(ang) * v
    patch = ndi.map_coordinates(crop.astype(np.float64), [sy, sx], order=3, mode="reflect")
  alpha = _soft_ellipse(crop.shape, cy, cx, radius, radius, 0.0, 1.5 * k)
  return _blend(crop, patch, alpha).astype(np.float32)


def _weighted_moments(img, alpha):
  w = alpha / alpha.sum()
  mean = float((img * w).sum())
  return mean, float(np.sqrt(max((((img - mean) ** 2) * w).sum(), 1e-6)))


def _misplaced(crop, rng, photo, k):
  """A patch from elsewhere in the photo, zoomed 2-2.6x, pasted in.

  Of 8 candidate source places the one whose grey-level spread best matches the
  destination's is used, and its mean is set to the destination's, so that the
  patch differs in structure (grain size, misplaced pattern), not in colour.
  """
  ry, rx = rng.uniform(18, 26, size=2) * k
  theta = rng.uniform(0, np.pi)
  radius = max(ry, rx)
  cy, cx = _centre(rng, crop.shape[0], radius)
  zoom = rng.uniform(2.0, 2.6)
  alpha = _soft_ellipse(crop.shape, cy, cx, ry, rx, theta, 1.5 * k)
  ys, xs = np.nonzero(alpha > 0)
  box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
  a_box = alpha[box]
  c_mean, c_std = _weighted_moments(crop[box].astype(np.float64), a_box)
  yy, xx = np.mgrid[box].astype(np.float64)
  src = int(np.ceil(2 * radius / zoom)) + 8
  best = None
  for _ in range(8):
    sy0 = rng.uniform(src, photo.shape[0] - src)
    sx0 = rng.uniform(src, photo.shape[1] - src)
    cand = ndi.map_coordinates(
      photo.astype(np.float64),
      [sy0 + (yy - cy) / zoom, sx0 + (xx - cx) / zoom],
      order=3,
      mode="reflect",
    )
    p_mean, p_std = _weighted_moments(cand, a_box)
    cost = abs(np.log(p_std / c_std))
    if best is None or cost < best[0]:
      best = (cost, cand - p_mean + c_mean)
  patch = crop.astype(np.float64).copy()
  patch[box] = best[1]
  return _blend(crop, patch, alpha).astype(np.float32)


def _missing(crop, rng, photo, k):
  """Pattern replaced by structureless grain with matched local mean/std."""
  del photo
  ry, rx = rng.uniform(18, 26, size=2) * k
  theta = rng.uniform(0, np.pi)
  cy, cx = _centre(rng, crop.shape[0], max(ry, rx))
  img = crop.astype(np.float64)
  sigma = 6.0 * k
  mean = ndi.gaussian_filter(img, sigma)
  std = np.sqrt(np.maximum(ndi.gaussian_filter(img * img, sigma) - mean**2, 1.0))
  noise = ndi.gaussian_filter(rng.standard_normal(img.shape), _MISSING_GRAIN * k)
  noise /= noise.std()
  patch = mean + std * noise
  alpha = _soft_ellipse(crop.shape, cy, cx, ry, rx, theta, 2.0 * k)
  return _blend(img, patch, alpha).astype(np.float32)


def _scratch(crop, rng, photo, k):
  """A thin, long, smoothly curved, low-contrast line (quadratic Bezier)."""
  del photo
  size = crop.shape[0]
  length = min(rng.uniform(84, 115) * k, 0.8 * size)
  ang = rng.uniform(0, np.pi)
  margin = min(0.5 * length + 7 * k, 0.5 * size - 1)
  cy, cx = rng.uniform(margin, size - margin, size=2)
  d = np.array([np.sin(ang), np.cos(ang)]) * length / 2
  p0, p2 = np.array([cy, cx]) - d, np.array([cy, cx]) + d
  normal = np.array([-d[1], d[0]]) / (length / 2)
  p1 = np.array([cy, cx]) + normal * rng.uniform(-0.25, 0.25) * length
  t = np.linspace(0.0, 1.0, 400)[:, None]
  pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
  # Distance of every pixel to the polyline samples (via a distance transform).
  seeds = np.ones((size, size), bool)
  iy = np.clip(np.rint(pts[:, 0]).astype(int), 0, size - 1)
  ix = np.clip(np.rint(pts[:, 1]).astype(int), 0, size - 1)
  seeds[iy, ix] = False
  dist = ndi.distance_transform_edt(seeds)
  width_sigma = _SCRATCH_SIGMA * k
  profile = np.exp(-0.5 * (dist / width_sigma) ** 2)
  profile[dist > 3.0 * width_sigma] = 0.0
  local_std = float(crop.std())
  amp = rng.uniform(*_SCRATCH_AMPLITUDE) * local_std * rng.choice([-1.0, 1.0])
  return (crop + amp * profile).astype(np.float32)


def _stain(crop, rng, photo, k):
  """An easy, colour-changing control defect: an irregular darker blob."""
  del photo
  ry, rx = rng.uniform(17, 25, size=2) * k
  theta = rng.uniform(0, np.pi)
  cy, cx = _centre(rng, crop.shape[0], max(ry, rx))
  strength = rng.uniform(0.4, 0.55)  # Darkening at the blob's darkest point.
  blotch = ndi.gaussian_filter(rng.standard_normal(crop.shape), 4.0 * k)
  blotch = (blotch - blotch.min()) / (blotch.max() - blotch.min() + 1e-9)
  alpha = _soft_ellipse(crop.shape, cy, cx, ry, rx, theta, 4.5 * k)
  alpha *= 0.65 + 0.35 * blotch
  return (crop * (1.0 - strength * alpha)).astype(np.float32)


_DEFECT_FNS = {
  "distortion": _distortion,
  "misorientation": _misorientation,
  "misplaced": _misplaced,
  "missing": _missing,
  "scratch": _scratch,
  "stain": _stain,
}


def apply_defect(
  crop: np.ndarray,
  kind: str,
  rng: np.random.Generator,
  photo: np.ndarray | None = None,
  defect_scale: float = 1.0,
) -> np.ndarray:
  """Draws one defect of `kind` on a float gray crop; returns a new crop.

  Args:
    crop: float [C, C] gray crop, values in [0, 255].
    kind: one of `DEFECT_KINDS`.
    rng: random generator (all randomness of the defect).
    photo: the full photo, source of `misplaced` patches (defaults to `crop`).
    defect_scale: multiplies the defect's linear size (1.0: radii of about
      18-29 px and scratches of 84-115 px x ~3 px on a 128 px crop).

  Returns:
    float32 [C, C] defective crop (unchanged outside the defect's support).
  """
  if kind not in _DEFECT_FNS:
    raise ValueError(f"Unknown defect kind {kind!r}; expected {DEFECT_KINDS}.")
  photo = crop if photo is None else photo
  k = crop.shape[0] / _REF_CROP * float(defect_scale)
  return _DEFECT_FNS[kind](np.asarray(crop, np.float32), rng, photo, k)


def make_defect_example(
  crop: np.ndarray,
  kind: str,
  rng: np.random.Generator,
  image_size: int,
  photo: np.ndarray | None = None,
  gain: float = 1.0,
  offset: float = 0.0,
  defect_scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Renders (clean uint8 RGB, defective uint8 RGB, bool mask [S, S])."""
  clean = render(crop, image_size, gain, offset)
  defective = render(apply_defect(crop, kind, rng, photo, defect_scale), image_size, gain, offset)
  return clean, defective, defect_mask(clean, defective)


def _jitter(rng):
  return float(rng.uniform(0.94, 1.06)), float(rng.uniform(-4.0, 4.0))


def generate_category(
  category: str,
  seed: int = 0,
  image_size: int = 128,
  num_train: int = 48,
  num_test_good: int = 10,
  num_test_per_defect: int = 5,
  crop_size: int = 256,
  defect_scale: float = 1.0,
  disjoint: bool = False,
) -> dict[str, list]:
  """Generates one category in memory (arguments as `ensure_demo_dataset`).

  Returns:
    dict with `train` -> list of uint8 RGB images, `test/good` -> list, and for
    each defect kind `test/<kind>` -> list of (image, bool mask) pairs.
  """
  photo = load_photo(category)
  cid = DEMO_CATEGORIES.index(category)
  out = {}

  def clean_sample(split_id, i, split):
    rng = _rng(seed, cid, split_id, i)
    crop = sample_crop(photo, rng, split, crop_size, disjoint)
    gain, offset = _jitter(rng)
    return render(crop, image_size, gain, offset)

  out["train"] = [clean_sample(_SPLIT_IDS["train"], i, "train") for i in range(num_train)]
  out["test/good"] = [
    clean_sample(_SPLIT_IDS["test_good"], i, "test") for i in range(num_test_good)
  ]
  for j, kind in enumerate(DEFECT_KINDS):
    samples = []
    for i in range(num_test_per_defect):
      rng = _rng(seed, cid, 10 + j, i)
      crop = sample_crop(photo, rng, "test", crop_size, disjoint)
      gain, offset = _jitter(rng)
      for _ in range(20):  # Redraw the (rare) defect that vanishes when resized.
        _, img, mask = make_defect_example(
          crop, kind, rng, image_size, photo, gain, offset, defect_scale
        )
        if mask.sum() >= 0.004 * image_size * image_size:
          break
      samples.append((img, mask))
    out[f"test/{kind}"] = samples
  return out


def _save_png(path, array):
  Image.fromarray(array).save(path, format="PNG", optimize=False)


def _write_tree(tmp_root, params):
  for category in params["categories"]:
    data = generate_category(
      category,
      seed=params["seed"],
      image_size=params["image_size"],
      num_train=params["num_train"],
      num_test_good=params["num_test_good"],
      num_test_per_defect=params["num_test_per_defect"],
      crop_size=params["crop_size"],
      defect_scale=params["defect_scale"],
      disjoint=params.get("disjoint", False),
    )
    base = os.path.join(tmp_root, category)
    for sub in ("train/good", "test/good"):
      os.makedirs(os.path.join(base, sub))
    for i, img in enumerate(data["train"]):
      _save_png(os.path.join(base, "train", "good", f"{i:03d}.png"), img)
    for i, img in enumerate(data["test/good"]):
      _save_png(os.path.join(base, "test", "good", f"{i:03d}.png"), img)
    for kind in params["defect_kinds"]:
      os.makedirs(os.path.join(base, "test", kind))
      os.makedirs(os.path.join(base, "ground_truth", kind))
      for i, (img, mask) in enumerate(data[f"test/{kind}"]):
        _save_png(os.path.join(base, "test", kind, f"{i:03d}.png"), img)
        _save_png(
          os.path.join(base, "ground_truth", kind, f"{i:03d}_mask.png"), mask.astype(np.uint8) * 255
        )
  with open(os.path.join(tmp_root, "manifest.json"), "w") as f:
    json.dump(params, f, indent=2, sort_keys=True)
    f.write("\n")


def _read_manifest(root):
  try:
    with open(os.path.join(root, "manifest.json")) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def ensure_demo_dataset(
  root: str | None = None,
  seed: int = 0,
  image_size: int = 128,
  num_train: int = 48,
  num_test_good: int = 10,
  num_test_per_defect: int = 5,
  crop_size: int = 256,
  defect_scale: float = 1.0,
  disjoint: bool = False,
) -> str:
  """Writes the demo data set once (MVTec layout) and returns its root.

  Args:
    root: target directory; defaults to `default_root()`. Must be absent, empty
      or a tree written by this function (it is replaced when the parameters
      differ).
    seed: random seed; the same parameters give byte-identical files.
    image_size: side of the written square images.
    num_train: normal training images per category.
    num_test_good: normal test images per category.
    num_test_per_defect: test images per defect kind and category.
    crop_size: side of the photo crop (256 of 512 px by default: the photo
      at half resolution when `image_size=128`) that is resized to
      `image_size`.
    defect_scale: multiplies the linear size of every defect (see
      `apply_defect`); > 1 makes the data set easier.
    disjoint: draw normal test crops from a photo band never used for
      training (see `sample_crop`); harder, off by default; needs
      `crop_size` <= 248.

  Returns:
    The data set root (containing one directory per `DEMO_CATEGORIES`).
  """
  root = os.path.abspath(os.path.expanduser(root or default_root()))
  params = {
    "version": DATASET_VERSION,
    "seed": int(seed),
    "image_size": int(image_size),
    "num_train": int(num_train),
    "num_test_good": int(num_test_good),
    "num_test_per_defect": int(num_test_per_defect),
    "crop_size": int(crop_size),
    "defect_scale": float(defect_scale),
    "disjoint": bool(disjoint),
    "categories": list(DEMO_CATEGORIES),
    "defect_kinds": list(DEFECT_KINDS),
    "mask_eps": MASK_EPS,
    "source": "skimage.data.{brick,grass,gravel} (CC0)",
  }
  if _read_manifest(root) == params:
    return root
  if os.path.isdir(root) and os.listdir(root) and _read_manifest(root) is None:
    raise FileExistsError(
      f"{root} exists, is not empty and has no demo manifest.json; refusing "
      "to overwrite it. Pass another root."
    )
  parent = os.path.dirname(root)
  os.makedirs(parent, exist_ok=True)
  tmp_root = tempfile.mkdtemp(prefix=".demo-tmp-", dir=parent)
  try:
    _write_tree(tmp_root, params)
    if os.path.isdir(root):  # Stale (other parameters) or empty: move aside.
      if _read_manifest(root) == params:  # Written concurrently meanwhile.
        return root
      stale = tempfile.mkdtemp(prefix=".demo-stale-", dir=parent)
      os.rename(root, os.path.join(stale, "old"))
      shutil.rmtree(stale, ignore_errors=True)
    try:
      os.rename(tmp_root, root)
    except OSError:
      if _read_manifest(root) != params:  # Lost a race to another writer.
        raise
  finally:
    shutil.rmtree(tmp_root, ignore_errors=True)
  return root
