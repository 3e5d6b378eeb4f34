"""Many categories in one program: stacked states, a vmapped step, a device mesh.

Per-category training states are stacked on a leading "category" axis and one
jitted, ``jax.vmap``-ed step advances them all. The category axis is sharded over
the mesh axis ``category``; an optional ``data`` axis splits each category's
batch when there are more devices than categories (BatchNorm then sees the global
batch: XLA reduces across the ``data`` devices). When categories do not divide
the ``category`` axis, padded slots are added and kept inactive: their state
never changes and their outputs are never read.

Meshes use ``jax.sharding.Mesh`` (Auto axis types): with ``jax.make_mesh``'s
Explicit axes a vmapped convolution step raises ``ShardingTypeError``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from skrd4ad_jax import train

CATEGORY_AXIS = "category"
DATA_AXIS = "data"


def make_mesh(num_categories: int, data_axis_size: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (category, data) mesh over ``devices`` (default: all).

  The category axis gets ``min(num_categories, devices // data)`` devices so
  that no device idles on padding alone when there are few categories.
  """
  devices = list(devices if devices is not None else jax.devices())
  data = max(1, int(data_axis_size))
  if len(devices) % data:
    raise ValueError(f"config.parallel.data_axis_size={data} does not divide the "
                     f"{len(devices)} devices.")
  cat = max(1, min(num_categories, len(devices) // data))
  grid = np.asarray(devices[: cat * data], dtype=object).reshape(cat, data)
  return Mesh(grid, (CATEGORY_AXIS, DATA_AXIS))


def num_slots(num_categories: int, mesh: Mesh) -> int:
  """Categories padded up to a multiple of the category axis."""
  n = mesh.shape[CATEGORY_AXIS]
  return int(math.ceil(num_categories / n) * n)


def stack(trees: Sequence[Any]) -> Any:
  """[tree, tree, ...] -> one tree with a leading axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: Any, index: int) -> Any:
  """Slot ``index`` of a stacked tree (gathered to the host-default device)."""
  return jax.tree.map(lambda x: x[index], tree)


def replace_slot(tree: Any, index: int, value: Any) -> Any:
  return jax.tree.map(lambda x, v: x.at[index].set(v), tree, value)


def shardings(mesh: Mesh) -> dict[str, NamedSharding]:
  return {
      "state": NamedSharding(mesh, P(CATEGORY_AXIS)),
      "batch": NamedSharding(mesh, P(CATEGORY_AXIS, DATA_AXIS)),
      "replicated": NamedSharding(mesh, P()),
  }


CATEGORY_LOOPS = ("auto", "vmap", "unroll")


def resolve_category_loop(loop: str, mesh: Mesh) -> str:
  """'auto' -> 'unroll' on CPU (XLA:CPU runs vmapped, batched-weight convolutions
  as slow grouped convolutions), 'vmap' elsewhere."""
  if loop not in CATEGORY_LOOPS:
    raise ValueError(f"config.parallel.category_loop={loop!r}; choose one of {CATEGORY_LOOPS}.")
  if loop == "auto":
    loop = "unroll" if mesh.devices.flat[0].platform == "cpu" else "vmap"
  if loop == "unroll" and mesh.shape[DATA_AXIS] > 1:
    raise ValueError("config.parallel.category_loop='unroll' needs "
                     "config.parallel.data_axis_size=1; use 'vmap' to split batches.")
  return loop


def _unrolled_step(method, states, teacher_vars, batch, base_rng, active):
  """The per-device body of 'unroll': a Python loop over the local categories.

  Each category runs the ordinary single-category step, so its numbers are the
  ones it would get alone; the loop is unrolled into one XLA program.
  """
  outs = [train.train_step(method, unstack(states, i), teacher_vars, unstack(batch, i),
                           base_rng, active[i])
          for i in range(active.shape[0])]
  return stack([o[0] for o in outs]), stack([o[1] for o in outs])


def make_parallel_train_step(method, mesh: Mesh, category_loop: str = "auto"):
  """One jitted step over stacked states, sharded on ``mesh``.

  ``category_loop='vmap'``: ``jax.vmap`` over the category axis (accelerators).
  ``'unroll'``: each device loops over its own categories inside the jitted
  program (``shard_map`` over the category axis), which XLA:CPU runs several
  times faster. Both give each category the results it gets alone.

  The returned function takes (stacked_state, teacher_vars, batch [K, B, ...],
  base_rng, active [K]) and returns (stacked_state, metrics [K]).
  """
  sh = shardings(mesh)
  if resolve_category_loop(category_loop, mesh) == "unroll":
    spec = P(CATEGORY_AXIS)
    step = jax.shard_map(functools.partial(_unrolled_step, method), mesh=mesh,
                         in_specs=(spec, P(), spec, P(), spec), out_specs=(spec, spec),
                         check_vma=False)
  else:
    step = jax.vmap(functools.partial(train.train_step, method), in_axes=(0, None, 0, None, 0))
  return jax.jit(step,
                 in_shardings=(sh["state"], sh["replicated"], sh["batch"], sh["replicated"],
                               sh["state"]),
                 out_shardings=(sh["state"], sh["state"]),
                 donate_argnums=(0,))


def put_stacked(tree: Any, mesh: Mesh) -> Any:
  return jax.device_put(tree, shardings(mesh)["state"])


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  return jax.device_put(batch, shardings(mesh)["batch"])


def put_replicated(tree: Any, mesh: Mesh) -> Any:
  return jax.device_put(tree, shardings(mesh)["replicated"])
