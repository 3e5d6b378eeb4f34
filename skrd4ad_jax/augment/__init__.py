"""Host-side synthetic anomalies (numpy only), made in ``Method.make_batch``.

- ``ilm``: MRKD's image-level masking, NSA-style self copy-paste ('swap').
- ``draem``: RD with Expert's DRAEM-style Perlin masks blended with a texture.

Training batches arrive ImageNet-normalised (float32 [B, H, W, 3]); the helpers
below move between that space and 0-255 RGB where a rule is defined on pixel
intensities. Every random draw uses the ``np.random.Generator`` passed in, so a
batch is a function of (images, generator state) only.
"""

from __future__ import annotations

import numpy as np

IMAGENET_MEAN = np.asarray((0.485, 0.456, 0.406), np.float32)  # RGB, images in [0, 1]
IMAGENET_STD = np.asarray((0.229, 0.224, 0.225), np.float32)


def to_uint8_range(images: np.ndarray) -> np.ndarray:
  """ImageNet-normalised [..., 3] -> RGB float in [0, 255] (not rounded)."""
  return (np.asarray(images, np.float32) * IMAGENET_STD + IMAGENET_MEAN) * 255.0


def normalize(rgb01: np.ndarray) -> np.ndarray:
  """RGB in [0, 1] [..., 3] -> ImageNet-normalised float32."""
  return ((np.asarray(rgb01, np.float32) - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


def changed_pixels(before: np.ndarray, after: np.ndarray) -> np.ndarray:
  """[H, W] bool: pixels where any channel differs (the exact anomaly mask)."""
  return np.any(before != after, axis=-1)
