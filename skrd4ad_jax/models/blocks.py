"""torchvision's residual blocks, shared by the ResNet teachers and the OCBE bottleneck.

``BasicBlock`` and ``Bottleneck`` reproduce ``torchvision.models.resnet``'s
blocks (v1.5: the stride sits on the 3x3 conv). Submodule names follow the
state-dict keys with a numeric token joined to the previous one by ``_``
(``downsample.1`` -> ``downsample_1``), which makes porting a dict rename. The
frozen teacher builds them with ``train=False`` (running statistics); the
trainable bottleneck (OCBE) with ``train=True`` (batch statistics).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from skrd4ad_jax.models import layers

# Output channels of the stages layer1..layer4 before the block expansion.
STAGE_PLANES = (64, 128, 256, 512)


class BasicBlock(nn.Module):
  """torchvision ``BasicBlock``: 3x3 conv - BN - ReLU - 3x3 conv - BN, + shortcut, ReLU.

  Attributes:
    planes: Output channels (``expansion`` = 1).
    stride: Stride of the first 3x3 conv and of the shortcut conv.
    downsample: Whether the shortcut is ``conv1x1(stride) + BN`` (named
      ``downsample_0`` / ``downsample_1``) instead of the identity.
    train: BatchNorm on batch statistics (True) or running statistics (False).
    dtype: Computation dtype (None: the input's / float32).
  """

  planes: int
  stride: int = 1
  downsample: bool = False
  train: bool = False
  dtype: Any = None

  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, H/s, W/s, planes]
    y = layers.conv(self.planes, 3, self.stride, name="conv1", dtype=self.dtype)(x)
    y = nn.relu(layers.batch_norm(self.train, name="bn1", dtype=self.dtype)(y))
    y = layers.conv(self.planes, 3, 1, name="conv2", dtype=self.dtype)(y)
    y = layers.batch_norm(self.train, name="bn2", dtype=self.dtype)(y)
    if self.downsample:
      x = layers.conv(self.planes, 1, self.stride, name="downsample_0", dtype=self.dtype)(x)
      x = layers.batch_norm(self.train, name="downsample_1", dtype=self.dtype)(x)
    return nn.relu(y + x)


class Bottleneck(nn.Module):
  """torchvision ``Bottleneck`` (v1.5: the stride sits on the 3x3 conv).

  ``conv1 1x1 (C -> width) - BN - ReLU - conv2 3x3 stride s (width -> width) - BN -
  ReLU - conv3 1x1 (width -> 4 * planes) - BN``, + shortcut, ReLU. All convs are
  bias-free.

  Attributes:
    planes: Stage planes; the block outputs ``4 * planes`` channels.
    stride: Stride of ``conv2`` and of the shortcut conv.
    width: Inner width (None: ``planes``; WideResNet-50-2 uses ``2 * planes``).
    downsample: Whether the shortcut is ``conv1x1(stride) + BN``.
    train: BatchNorm on batch statistics (True) or running statistics (False).
    dtype: Computation dtype (None: the input's / float32).
  """

  planes: int
  stride: int = 1
  width: int | None = None
  downsample: bool = False
  train: bool = False
  dtype: Any = None

  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, H/s, W/s, 4 * planes]
    width = self.width or self.planes
    out = self.planes * self.expansion
    y = layers.conv(width, 1, 1, name="conv1", dtype=self.dtype)(x)
    y = nn.relu(layers.batch_norm(self.train, name="bn1", dtype=self.dtype)(y))
    y = layers.conv(width, 3, self.stride, name="conv2", dtype=self.dtype)(y)
    y = nn.relu(layers.batch_norm(self.train, name="bn2", dtype=self.dtype)(y))
    y = layers.conv(out, 1, 1, name="conv3", dtype=self.dtype)(y)
    y = layers.batch_norm(self.train, name="bn3", dtype=self.dtype)(y)
    if self.downsample:
      x = layers.conv(out, 1, self.stride, name="downsample_0", dtype=self.dtype)(x)
      x = layers.batch_norm(self.train, name="downsample_1", dtype=self.dtype)(x)
    return nn.relu(y + x)
