"""The RD4AD student decoder (``de_resnet.py``) and SK-RD4AD's skip connections.

The decoder mirrors the teacher: three stages, each opened by a block that
up-samples 2x with 2x2 stride-2 transposed convolutions, producing D1 (stride 16),
D2 (stride 8), D3 (stride 4). Block counts follow the official code's decoder
order, 3, 4, 6 for bottleneck teachers (the 16x16 stage has 3 blocks) and 2, 2, 2
for resnet18.

SK-RD4AD (``model/de_resnet.py:ResNet._forward_impl`` with ``res != 0``) adds
two parameter-free "non-corresponding" skips: stage 2 takes ReLU(D1 + E3) and
stage 3 takes ReLU(D2 + E2); the returned D1, D2 are the pre-addition outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax

from skrd4ad_jax.models import layers


class DeBottleneck(nn.Module):
  """Decoder bottleneck: 1x1 -> (2x2 deconv s2 | 3x3) -> 1x1, plus shortcut."""

  planes: int
  width: int
  upsample: bool  # True for the first block of a stage (stride 2)
  shortcut: bool  # deconv + BN shortcut (``upsample`` module of the official code)
  train: bool
  expansion: int = 4
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    out_ch = self.planes * self.expansion
    y = layers.conv(self.width, 1, name="conv1", dtype=self.dtype)(x)
    y = nn.relu(layers.batch_norm(self.train, name="bn1", dtype=self.dtype)(y))
    if self.upsample:
      y = layers.Deconv2x2(self.width, name="conv2", dtype=self.dtype)(y)
    else:
      y = layers.conv(self.width, 3, name="conv2", dtype=self.dtype)(y)
    y = nn.relu(layers.batch_norm(self.train, name="bn2", dtype=self.dtype)(y))
    y = layers.conv(out_ch, 1, name="conv3", dtype=self.dtype)(y)
    y = layers.batch_norm(self.train, name="bn3", dtype=self.dtype)(y)
    identity = x
    if self.shortcut:
      identity = layers.Deconv2x2(out_ch, name="upsample_0", dtype=self.dtype)(x)
      identity = layers.batch_norm(self.train, name="upsample_1", dtype=self.dtype)(identity)
    return nn.relu(y + identity)


class DeBasicBlock(nn.Module):
  """Decoder basic block (resnet18/34): (2x2 deconv s2 | 3x3) -> 3x3, plus shortcut."""

  planes: int
  width: int  # unused; kept so both blocks share one constructor signature
  upsample: bool
  shortcut: bool
  train: bool
  expansion: int = 1
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    if self.upsample:
      y = layers.Deconv2x2(self.planes, name="conv1", dtype=self.dtype)(x)
    else:
      y = layers.conv(self.planes, 3, name="conv1", dtype=self.dtype)(x)
    y = nn.relu(layers.batch_norm(self.train, name="bn1", dtype=self.dtype)(y))
    y = layers.conv(self.planes, 3, name="conv2", dtype=self.dtype)(y)
    y = layers.batch_norm(self.train, name="bn2", dtype=self.dtype)(y)
    identity = x
    if self.shortcut:
      identity = layers.Deconv2x2(self.planes, name="upsample_0", dtype=self.dtype)(x)
      identity = layers.batch_norm(self.train, name="upsample_1", dtype=self.dtype)(identity)
    return nn.relu(y + identity)


DECODER_BLOCKS = {"bottleneck": DeBottleneck, "basic": DeBasicBlock}


class Decoder(nn.Module):
  """Student decoder ``de_resnet``: z [B, h, w, Cz] -> [D3, D2, D1].

  Attributes:
    channels: teacher channels (c1, c2, c3) of E1, E2, E3; D3, D2, D1 mirror them.
    block: "bottleneck" or "basic".
    blocks: blocks per stage in decoder order (official: (3, 4, 6) / (2, 2, 2)).
    width_per_group: bottleneck width factor (128 for wide_resnet50_2, 64 for resnet50).
    skip: SK-RD4AD skips (stage 2 <- ReLU(D1 + E3), stage 3 <- ReLU(D2 + E2)).
  """

  channels: Sequence[int]
  block: str = "bottleneck"
  blocks: Sequence[int] = (3, 4, 6)
  width_per_group: int = 128
  skip: bool = True
  dtype: Any = None

  @nn.compact
  def __call__(
    self, z: jax.Array, teacher_features: Sequence[jax.Array] | None = None, train: bool = False
  ) -> list[jax.Array]:
    def skip(stage, x):
      if not self.skip:
        return x
      # E3 (target of D1) feeds stage 2, E2 (target of D2) feeds stage 3.
      return nn.relu(x + teacher_features[len(self.channels) - stage].astype(x.dtype))

    return decoder_stages(
      z, self.channels, self.block, self.blocks, self.width_per_group, train, self.dtype, skip
    )


def decoder_stages(
  z: jax.Array,
  channels: Sequence[int],
  block: str,
  blocks: Sequence[int],
  width_per_group: int,
  train: bool,
  dtype: Any,
  before_stage: Callable[[int, jax.Array], jax.Array],
) -> list[jax.Array]:
  """The ``de_resnet`` stage loop; call it inside a compact module's ``__call__``.

  Stage ``s`` (0, 1, 2) mirrors teacher level 3 - s; its blocks are named
  ``layer{s+1}_{i}`` in the calling module. ``before_stage(s, x)`` transforms the
  input of stages 1 and 2 (SK-RD4AD skips, URD's guided injection).
  Returns [D3, D2, D1], which pair with the teacher's [E1, E2, E3].
  """
  block_cls = DECODER_BLOCKS[block]
  expansion = 4 if block == "bottleneck" else 1
  x = z
  outputs = []
  for stage, out_ch in enumerate(reversed(tuple(channels))):
    if stage > 0:
      x = before_stage(stage, x)
    planes = out_ch // expansion
    width = planes * width_per_group // 64
    for i in range(blocks[stage]):
      # Block 0 up-samples (stride 2), so it always has the deconv shortcut.
      x = block_cls(
        planes=planes,
        width=width,
        upsample=i == 0,
        shortcut=i == 0,
        train=train,
        expansion=expansion,
        dtype=dtype,
        name=f"layer{stage + 1}_{i}",
      )(x)
    outputs.append(x)
  return outputs[::-1]
