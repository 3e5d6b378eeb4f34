"""Training state, optimiser and the jitted steps shared by every method.

The steps are small pure functions in the style of flax ``examples/imagenet``.
A ``TrainState`` holds only what is trained (bottleneck, decoder and whatever a
method adds); the frozen teacher's variables are a separate, shared argument:
never optimised, never checkpointed. Because the state is a plain pytree with no
Python-side state inside the step, states of several categories stack on a
leading axis and one ``jax.vmap``-ed step advances them all (``parallel.py``).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """What a training step updates. All leaves are arrays."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def adam(learning_rate: float, b1: float, b2: float) -> optax.GradientTransformation:
  """The RD-family optimiser: ``torch.optim.Adam(lr, betas=(b1, b2))``, eps 1e-8.

  ``optax.adam`` with PyTorch's bias correction (``scale_by_torch_adam``); the
  optimiser state has ``optax.adam``'s structure, so checkpoints of either restore.
  """
  return optax.chain(scale_by_torch_adam(b1, b2), optax.scale_by_learning_rate(learning_rate))


def scale_by_torch_adam(b1: float, b2: float, eps: float = 1e-8) -> optax.GradientTransformation:
  """``optax.scale_by_adam`` whose bias corrections ``1 - b**t`` keep full precision.

  optax computes ``1 - b2**t`` in float32: for b2 = 0.999 it loses 1.3e-5 of its
  value at t = 1 and still about 2e-6 after thousands of steps, so every update
  is off by half that, always in the same direction. PyTorch computes it in
  float64 on the host. Here it is ``-expm1(t * log(b))`` with ``log(b)`` a
  float64 constant, exact to the parameters' rounding.
  """
  log_b1 = math.log(b1) if b1 > 0 else -math.inf
  log_b2 = math.log(b2) if b2 > 0 else -math.inf
  base = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)

  def update(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count = optax.safe_increment(state.count)
    dtype = jnp.promote_types(jnp.result_type(*jax.tree.leaves(mu)), jnp.float32)
    t = count.astype(dtype)
    # Computed once, outside the element-wise loops: fused into them, XLA:CPU
    # evaluated expm1 differently in a parallel run's program than in a single
    # category's, and a category's parameters after training were no longer
    # bit-identical to training it alone (tests/test_parallel.py).
    correction1, correction2 = jax.lax.optimization_barrier(
      (-jnp.expm1(t * log_b1), -jnp.expm1(t * log_b2))  # 1 - b1**t, 1 - b2**t
    )

    def scale(m, v):
      return (m / correction1.astype(m.dtype)) / (jnp.sqrt(v / correction2.astype(v.dtype)) + eps)

    return jax.tree.map(scale, mu, nu), optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(base.init, update)


def apply_gradients(
  tx: optax.GradientTransformation, state: TrainState, grads: Any, batch_stats: Any
) -> TrainState:
  """One optimiser update of ``state.params`` plus the new BatchNorm statistics."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return state.replace(
    step=state.step + 1,
    params=optax.apply_updates(state.params, updates),
    batch_stats=batch_stats,
    opt_state=opt_state,
  )


def loss_metrics(loss: jax.Array, parts: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """``{'loss': total, 'loss_<part>': ...}`` for logging."""
  return {"loss": loss, **{f"loss_{k}": v for k, v in parts.items()}}


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
