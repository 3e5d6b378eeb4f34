"""MRKD's image-level masking (ILM): NSA-style self copy-paste anomalies.

MRKD (``main.py:train`` + ``self_sup_tasks.py:patch_ex`` of the NSA code base)
corrupts every training image by cutting rectangular patches out of the image
itself and pasting them, unblended, at another place (``same=True,
mode='swap', shift=True, resize=False``). Per category the table below gives:

- ``width_bounds_pct``: bounds of the patch *half*-width along each axis, as a
  fraction of the image size; the half-width is
  ``clip((0.03 + Gamma(2, 0.05)) * size, lo, hi)``;
- ``num_patches``: the first patch is always attempted, each further one with
  probability 0.5;
- ``background`` (bg, thr) with ``min_object_pct`` / ``min_overlap_pct``: an
  object mask ``|mean_rgb - bg| > thr`` (0-255 intensities, 7x7 median filter);
  the source patch must hold more than ``min_object_pct`` object and the
  destination must overlap the pasted object by more than ``min_overlap_pct``;
  only object pixels (of source or destination) are replaced. After 200 failed
  draws the patch is skipped.

Copying pixel values is exact in any affine colour space, so the paste works
directly on the ImageNet-normalised arrays; only the background rule needs the
de-normalised intensity. Categories outside the table (VisA, the demo data,
folders) get ``DEFAULT_ILM_PARAMS``: the generic object/texture setting of
bottle and transistor (half-widths 3-40 %, up to 3 patches, no background rule).

Differences from the NSA code, all immaterial at 256 px: half-widths are at
least one pixel (small test images), a destination range that cannot hold the
patch skips it instead of raising, and the returned mask is the exact set of
changed pixels (NSA's label thresholds the intensity change and median-filters
it; MRKD's loss does not use the mask at all).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from skrd4ad_jax import normalization


@dataclasses.dataclass(frozen=True)
class ILMParams:
  """Per-category self copy-paste settings (MRKD ``main.py`` dictionaries)."""

  width_bounds_pct: tuple[tuple[float, float], tuple[float, float]]
  num_patches: int
  min_object_pct: float | None = None
  min_overlap_pct: float | None = None
  background: tuple[float, float] | None = None  # (bg intensity, threshold), 0-255
  gamma_params: tuple[float, float, float] = (2.0, 0.05, 0.03)  # (shape, scale, offset)
  max_attempts: int = 200


def _p(w1, w2, n, obj=None, overlap=None, bg=None) -> ILMParams:
  return ILMParams(
    width_bounds_pct=(w1, w2),
    num_patches=n,
    min_object_pct=obj,
    min_overlap_pct=overlap,
    background=bg,
  )


# MRKD main.py: WIDTH_BOUNDS_PCT, NUM_PATCHES, MIN_OBJECT_PCT, MIN_OVERLAP_PCT, BACKGROUND.
ILM_PARAMS = {
  "bottle": _p((0.03, 0.4), (0.03, 0.4), 3, 0.7, 0.25, (200, 60)),
  "cable": _p((0.01, 0.05), (0.01, 0.1), 3),
  "capsule": _p((0.01, 0.05), (0.01, 0.05), 1, 0.7, 0.25, (200, 60)),
  "hazelnut": _p((0.03, 0.35), (0.03, 0.35), 3, 0.7, 0.25, (20, 20)),
  "metal_nut": _p((0.01, 0.05), (0.01, 0.01), 1, 0.5, 0.25, (20, 20)),
  "pill": _p((0.01, 0.05), (0.01, 0.05), 1, 0.7, 0.25, (20, 20)),
  "screw": _p((0.01, 0.05), (0.01, 0.05), 1, 0.5, 0.25, (200, 60)),
  "toothbrush": _p((0.01, 0.01), (0.01, 0.01), 1, 0.25, 0.25, (20, 20)),
  "transistor": _p((0.03, 0.4), (0.03, 0.4), 3),
  "zipper": _p((0.01, 0.05), (0.01, 0.01), 1, 0.7, 0.25, (200, 60)),
  "carpet": _p((0.03, 0.4), (0.03, 0.4), 4),
  "grid": _p((0.01, 0.05), (0.01, 0.1), 4),
  "leather": _p((0.03, 0.4), (0.03, 0.4), 4),
  "tile": _p((0.01, 0.05), (0.01, 0.1), 4),
  "wood": _p((0.01, 0.05), (0.01, 0.01), 4),
}
# Categories outside MVTec AD: the generic setting of bottle / transistor without
# a background rule (which needs a known background intensity).
DEFAULT_ILM_PARAMS = _p((0.03, 0.4), (0.03, 0.4), 3)


def ilm_params(category: str) -> ILMParams:
  """The table row for ``category`` (``DEFAULT_ILM_PARAMS`` when absent)."""
  return ILM_PARAMS.get(category, DEFAULT_ILM_PARAMS)


def majority_filter(mask: np.ndarray, size: int = 7) -> np.ndarray:
  """``cv2.medianBlur(mask, size)`` of a binary [H, W] mask (border replicated).

  The median of ``size**2`` binary values is 1 iff at least half of them (rounded
  up) are 1, so a box count from an integral image gives it exactly.
  """
  r = size // 2
  padded = np.pad(mask.astype(np.int32), r, mode="edge")
  integral = np.pad(padded.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
  h, w = mask.shape
  counts = (
    integral[size : size + h, size : size + w]
    - integral[:h, size : size + w]
    - integral[size : size + h, :w]
    + integral[:h, :w]
  )
  return counts >= (size * size + 1) // 2


def object_mask(intensity: np.ndarray, background: tuple[float, float]) -> np.ndarray:
  """NSA's object mask: ``|mean_rgb - bg| > thr`` (0-255), then a 7x7 median filter.

  Args:
    intensity: [H, W] mean over RGB of the 0-255 image.
    background: (background intensity, threshold).

  Returns:
    [H, W] bool, True on the object.
  """
  bg, thr = background
  return majority_filter(np.abs(intensity - float(bg)) > float(thr), 7)


def _paste_one(
  dest: np.ndarray,
  src: np.ndarray,
  dest_obj: np.ndarray | None,
  src_obj: np.ndarray | None,
  p: ILMParams,
  rng: np.random.Generator,
) -> np.ndarray | None:
  """One patch of NSA ``_patch_ex`` ('swap', shift, no resize); None when skipped."""
  dims = dest.shape[:2]
  skip_bg = src_obj is not None
  min_w = [max(1, int(np.round(p.width_bounds_pct[a][0] * dims[a]))) for a in (0, 1)]
  max_w = [max(min_w[a], int(np.round(p.width_bounds_pct[a][1] * dims[a]))) for a in (0, 1)]
  shape, scale, offset = p.gamma_params
  half = [
    int(np.clip((offset + rng.gamma(shape, scale)) * dims[a], min_w[a], max_w[a])) for a in (0, 1)
  ]

  # Source patch: must hold enough object when a background rule is set.
  for attempt in range(p.max_attempts + 1):
    if attempt == p.max_attempts:
      return None
    c = [int(rng.integers(min_w[a], dims[a] - min_w[a])) for a in (0, 1)]
    lo = [int(np.clip(c[a] - half[a], 0, dims[a])) for a in (0, 1)]
    hi = [int(np.clip(c[a] + half[a], 0, dims[a])) for a in (0, 1)]
    area = (hi[0] - lo[0]) * (hi[1] - lo[1])
    if not skip_bg:
      break
    if area and src_obj[lo[0] : hi[0], lo[1] : hi[1]].sum() / area > p.min_object_pct:
      break
  patch = src[lo[0] : hi[0], lo[1] : hi[1]]
  h, w = patch.shape[:2]
  patch_obj = src_obj[lo[0] : hi[0], lo[1] : hi[1]] if skip_bg else None

  # Destination: a random shift; with a background rule it must overlap the object.
  lo_c = (h // 2 + 1, w // 2 + 1)
  hi_c = (dims[0] - h // 2 - 1, dims[1] - w // 2 - 1)
  if lo_c[0] >= hi_c[0] or lo_c[1] >= hi_c[1]:
    return None
  for attempt in range(p.max_attempts + 1):
    if attempt == p.max_attempts:
      return None
    c = [int(rng.integers(lo_c[a], hi_c[a])) for a in (0, 1)]
    d0, d1 = c[0] - h // 2, c[1] - w // 2
    if not skip_bg:
      break
    dest_patch_obj = dest_obj[d0 : d0 + h, d1 : d1 + w]
    src_sum = patch_obj.sum()
    if (
      src_sum / area > p.min_object_pct
      and (dest_patch_obj & patch_obj).sum() / src_sum > p.min_overlap_pct
    ):
      break

  replace = np.ones((h, w), bool)
  if skip_bg:
    replace &= patch_obj | dest_obj[d0 : d0 + h, d1 : d1 + w]
  out = dest.copy()
  region = out[d0 : d0 + h, d1 : d1 + w]
  out[d0 : d0 + h, d1 : d1 + w] = np.where(replace[..., None], patch, region)
  return out


def self_copy_paste(
  image: np.ndarray,
  rng: np.random.Generator,
  params: ILMParams,
  intensity: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """NSA ``patch_ex(same=True, mode='swap', shift=True, resize=False)`` on one image.

  Args:
    image: [H, W, C] float array in any affine colour space (values are copied).
    rng: the host generator (every draw comes from it).
    params: the category's ``ILMParams``.
    intensity: [H, W] mean 0-255 RGB intensity; required when
      ``params.background`` is set.

  Returns:
    (augmented [H, W, C], mask [H, W] bool of exactly the changed pixels).
  """
  obj = None
  if params.background is not None:
    if intensity is None:
      raise ValueError("self_copy_paste: this category's background rule needs `intensity`.")
    obj = object_mask(intensity, params.background)
  out = image
  for i in range(params.num_patches):
    # As in NSA: the first patch always, every further one on a coin flip.
    if i == 0 or rng.integers(2) > 0:
      pasted = _paste_one(out, image, obj, obj, params, rng)
      if pasted is not None:
        out = pasted
  out = np.array(out, copy=True)
  return out, normalization.changed_pixels(image, out)


def ilm_batch(
  images: np.ndarray, rng: np.random.Generator, category: str
) -> tuple[np.ndarray, np.ndarray]:
  """ILM of an ImageNet-normalised batch.

  Args:
    images: float32 [B, H, W, 3], ImageNet-normalised.
    rng: the host generator; samples are drawn in batch order.
    category: selects the row of ``ILM_PARAMS``.

  Returns:
    (augmented float32 [B, H, W, 3], masks float32 [B, H, W] of changed pixels).
  """
  images = np.asarray(images, np.float32)
  params = ilm_params(category)
  intensity = None
  if params.background is not None:
    intensity = normalization.to_uint8_range(images).mean(axis=-1)  # [B, H, W]
  outs, masks = [], []
  for b in range(images.shape[0]):
    out, mask = self_copy_paste(images[b], rng, params, None if intensity is None else intensity[b])
    outs.append(out)
    masks.append(mask)
  return np.stack(outs).astype(np.float32), np.stack(masks).astype(np.float32)
