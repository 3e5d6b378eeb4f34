"""RD with Expert (URD, AAAI 2025): the trainable teacher and the fusion student.

Teacher (``models/teacher.py``): a second copy of the ImageNet encoder, trained.
``trainable_teacher`` has the parameter tree of the frozen teacher
(``teachers.build_teacher``), so it is initialised by copying the shared
teacher variables, but BatchNorm follows ``train`` and nothing is under
``stop_gradient``.

Student (``models/student.py:Student``): OCBE + RD4AD decoder + fusion modules
that inject teacher detail between the decoder stages. With teacher features
[T1, T2, T3] and dims (C1, C2, C3) (256/512/1024 for wide_resnet50_2), at the
input of decoder stage 2 (level index 1) and stage 3 (index 0):

  G = fuse_encoder[i](T_coarse + conv1x1_downsample_dim[i](T_fine))
  plain (``forward_decoder_wogii``):  F = fuse_skip[i](concat[D, G])
  gated (``forward_decoder_gii``):    s = cos_c(stop_gradient(D), T_coarse)
                                      F = fuse_skip[i](concat[D,
                                            conv3x3_simattn[i](G s + D (1 - s))])

where (T_fine, T_coarse, D) = (T2, T3, D1) for index 1 and (T1, T2, D2) for
index 0. Every fusion block is conv (bias-free) -> BN -> ReLU;
``conv1x1_downsample_dim`` first halves the resolution with
``nn.Upsample(scale_factor=0.5, mode='bilinear')``, which samples at 2k + 0.5
and so equals 2x2 average pooling (used here). ``conv3x3_simattn`` is built in
both variants (same parameter tree, interchangeable checkpoints) but only the
gated one calls it.

Fusion parameters for wide_resnet50_2 (convs + BN scale/bias):
fuse_skip 23,596,032; conv3x3_simattn 11,799,552; conv1x1_downsample_dim
658,432; fuse_encoder 11,799,552 (spec: 23.6 M, 11.8 M, 0.66 M, 11.8 M).

Init: the official ``Student`` applies ``xavier_normal_`` to every
``nn.Conv2d`` it holds (OCBE and decoder included); transposed convs keep
PyTorch's default. ``xavier_reinit`` does that on an initialised tree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from skrd4ad_jax import losses
from skrd4ad_jax.models import layers
from skrd4ad_jax.models.decoder import decoder_stages
from skrd4ad_jax.models.student import StudentLayout, ocbe_for

FUSION_MODULES = ("fuse_skip", "conv3x3_simattn", "conv1x1_downsample_dim", "fuse_encoder")


def trainable_teacher(arch: str, dtype: Any = None) -> nn.Module:
  """The frozen teacher's module and parameter tree, with trainable BatchNorm
  (``apply(..., train=True)``) and differentiable outputs."""
  from skrd4ad_jax import teachers

  return teachers.build_teacher(arch, dtype=dtype).clone(trainable=True)


class ConvBNReLU(nn.Module):
  """Bias-free conv (xavier normal) -> BN -> ReLU, named ``conv`` / ``bn``."""

  features: int
  kernel: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = layers.conv(
      self.features, self.kernel, name="conv", kernel_init=layers.xavier_normal, dtype=self.dtype
    )(x)
    return nn.relu(layers.batch_norm(train, name="bn", dtype=self.dtype)(x))


def avg_pool_2x2(x: jax.Array) -> jax.Array:
  """``nn.Upsample(scale_factor=0.5, mode='bilinear')``, i.e. the 2x2 mean.

  [B, H, W, C] -> [B, H/2, W/2, C].
  """
  return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")


class GuidedDecoder(nn.Module):
  """The RD4AD decoder with URD's fusion modules between its stages.

  Decoder blocks keep the names of ``decoder.Decoder`` (``layer{s}_{i}``); the
  fusion modules are named after the official ``nn.ModuleList`` entries
  (``fuse_skip.1`` -> ``fuse_skip_1``).

  Attributes:
    layout: widths and depths (``student.StudentLayout``).
    gated: the paper's guided information injection (``forward_decoder_gii``);
      False is the plain injection the released scripts run.
  """

  layout: StudentLayout
  gated: bool = False
  dtype: Any = None

  @nn.compact
  def __call__(
    self, z: jax.Array, features: Sequence[jax.Array], train: bool = False
  ) -> list[jax.Array]:
    """z [B, h, w, Cz], teacher [T1, T2, T3] -> [D3, D2, D1]."""
    lay = self.layout
    n = len(lay.channels)
    return decoder_stages(
      z,
      lay.channels,
      lay.block,
      lay.decoder_blocks,
      lay.decoder_width_per_group,
      train,
      self.dtype,
      lambda stage, x: self._inject(x, features, n - 1 - stage, train),
    )

  def _inject(self, d: jax.Array, features: Sequence[jax.Array], i: int, train: bool) -> jax.Array:
    """Fusion at level ``i`` (1: D1 with T3 + down(T2); 0: D2 with T2 + down(T1))."""
    fine = features[i].astype(d.dtype)  # [B, 2h, 2w, C_i]
    coarse = features[i + 1].astype(d.dtype)  # [B, h, w, C_{i+1}] like d
    c = coarse.shape[-1]
    g = ConvBNReLU(c, 1, dtype=self.dtype, name=f"conv1x1_downsample_dim_{i}")(
      avg_pool_2x2(fine), train
    )
    g = ConvBNReLU(c, 3, dtype=self.dtype, name=f"fuse_encoder_{i}")(coarse + g, train)
    simattn = ConvBNReLU(c, 3, dtype=self.dtype, name=f"conv3x3_simattn_{i}")
    if self.gated:
      # Computed under no_grad in the official code; in [0, 1] for post-ReLU features.
      s = jax.lax.stop_gradient(losses.cosine_similarity(d, coarse, axis=-1))[..., None]
      s = s.astype(d.dtype)
      injected = simattn(g * s + d * (1 - s), train)
    else:
      injected = g
      if self.is_initializing():
        simattn(g, train)  # created (as in the official model) but unused
    return ConvBNReLU(c, 3, dtype=self.dtype, name=f"fuse_skip_{i}")(
      jnp.concatenate([d, injected], axis=-1), train
    )


class ExpertStudent(nn.Module):
  """URD student: OCBE (``bottleneck``) + ``GuidedDecoder`` (``decoder``)."""

  layout: StudentLayout
  gated: bool = False
  dtype: Any = None

  def setup(self):
    lay = self.layout
    self.bottleneck = ocbe_for(lay, self.dtype)
    self.decoder = GuidedDecoder(layout=lay, gated=self.gated, dtype=self.dtype)

  def __call__(self, features: Sequence[jax.Array], train: bool = False) -> list[jax.Array]:
    """Teacher [T1, T2, T3] -> [D3, D2, D1]."""
    return self.decoder(self.bottleneck(features, train=train), features, train=train)


def xavier_reinit(params: Any, rng: jax.Array) -> Any:
  """``Student.apply(init_weight)``: xavier_normal_ on every conv kernel.

  Transposed convolutions (``layers.Deconv2x2``, the only [2, 2, ...] kernels
  of the student) keep PyTorch's default init, as in the official code, where
  ``nn.ConvTranspose2d`` is not an ``nn.Conv2d``.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  out = []
  for idx, (path, leaf) in enumerate(leaves):
    name = getattr(path[-1], "key", None)
    if name == "kernel" and leaf.ndim == 4 and tuple(leaf.shape[:2]) != (2, 2):
      leaf = layers.xavier_normal(jax.random.fold_in(rng, idx), leaf.shape, leaf.dtype)
    out.append(leaf)
  return jax.tree_util.tree_unflatten(treedef, out)


def fusion_parameter_counts(student_params: Any) -> dict[str, int]:
  """Parameters per fusion module family (conv + BN), summed over the levels."""
  counts = {name: 0 for name in FUSION_MODULES}
  for key, sub in student_params["decoder"].items():
    for name in FUSION_MODULES:
      if key.startswith(name + "_") and key[len(name) + 1 :].isdigit():
        counts[name] += sum(int(x.size) for x in jax.tree.leaves(sub))
  return counts
