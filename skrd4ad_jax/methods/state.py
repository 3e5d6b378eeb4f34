"""What a method trains and how: ``TrainState`` and the torch-exact Adam.

A ``TrainState`` holds only what is trained (bottleneck, decoder and whatever a
method adds); the frozen teacher's variables are a separate, shared argument:
never optimised, never checkpointed. Because the state is a plain pytree with no
Python-side state inside the step, states of several jobs stack on a leading
axis and one ``jax.vmap``-ed step advances them all (``training/parallel.py``).
"""

from __future__ import annotations

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
