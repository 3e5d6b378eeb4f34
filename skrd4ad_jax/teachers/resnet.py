"""torchvision ResNet v1.5 teachers, layers 1-3.

The teachers reproduce ``torchvision.models.resnet18 / resnet50 /
wide_resnet50_2`` up to ``layer3``: the RD family reads only the layer1-3
features, so ``layer4`` is never computed. Submodule names follow the state-dict
keys of torchvision with a numeric token joined to the previous one by ``_``
(``layer1.0.downsample.1`` -> ``layer1_0/downsample_1``), which makes porting a
dict rename (see ``skrd4ad_jax.teachers.porting``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax

from skrd4ad_jax.models import layers
from skrd4ad_jax.models.blocks import STAGE_PLANES, BasicBlock, Bottleneck


class ResNetTeacher(nn.Module):
  """Frozen torchvision ResNet returning the ``[layer1, layer2, layer3]`` features.

  Stem: conv 7x7 s2 p3 - BN - ReLU - maxpool 3x3 s2 p1; then ``len(stage_sizes)``
  stages. BatchNorm always uses running statistics and the outputs are wrapped
  in ``stop_gradient``: the teacher is never differentiated.

  Attributes:
    block: ``'basic'`` or ``'bottleneck'``.
    stage_sizes: Blocks per stage, e.g. ``(3, 4, 6)`` for layer1..layer3.
    width_per_group: 64 for ResNet, 128 for WideResNet-50-2.
    base_width: channels of the stem; every stage's planes scale with it
      (64 for torchvision's ResNets, 16 for ``resnet_micro``).
    dtype: Computation dtype (None: float32).
  """

  block: str
  stage_sizes: Sequence[int]
  width_per_group: int = 64
  base_width: int = 64
  dtype: Any = None
  # True only for RD with Expert's trainable teacher copy: BatchNorm follows
  # ``train`` and the outputs are differentiable.
  trainable: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
    """Maps an ImageNet-normalised RGB batch [B, H, W, 3] to the stage features.

    Args:
      x: the images.
      train: batch statistics in BatchNorm (only with ``trainable``).

    Returns:
      ``[layer1, layer2, layer3]``, at strides 4, 8, 16 ([B, H/4, W/4, C1], ...).
    """
    train = train and self.trainable
    block_cls = {"basic": BasicBlock, "bottleneck": Bottleneck}[self.block]
    x = layers.conv(self.base_width, 7, 2, name="conv1", dtype=self.dtype)(x)
    x = nn.relu(layers.batch_norm(train, name="bn1", dtype=self.dtype)(x))
    x = layers.max_pool_3x3_s2(x)  # [B, H/4, W/4, base_width]
    in_channels = self.base_width
    features = []
    for stage, num_blocks in enumerate(self.stage_sizes):
      planes = STAGE_PLANES[stage] * self.base_width // 64
      for i in range(num_blocks):
        stride = 2 if stage > 0 and i == 0 else 1
        out_channels = planes * block_cls.expansion
        kwargs = dict(
          planes=planes,
          stride=stride,
          downsample=i == 0 and (stride != 1 or in_channels != out_channels),
          train=train,
          dtype=self.dtype,
          name=f"layer{stage + 1}_{i}",
        )
        if block_cls is Bottleneck:
          kwargs["width"] = planes * self.width_per_group // 64
        x = block_cls(**kwargs)(x)
        in_channels = out_channels
      features.append(x if self.trainable else jax.lax.stop_gradient(x))
    return features


def resnet18(dtype: Any = None) -> ResNetTeacher:
  """ResNet-18 layers 1-3 (BasicBlock [2, 2, 2]; 64/128/256 channels)."""
  return ResNetTeacher(block="basic", stage_sizes=(2, 2, 2), dtype=dtype)


def resnet_micro(dtype: Any = None) -> ResNetTeacher:
  """A ResNet-18 layout a quarter as wide with one block per stage (16/32/64 channels).

  No published weights: a seeded random init for tests and smoke runs, where a
  step, a checkpoint and a compile should cost as little as the wiring allows.
  """
  return ResNetTeacher(block="basic", stage_sizes=(1, 1, 1), base_width=16, dtype=dtype)


def resnet50(dtype: Any = None) -> ResNetTeacher:
  """ResNet-50 layers 1-3 (Bottleneck [3, 4, 6]; 256/512/1024 channels)."""
  return ResNetTeacher(block="bottleneck", stage_sizes=(3, 4, 6), dtype=dtype)


def wide_resnet50_2(dtype: Any = None) -> ResNetTeacher:
  """WideResNet-50-2 layers 1-3 (the RD4AD teacher; 256/512/1024 channels)."""
  return ResNetTeacher(block="bottleneck", stage_sizes=(3, 4, 6), width_per_group=128, dtype=dtype)
