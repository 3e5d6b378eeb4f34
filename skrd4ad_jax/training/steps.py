"""The jitted steps shared by every method, in the style of flax ``examples/imagenet``.

``train_step`` advances one job's ``TrainState`` (``methods/state.py``) by one
batch; ``training/parallel.py`` stacks it over slots. ``eval_step`` computes
anomaly maps and scores. The frozen teacher's variables are a separate, shared
argument.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from skrd4ad_jax.methods.state import TrainState


def select_tree(pred: jax.Array, new: Any, old: Any) -> Any:
  """Leafwise ``where(pred, new, old)``; ``pred`` is a scalar bool."""
  return jax.tree.map(lambda n, o: jnp.where(pred, n, o), new, old)


def train_step(
  method,
  state: TrainState,
  teacher_vars: Any,
  batch: dict,
  base_rng: jax.Array,
  active: jax.Array | bool = True,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step of one category.

  Args:
    method: a ``methods.Method`` (static).
    state: the category's ``TrainState``.
    teacher_vars: the frozen teacher's variables.
    batch: host-made batch dict (``image`` [B, H, W, 3] plus method extras).
    base_rng: the run's PRNG key; the step's key is ``fold_in(base_rng, state.step)``,
      a function of the category's own step only, so a category's randomness does
      not depend on which categories share a run.
    active: False leaves the state untouched (finished schedules, padded slots).

  Returns:
    (new state, metrics dict of scalars).
  """
  rng = jax.random.fold_in(base_rng, state.step)
  new_state, metrics = method.train_step(state, teacher_vars, batch, rng)
  # A finished or padded category keeps its state bit-for-bit.
  new_state = select_tree(jnp.asarray(active), new_state, state)
  return new_state, metrics


def eval_step(
  method, state: TrainState, teacher_vars: Any, images: jax.Array, rng: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Anomaly maps [B, H, W] and image scores [B] of one category."""
  return method.anomaly_maps(state, teacher_vars, images, rng)


@functools.cache
def jitted_train_step(method):
  """Single-category jitted step with the state donated."""
  return jax.jit(functools.partial(train_step, method), donate_argnums=(0,))


@functools.cache
def jitted_eval_step(method):
  return jax.jit(functools.partial(eval_step, method))


def check_finite(losses: dict[str, float], first_step: int, last_step: int, category: str) -> None:
  """Raises with the step range when a logged loss is NaN or infinite."""
  bad = {k: v for k, v in losses.items() if not math.isfinite(float(v))}
  if bad:
    raise FloatingPointError(
      f"[{category}] loss became non-finite between steps {first_step} and "
      f"{last_step}: {bad}. Checkpoints written so far are kept. Lower "
      "config.train.learning_rate, check the input images, or use float32 "
      "(config.model.dtype)."
    )
