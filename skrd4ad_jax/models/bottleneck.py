"""The trainable one-class bottleneck (OCBE = MFF + OCE), RD4AD ``resnet.py:BN_layer``.

MFF: E1 -> conv3x3 s2 -> BN -> ReLU -> conv3x3 s2 -> BN -> ReLU; E2 -> conv3x3 s2
-> BN -> ReLU; both concatenated with E3 (all at E3's stride). OCE: a residual
stage (``_make_layer(block, planes, n, stride=2)``) whose first block takes the
3*C3 concatenation, giving z at twice E3's stride with 2*C3 channels.

The official module also constructs ``conv4``/``bn4`` (a 1x1 fusion conv the paper
describes) but never uses them in ``forward``; they are not built here, so the
parameter count is that of the used layers (58,885,120 for wide_resnet50_2).
Channel widths generalise from the teacher's (C1, C2, C3): conv1 C1->C2, conv2
and conv3 C2->C3, as in the official code for every ResNet.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from skrd4ad_jax.models import layers
from skrd4ad_jax.models.blocks import BasicBlock, Bottleneck


class OCBE(nn.Module):
  """Multi-scale feature fusion + one-class embedding: [E1, E2, E3] -> z.

  Attributes:
    channels: teacher channels (C1, C2, C3).
    block: "bottleneck" or "basic" (resnet18/34).
    num_blocks: blocks in the OCE stage (official: 3 for bottleneck teachers,
      2 for resnet18).
    width_per_group: OCE bottleneck width factor (official RD4AD 128 for
      wide_resnet50_2; anomalib uses 64).
  """

  channels: Sequence[int]
  block: str = "bottleneck"
  num_blocks: int = 3
  width_per_group: int = 128
  dtype: Any = None

  @nn.compact
  def __call__(self, features: Sequence[jax.Array], train: bool = False) -> jax.Array:
    c1, c2, c3 = self.channels
    del c1
    e1, e2, e3 = features

    def conv_bn_relu(x, features_out, idx):
      x = layers.conv(features_out, 3, 2, name=f"conv{idx}", dtype=self.dtype)(x)
      return nn.relu(layers.batch_norm(train, name=f"bn{idx}", dtype=self.dtype)(x))

    l1 = conv_bn_relu(conv_bn_relu(e1, c2, 1), c3, 2)  # [B, h3, w3, C3]
    l2 = conv_bn_relu(e2, c3, 3)  # [B, h3, w3, C3]
    x = jnp.concatenate([l1, l2, e3.astype(l1.dtype)], axis=-1)  # [B, h3, w3, 3*C3]

    out_ch = 2 * c3
    for i in range(self.num_blocks):
      if self.block == "bottleneck":
        planes = out_ch // Bottleneck.expansion
        x = Bottleneck(
          planes=planes,
          stride=2 if i == 0 else 1,
          width=planes * self.width_per_group // 64,
          downsample=i == 0,
          train=train,
          dtype=self.dtype,
          name=f"bn_layer_{i}",
        )(x)
      else:
        x = BasicBlock(
          planes=out_ch,
          stride=2 if i == 0 else 1,
          downsample=i == 0,
          train=train,
          dtype=self.dtype,
          name=f"bn_layer_{i}",
        )(x)
    return x  # z: [B, h3/2, w3/2, 2*C3]
