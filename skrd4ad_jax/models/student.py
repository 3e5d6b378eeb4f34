"""The RD4AD / SK-RD4AD student: OCBE bottleneck + decoder, and per-teacher defaults."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax

from skrd4ad_jax.models.bottleneck import OCBE
from skrd4ad_jax.models.decoder import Decoder


@dataclasses.dataclass(frozen=True)
class StudentLayout:
  """Widths and depths of the trainable parts for one teacher."""

  channels: tuple[int, int, int]
  block: str
  oce_blocks: int
  decoder_blocks: tuple[int, int, int]
  bottleneck_width_per_group: int
  decoder_width_per_group: int


# The official pairing (RD4AD ``resnet.py`` / ``de_resnet.py``): resnet18 uses
# BasicBlocks with 2 OCE blocks and a (2, 2, 2) decoder; bottleneck teachers use
# 3 OCE blocks and a (3, 4, 6) decoder; width 128 only for wide_resnet50_2.
# vgg16_hed (the offline demo teacher) reuses the bottleneck design.
ARCH_DEFAULTS = {
    "resnet18": dict(block="basic", oce_blocks=2, decoder_blocks=(2, 2, 2), width=64),
    "resnet50": dict(block="bottleneck", oce_blocks=3, decoder_blocks=(3, 4, 6), width=64),
    "wide_resnet50_2": dict(block="bottleneck", oce_blocks=3, decoder_blocks=(3, 4, 6),
                            width=128),
    "vgg16_hed": dict(block="bottleneck", oce_blocks=3, decoder_blocks=(3, 4, 6), width=64),
}


def student_layout(model_cfg) -> StudentLayout:
  """Resolves the layout from ``config.model`` (0 / empty fields = the arch default)."""
  from skrd4ad_jax.teachers import TEACHER_CHANNELS  # pylint: disable=g-import-not-at-top

  arch = model_cfg.teacher
  if arch not in ARCH_DEFAULTS:
    raise ValueError(f"Unknown teacher {arch!r} (config.model.teacher); choose one of "
                     f"{sorted(ARCH_DEFAULTS)}.")
  d = ARCH_DEFAULTS[arch]
  return StudentLayout(
      channels=tuple(TEACHER_CHANNELS[arch]),
      block=d["block"],
      oce_blocks=int(model_cfg.get("oce_blocks", 0) or d["oce_blocks"]),
      decoder_blocks=tuple(model_cfg.get("decoder_blocks", ()) or d["decoder_blocks"]),
      bottleneck_width_per_group=int(model_cfg.get("bottleneck_width_per_group", 0)
                                     or d["width"]),
      decoder_width_per_group=int(model_cfg.get("decoder_width_per_group", 0) or d["width"]),
  )


def ocbe_for(layout: StudentLayout, dtype: Any = None) -> OCBE:
  """The OCBE bottleneck of ``layout`` (shared by every student)."""
  return OCBE(channels=layout.channels, block=layout.block, num_blocks=layout.oce_blocks,
              width_per_group=layout.bottleneck_width_per_group, dtype=dtype)


class RDStudent(nn.Module):
  """OCBE + decoder. ``skip=True`` is SK-RD4AD, ``skip=False`` is RD4AD."""

  layout: StudentLayout
  skip: bool = True
  dtype: Any = None

  def setup(self):
    lay = self.layout
    self.bottleneck = ocbe_for(lay, self.dtype)
    self.decoder = Decoder(channels=lay.channels, block=lay.block, blocks=lay.decoder_blocks,
                           width_per_group=lay.decoder_width_per_group, skip=self.skip,
                           dtype=self.dtype)

  def encode(self, features: Sequence[jax.Array], train: bool = False) -> jax.Array:
    """[E1, E2, E3] -> the one-class embedding z."""
    return self.bottleneck(features, train=train)

  def __call__(self, features: Sequence[jax.Array], train: bool = False) -> list[jax.Array]:
    """[E1, E2, E3] -> [D3, D2, D1] (paired with the teacher's list)."""
    return self.decoder(self.encode(features, train=train), features, train=train)
