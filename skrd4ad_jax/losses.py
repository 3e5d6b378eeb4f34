"""Distillation losses of the RD family.

The official RD4AD loss (``main.py:loss_fucntion``) is the cosine between the
whole flattened feature tensor of each sample, averaged over the batch and summed
over the three levels. The paper's per-pixel cosine, SK-RD4AD's MSE variants
(``--L2 1`` and ``--L2 2``) and its inter-level consistency term are options.
Teacher features are NHWC; flattening order does not change a cosine.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from skrd4ad_jax import interpolation

LOSS_KINDS = ("flat_cosine", "pixel_cosine", "mse", "mse_cosine")


def at_least_float32(*arrays: jax.Array) -> jnp.dtype:
  """float32, or float64 when an input is float64 (the float64 parity tests)."""
  return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def cosine_similarity(a: jax.Array, b: jax.Array, axis: int = -1, eps: float = 1e-8) -> jax.Array:
  """``torch.nn.functional.cosine_similarity``: each norm clamped at ``eps``.

  Computed in float32 at least (bfloat16 inputs are promoted; float64 stays).
  """
  dtype = at_least_float32(a, b)
  a = a.astype(dtype)
  b = b.astype(dtype)
  na = jnp.maximum(jnp.linalg.norm(a, axis=axis), eps)
  nb = jnp.maximum(jnp.linalg.norm(b, axis=axis), eps)
  return jnp.sum(a * b, axis=axis) / (na * nb)


def flat_cosine_distance(t: jax.Array, s: jax.Array) -> jax.Array:
  """mean_b [1 - cos(t_b, s_b)] over the flattened C*H*W vectors (official loss)."""
  b = t.shape[0]
  return jnp.mean(1.0 - cosine_similarity(t.reshape(b, -1), s.reshape(b, -1)))


def pixel_cosine_distance(t: jax.Array, s: jax.Array) -> jax.Array:
  """mean_{b,h,w} [1 - cos_c(t, s)] (the paper's Eq. 1-2)."""
  return jnp.mean(1.0 - cosine_similarity(t, s, axis=-1))


def mse(t: jax.Array, s: jax.Array) -> jax.Array:
  dtype = at_least_float32(t, s)
  return jnp.mean(jnp.square(t.astype(dtype) - s.astype(dtype)))


def level_loss(t: jax.Array, s: jax.Array, kind: str) -> jax.Array:
  """The per-level term of the main loss."""
  if kind == "flat_cosine":
    return flat_cosine_distance(t, s)
  if kind == "pixel_cosine":
    return pixel_cosine_distance(t, s)
  if kind == "mse":
    return mse(t, s)
  if kind == "mse_cosine":
    return 0.5 * mse(t, s) + 0.5 * flat_cosine_distance(t, s)
  raise ValueError(f"Unknown loss kind {kind!r}; choose one of {LOSS_KINDS} (config.loss.kind).")


def consistency_loss(teacher: Sequence[jax.Array], student: Sequence[jax.Array]) -> jax.Array:
  """SK-RD4AD's inter-level consistency term (``main.py:loss_function``).

  With teacher [E1, E2, E3] and student [D3, D2, D1] (paired by index):
  |MSE(up(E3), up(D1)) - MSE(E2, D2)| + |MSE(up(E2), up(D2)) - MSE(E1, D3)|,
  up = bilinear align_corners=True to the next finer level's size.
  """
  total = jnp.float32(0.0)
  for fine in range(len(teacher) - 1):
    coarse = fine + 1
    size = teacher[fine].shape[1:3]
    up_t = interpolation.resize_align_corners(teacher[coarse], size)
    up_s = interpolation.resize_align_corners(student[coarse], size)
    total = total + jnp.abs(mse(up_t, up_s) - mse(teacher[fine], student[fine]))
  return total


def distillation_loss(
  teacher: Sequence[jax.Array],
  student: Sequence[jax.Array],
  kind: str = "flat_cosine",
  consistency_rate: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Sum over levels of the main term, plus ``rate * consistency``.

  Args:
    teacher: [E1, E2, E3], each [B, h, w, C].
    student: [D3, D2, D1] ordered to pair with ``teacher``.
    kind: one of ``LOSS_KINDS``.
    consistency_rate: weight of SK-RD4AD's consistency term (0 disables it).

  Returns:
    (total loss, dict of parts for logging).
  """
  parts = {}
  main = jnp.float32(0.0)
  for level, (t, s) in enumerate(zip(teacher, student)):
    term = level_loss(t, s, kind)
    parts[f"level{level + 1}"] = term
    main = main + term
  parts["main"] = main
  total = main
  if consistency_rate:
    parts["consistency"] = consistency_loss(teacher, student)
    total = total + consistency_rate * parts["consistency"]
  return total, parts
