"""The RD4AD / SK-RD4AD student: OCBE bottleneck + decoder, laid out for a teacher."""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
from typing import Any

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


def ocbe_for(layout: StudentLayout, dtype: Any = None) -> OCBE:
  """The OCBE bottleneck of ``layout`` (shared by every student)."""
  return OCBE(
    channels=layout.channels,
    block=layout.block,
    num_blocks=layout.oce_blocks,
    width_per_group=layout.bottleneck_width_per_group,
    dtype=dtype,
  )


def decoder_for(layout: StudentLayout, skip: bool, dtype: Any = None) -> Decoder:
  """The decoder of ``layout``, with (SK-RD4AD) or without (RD4AD, MRKD) skips."""
  return Decoder(
    channels=layout.channels,
    block=layout.block,
    blocks=layout.decoder_blocks,
    width_per_group=layout.decoder_width_per_group,
    skip=skip,
    dtype=dtype,
  )


class RDStudent(nn.Module):
  """OCBE + decoder. ``skip=True`` is SK-RD4AD, ``skip=False`` is RD4AD."""

  layout: StudentLayout
  skip: bool = True
  dtype: Any = None

  def setup(self):
    lay = self.layout
    self.bottleneck = ocbe_for(lay, self.dtype)
    self.decoder = decoder_for(lay, self.skip, self.dtype)

  def encode(self, features: Sequence[jax.Array], train: bool = False) -> jax.Array:
    """[E1, E2, E3] -> the one-class embedding z."""
    return self.bottleneck(features, train=train)

  def __call__(self, features: Sequence[jax.Array], train: bool = False) -> list[jax.Array]:
    """[E1, E2, E3] -> [D3, D2, D1] (paired with the teacher's list)."""
    return self.decoder(self.encode(features, train=train), features, train=train)
