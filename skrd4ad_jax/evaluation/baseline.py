"""A non-learned colour-statistics anomaly detector, reported beside the model.

Synthetic defects that change colour or brightness are found by comparing local
colour statistics with those of the training images; a benchmark that this
baseline solves cannot tell a good model from a poor one. The demo prints its
AUROCs next to the model's so the reader can see what the model adds.

Method: for every pixel, the local mean and standard deviation of each channel
over a `window` x `window` box (uniform filters) form a 6-dim feature. The
features of all training pixels are modelled by one Gaussian (textures are
stationary); the anomaly map of a test image is the per-pixel Mahalanobis
distance to it and the image score is the map's maximum. Pure numpy/scipy.
"""

import numpy as np
from scipy import ndimage as ndi


def local_colour_statistics(images: np.ndarray, window: int = 11) -> np.ndarray:
  """Per-pixel local mean and std of each channel.

  Args:
    images: [N, H, W, C] (or [N, H, W]) uint8 or float images.
    window: side of the square averaging box, in pixels.

  Returns:
    float32 [N, H, W, 2C] features: C local means, then C local stds.
  """
  x = np.asarray(images, dtype=np.float32)
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4:
    raise ValueError(f"Expected [N, H, W, C] images, got shape {x.shape}.")
  size = (1, window, window, 1)  # No mixing across images or channels.
  mean = ndi.uniform_filter(x, size=size, mode="reflect")
  sq = ndi.uniform_filter(x * x, size=size, mode="reflect")
  std = np.sqrt(np.maximum(sq - mean * mean, 0.0))
  return np.concatenate([mean, std], axis=-1)


def fit_gaussian(features: np.ndarray, ridge: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
  """Mean and inverse covariance of [..., D] features (ridge-regularised).

  The ridge (a fraction of the mean variance) keeps the covariance invertible
  for gray images stored as RGB, whose three channels are identical.
  """
  f = features.reshape(-1, features.shape[-1]).astype(np.float64)
  mu = f.mean(axis=0)
  cov = np.cov(f, rowvar=False)
  cov += ridge * max(np.trace(cov) / cov.shape[0], 1e-6) * np.eye(cov.shape[0])
  return mu, np.linalg.inv(cov)


def mahalanobis_map(features: np.ndarray, mu: np.ndarray, cov_inv: np.ndarray) -> np.ndarray:
  """Mahalanobis distance of every [..., D] feature to (mu, cov_inv)."""
  d = features.astype(np.float64) - mu
  return np.sqrt(np.maximum(np.einsum("...i,ij,...j->...", d, cov_inv, d), 0.0)).astype(np.float32)


def colour_statistics_baseline(
  train_images: np.ndarray, test_images: np.ndarray, window: int = 11
) -> np.ndarray:
  """Anomaly maps of a Gaussian model of local colour statistics.

  Args:
    train_images: [N, H, W, 3] (or [N, H, W]) normal images, uint8 or float.
    test_images: [M, H', W', 3] test images in the same value range.
    window: side of the box over which local mean/std are computed.

  Returns:
    float32 [M, H', W'] anomaly maps (Mahalanobis distances); the image score
    is `maps.reshape(M, -1).max(-1)`.
  """
  mu, cov_inv = fit_gaussian(local_colour_statistics(train_images, window))
  return mahalanobis_map(local_colour_statistics(test_images, window), mu, cov_inv)


def image_scores(anomaly_maps: np.ndarray) -> np.ndarray:
  """Image scores = maximum of each anomaly map."""
  maps = np.asarray(anomaly_maps)
  return maps.reshape(maps.shape[0], -1).max(axis=-1)
