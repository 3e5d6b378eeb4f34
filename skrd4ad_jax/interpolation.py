"""Separable resampling as small matrices: align-corners bilinear and scipy-style Gaussian blur.

Both operations are linear and separable, so each is a pair of [out, in] matrices
built once in numpy (float64, then cast) and applied with two matmuls. This gives
PyTorch's ``F.interpolate(mode="bilinear", align_corners=True)`` and scipy's
``ndimage.gaussian_filter`` boundary handling exactly, and runs well on every
backend. Matmuls use HIGHEST precision so GPUs do not fall back to TF32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST
BLUR_MODES = ("reflect", "mirror")


@functools.cache
def align_corners_matrix(out_size: int, in_size: int) -> np.ndarray:
  """[out, in] bilinear weights with ``src = dst * (in - 1) / (out - 1)``."""
  m = np.zeros((out_size, in_size), np.float64)
  if in_size == 1 or out_size == 1:
    m[:, 0] = 1.0
    return m
  src = np.arange(out_size) * (in_size - 1) / (out_size - 1)
  lo = np.clip(np.floor(src).astype(int), 0, in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  rows = np.arange(out_size)
  np.add.at(m, (rows, lo), 1.0 - frac)
  np.add.at(m, (rows, hi), frac)
  return m


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
  """scipy's ``_gaussian_kernel1d``: radius ``int(truncate * sigma + 0.5)``."""
  radius = int(truncate * float(sigma) + 0.5)
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  phi = np.exp(-0.5 / float(sigma) ** 2 * x**2)
  return phi / phi.sum()


def _fold_index(i: np.ndarray, n: int, mode: str) -> np.ndarray:
  """Maps out-of-range indices back inside [0, n) like the boundary ``mode``."""
  if n == 1:
    return np.zeros_like(i)
  if mode == "reflect":  # scipy 'reflect' = numpy 'symmetric': d c b a | a b c d
    period = 2 * n
    i = np.mod(i, period)
    return np.where(i >= n, period - 1 - i, i)
  if mode == "mirror":  # scipy 'mirror' = numpy/torch 'reflect': d c b | a b c d
    period = 2 * n - 2
    i = np.mod(i, period)
    return np.where(i >= n, period - i, i)
  raise ValueError(
    f"Unknown blur border mode {mode!r}; choose one of {BLUR_MODES} (config.anomaly_map.blur_mode)."
  )


@functools.cache
def gaussian_matrix(
  size: int, sigma: float, truncate: float = 4.0, mode: str = "reflect"
) -> np.ndarray:
  """[size, size] matrix of a 1-D Gaussian filter with the given border mode."""
  kernel = gaussian_kernel1d(sigma, truncate)
  radius = (len(kernel) - 1) // 2
  m = np.zeros((size, size), np.float64)
  rows = np.repeat(np.arange(size), len(kernel))
  cols = _fold_index(
    (np.arange(size)[:, None] + np.arange(-radius, radius + 1)[None]).ravel(), size, mode
  )
  np.add.at(m, (rows, cols), np.tile(kernel, size))
  return m


def resize_align_corners(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Bilinear resize with align_corners=True of [B, h, w] or [B, h, w, C] to ``size``."""
  dtype = jnp.promote_types(x.dtype, jnp.float32)  # float32, or float64 under x64
  mh = jnp.asarray(align_corners_matrix(int(size[0]), x.shape[1]), dtype)
  mw = jnp.asarray(align_corners_matrix(int(size[1]), x.shape[2]), dtype)
  x = x.astype(dtype)
  if x.ndim == 3:
    return jnp.einsum("oh,bhw,pw->bop", mh, x, mw, precision=_HIGHEST)
  return jnp.einsum("oh,bhwc,pw->bopc", mh, x, mw, precision=_HIGHEST)


def gaussian_blur(
  maps: jax.Array, sigma: float, truncate: float = 4.0, mode: str = "reflect"
) -> jax.Array:
  """``scipy.ndimage.gaussian_filter`` over the two spatial axes of [B, H, W] maps."""
  if sigma <= 0:
    return maps
  dtype = jnp.promote_types(maps.dtype, jnp.float32)  # float32, or float64 under x64
  gh = jnp.asarray(gaussian_matrix(maps.shape[1], float(sigma), truncate, mode), dtype)
  gw = jnp.asarray(gaussian_matrix(maps.shape[2], float(sigma), truncate, mode), dtype)
  return jnp.einsum("oh,bhw,pw->bop", gh, maps.astype(dtype), gw, precision=_HIGHEST)
