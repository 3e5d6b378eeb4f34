"""ImageNet normalisation: the one place for its constants (numpy only).

Every teacher takes RGB images normalised as ``(x / 255 - IMAGENET_MEAN) /
IMAGENET_STD`` (the RD4AD pre-processing). The data pipeline, the host-side
augmentations (MRKD's ILM, RD with Expert's DRAEM), the pictures, the VGG
teacher's conversion to HED's convention and the exported models all read the
constants from here.
"""

from __future__ import annotations

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB, images in [0, 1]
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN = np.asarray(IMAGENET_MEAN, np.float32)
_STD = np.asarray(IMAGENET_STD, np.float32)


def to_uint8_range(images: np.ndarray) -> np.ndarray:
  """ImageNet-normalised [..., 3] -> RGB float in [0, 255] (not rounded)."""
  return (np.asarray(images, np.float32) * _STD + _MEAN) * 255.0


def normalize_uint8(images: np.ndarray) -> np.ndarray:
  """uint8 RGB [..., 3] -> ImageNet-normalised float32."""
  return normalize(np.asarray(images, np.float32) / np.float32(255.0))


def normalize(rgb01: np.ndarray) -> np.ndarray:
  """RGB in [0, 1] [..., 3] -> ImageNet-normalised float32."""
  return ((np.asarray(rgb01, np.float32) - _MEAN) / _STD).astype(np.float32)


def changed_pixels(before: np.ndarray, after: np.ndarray) -> np.ndarray:
  """[H, W] bool: pixels where any channel differs (the exact anomaly mask)."""
  return np.any(before != after, axis=-1)
