"""MRKD's feature-level masking (FLM) heads and the MRKD student.

MRKD (``de_resnet.py:ResNet._forward_impl``) keeps the RD4AD decoder chain
unmasked and adds, per level, a generation head fed a randomly masked copy of
the decoder output:

  M ~ Bernoulli per sample and position, shared over channels, M = 0 with
      probability ``mask_ratio`` (0.2; ``torch.where(rand > 1 - 0.2, 0, 1)``);
  G(D * M) = Conv3x3(c -> c, bias) -> ReLU -> Conv3x3(c -> c, bias).

Convolutions are named after the official ``generation1..3`` sequentials
(``generation1`` acts on D1, the 1024-channel level of wide_resnet50_2):
``generation1.0.weight`` -> ``heads/generation1_0/kernel``. Weights: Kaiming
fan-out (the official init loop covers every ``nn.Conv2d``); biases keep
PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
For wide_resnet50_2 the heads hold 24,776,192 parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from skrd4ad_jax.models import layers
from skrd4ad_jax.models.student import StudentLayout, decoder_for, ocbe_for

FLM_RNG = "flm"  # the PRNG stream of the FLM masks (``rngs={'flm': key}``)


def flm_mask(key: jax.Array, shape: Sequence[int], mask_ratio: float) -> jax.Array:
  """[B, h, w, 1] float mask, 0 with probability ``mask_ratio`` (MRKD's ``mat``)."""
  u = jax.random.uniform(key, tuple(shape[:3]) + (1,))
  return (u <= 1.0 - mask_ratio).astype(jnp.float32)


class FLMHeads(nn.Module):
  """Per-level masking + generation: [D3, D2, D1] -> [G3(D3*M3), G2(D2*M2), G1(D1*M1)].

  Attributes:
    mask_ratio: probability that a spatial position is zeroed.
  """

  mask_ratio: float = 0.2
  dtype: Any = None

  @nn.compact
  def __call__(self, decoded: Sequence[jax.Array], mask: bool) -> list[jax.Array]:
    """Applies the heads.

    Args:
      decoded: [D3, D2, D1] decoder outputs (paired with [E1, E2, E3]).
      mask: draw FLM masks from the ``'flm'`` PRNG stream (training, and test
        time when ``mask_at_test``); False feeds the features unmasked.

    Returns:
      The generated features, in the same order.
    """
    outs = []
    n = len(decoded)
    for i, d in enumerate(decoded):
      if mask:
        d = d * flm_mask(self.make_rng(FLM_RNG), d.shape, self.mask_ratio).astype(d.dtype)
      # decoded[i] is D_{n-i}: generation1 serves D1 (the deepest, last in the list).
      outs.append(self._generate(d, f"generation{n - i}"))
    return outs

  def _generate(self, x: jax.Array, prefix: str) -> jax.Array:
    """``nn.Sequential(Conv3x3, ReLU, Conv3x3)``; convs named ``<prefix>_0``, ``<prefix>_2``."""
    c = x.shape[-1]
    bias_init = layers.torch_default_bias_init(9 * c)
    x = layers.conv(c, 3, name=f"{prefix}_0", use_bias=True, bias_init=bias_init, dtype=self.dtype)(
      x
    )
    return layers.conv(
      c, 3, name=f"{prefix}_2", use_bias=True, bias_init=bias_init, dtype=self.dtype
    )(nn.relu(x))


class MRKDStudent(nn.Module):
  """OCBE + RD4AD decoder (no skips) + FLM heads.

  The parameter tree is RD4AD's (``bottleneck``, ``decoder``) plus ``heads``.
  """

  layout: StudentLayout
  mask_ratio: float = 0.2
  dtype: Any = None

  def setup(self):
    lay = self.layout
    self.bottleneck = ocbe_for(lay, self.dtype)
    self.decoder = decoder_for(lay, skip=False, dtype=self.dtype)
    self.heads = FLMHeads(mask_ratio=self.mask_ratio, dtype=self.dtype)

  def __call__(
    self, features: Sequence[jax.Array], train: bool = False, mask: bool = False
  ) -> list[jax.Array]:
    """[E1, E2, E3] -> [G3, G2, G1] (paired with the teacher's list).

    Args:
      features: teacher features (of the ILM-corrupted image in training).
      train: BatchNorm on batch statistics.
      mask: apply the FLM masks (needs ``rngs={'flm': key}``).
    """
    z = self.bottleneck(features, train=train)
    decoded = self.decoder(z, None, train=train)
    return self.heads(decoded, mask=mask)
