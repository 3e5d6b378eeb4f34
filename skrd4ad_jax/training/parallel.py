"""Many jobs in one program: slots of stacked states, one step, a device mesh.

The training states of the jobs a run trains at once live stacked on a leading
*slot* axis, sharded over the mesh axis ``category``; one jitted step advances
every slot (``make_parallel_train_step``). An optional ``data`` axis splits each
slot's batch when there are more devices than slots (BatchNorm then sees the
global batch: XLA reduces across the ``data`` devices). A slot without a job at
some step is inactive: its state never changes and its outputs are never read.
Which job a slot holds changes over the run (``schedule.plan_slots``);
``set_local_slot`` puts a job's state into its slot without recompiling.

Several processes (``jax.distributed``: TPU pods, multi-node GPU) run the same
program on one global mesh. Each process owns the slots on its own devices
(``local_slots``) and assembles its part of every global array
(``global_stacked``, ``global_batch``); nothing crosses processes inside the
step, since jobs are independent and a ``data`` axis never spans processes.

Meshes use ``jax.sharding.Mesh`` (Auto axis types): with ``jax.make_mesh``'s
Explicit axes a vmapped convolution step raises ``ShardingTypeError``.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from skrd4ad_jax.config.validation import ConfigError
from skrd4ad_jax.training import steps

CATEGORY_AXIS = "category"
DATA_AXIS = "data"


def make_mesh(
  num_jobs: int, data_axis_size: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """A (category, data) mesh over ``devices`` (default: all, of every process).

  With one process the category axis gets ``min(num_jobs, devices // data)``
  devices so that no device idles when there are few jobs. With several
  processes it spans every device (every process must take part in the
  program) and each ``data`` row lies within one process.
  """
  devices = list(devices if devices is not None else jax.devices())
  data = max(1, int(data_axis_size))
  if len(devices) % data:
    raise ConfigError(
      [f"config.parallel.data_axis_size={data} does not divide the {len(devices)} devices."]
    )
  multi = len({d.process_index for d in devices}) > 1
  if multi:
    # Process-major order, so that a mesh row never straddles two processes.
    devices.sort(key=lambda d: (d.process_index, d.id))
    if jax.local_device_count() % data:
      raise ConfigError(
        [
          f"config.parallel.data_axis_size={data} must divide the "
          f"{jax.local_device_count()} devices of each process: a category's "
          "batch is never split across processes."
        ]
      )
  cat = len(devices) // data if multi else max(1, min(num_jobs, len(devices) // data))
  grid = np.asarray(devices[: cat * data], dtype=object).reshape(cat, data)
  return Mesh(grid, (CATEGORY_AXIS, DATA_AXIS))


def num_slots(mesh: Mesh, slots_per_device: int = 1) -> int:
  """Slots of a run: the category axis times the slots each of its devices holds."""
  return int(mesh.shape[CATEGORY_AXIS]) * max(1, int(slots_per_device))


def stack(trees: Sequence[Any]) -> Any:
  """[tree, tree, ...] -> one tree with a leading axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: Any, index: int) -> Any:
  """Slot ``index`` of a stacked tree (gathered to the host-default device)."""
  return jax.tree.map(lambda x: x[index], tree)


def shardings(mesh: Mesh) -> dict[str, NamedSharding]:
  return {
    "state": NamedSharding(mesh, P(CATEGORY_AXIS)),
    "batch": NamedSharding(mesh, P(CATEGORY_AXIS, DATA_AXIS)),
    "replicated": NamedSharding(mesh, P()),
  }


CATEGORY_LOOPS = ("auto", "vmap", "unroll")


def category_loop_problem(loop: str, data_axis_size: int) -> str | None:
  """Why ``category_loop`` cannot run with ``data_axis_size``, or None ('auto' is
  checked once the platform is known, by ``resolve_category_loop``)."""
  if loop == "unroll" and isinstance(data_axis_size, int) and data_axis_size > 1:
    return (
      f"config.parallel.category_loop='unroll' needs config.parallel.data_axis_size=1 "
      f"(got {data_axis_size}; on CPU 'auto' is 'unroll'): use "
      "--config.parallel.category_loop=vmap to split batches over devices."
    )
  return None


def resolve_category_loop(loop: str, mesh: Mesh) -> str:
  """'auto' -> 'unroll' on CPU (XLA:CPU runs vmapped, batched-weight convolutions
  as slow grouped convolutions), 'vmap' elsewhere."""
  if loop not in CATEGORY_LOOPS:
    raise ConfigError([f"config.parallel.category_loop={loop!r}; choose one of {CATEGORY_LOOPS}."])
  if loop == "auto":
    loop = "unroll" if mesh.devices.flat[0].platform == "cpu" else "vmap"
  problem = category_loop_problem(loop, mesh.shape[DATA_AXIS])
  if problem:
    raise ConfigError([problem])
  return loop


def _unrolled_step(method, states, teacher_vars, batch, rngs, active):
  """The per-device body of 'unroll': a Python loop over the device's slots.

  Each slot runs the ordinary single-job step, so its numbers are bit for bit
  the ones it gets alone (an inactive slot computes and keeps its old state,
  as the single step does: ``lax.cond`` would skip the work but compiles the
  step differently).
  """
  outs = [
    steps.train_step(
      method, unstack(states, i), teacher_vars, unstack(batch, i), rngs[i], active[i]
    )
    for i in range(active.shape[0])
  ]
  return stack([o[0] for o in outs]), stack([o[1] for o in outs])


def make_parallel_train_step(method, mesh: Mesh, category_loop: str = "auto"):
  """One jitted step over stacked states, sharded on ``mesh``.

  ``category_loop='vmap'``: ``jax.vmap`` over the slot axis (accelerators).
  ``'unroll'``: each device loops over its own slots inside the jitted program
  (``shard_map`` over the category axis), which XLA:CPU runs several times
  faster. Both give each job the results it gets alone.

  The returned function takes (stacked_state, teacher_vars, batch [K, B, ...],
  rngs [K, 2] (each slot's job key), active [K]) and returns (stacked_state,
  metrics [K]).
  """
  sh = shardings(mesh)
  if resolve_category_loop(category_loop, mesh) == "unroll":
    spec = P(CATEGORY_AXIS)
    step = jax.shard_map(
      functools.partial(_unrolled_step, method),
      mesh=mesh,
      in_specs=(spec, P(), spec, spec, spec),
      out_specs=(spec, spec),
      check_vma=False,
    )
  else:
    step = jax.vmap(functools.partial(steps.train_step, method), in_axes=(0, None, 0, 0, 0))
  return jax.jit(
    step,
    in_shardings=(sh["state"], sh["replicated"], sh["batch"], sh["state"], sh["state"]),
    out_shardings=(sh["state"], sh["state"]),
    donate_argnums=(0,),
  )


def local_slots(num_slots_: int, mesh: Mesh) -> list[int]:
  """The slots whose state lives on this process's devices (all of them with one process)."""
  index_map = shardings(mesh)["state"].addressable_devices_indices_map((num_slots_,))
  slots = set()
  for index in index_map.values():
    slots.update(range(*index[0].indices(num_slots_)))
  return sorted(slots)


def _from_slots(
  sharding: NamedSharding, num_slots_: int, per_slot: dict[int, Any], default: Any
) -> Any:
  """A global array (tree) with a leading slot axis, built from this process's slots.

  ``per_slot[slot]`` (or ``default`` when a local slot has no entry) is a tree of
  host or device arrays; only the slots of this process's devices are read.
  """
  leaves, treedef = jax.tree.flatten(default)
  slot_leaves = {k: treedef.flatten_up_to(v) for k, v in per_slot.items()}

  def build(i, leaf):
    shape = (num_slots_,) + tuple(np.shape(leaf))

    def callback(index):
      rows = range(*index[0].indices(num_slots_))
      # Cast to the default's dtype: every process must build the same global array.
      block = np.stack(
        [
          np.asarray(slot_leaves[r][i] if r in slot_leaves else leaf, dtype=np.asarray(leaf).dtype)
          for r in rows
        ]
      )
      return block[(slice(None),) + tuple(index[1:])]

    return jax.make_array_from_callback(shape, sharding, callback)

  return treedef.unflatten([build(i, leaf) for i, leaf in enumerate(leaves)])


def global_stacked(per_slot: dict[int, Any], default: Any, num_slots_: int, mesh: Mesh) -> Any:
  """Stacked states sharded over ``category``; slots without an entry get ``default``."""
  return _from_slots(shardings(mesh)["state"], num_slots_, per_slot, default)


def global_batch(per_slot: dict[int, Any], template: Any, num_slots_: int, mesh: Mesh) -> Any:
  """A [K, B, ...] batch sharded over (category, data); missing slots are zeros."""
  zeros = jax.tree.map(np.zeros_like, template)
  return _from_slots(shardings(mesh)["batch"], num_slots_, per_slot, zeros)


def slot_values(array: jax.Array) -> dict[int, np.ndarray]:
  """{slot: host value} of the slots of a [K, ...] array that this process holds."""
  out = {}
  k = array.shape[0]
  for shard in array.addressable_shards:
    rows = range(*shard.index[0].indices(k))
    data = np.asarray(shard.data)
    for j, r in enumerate(rows):
      out.setdefault(r, data[j])
  return out


def local_slot(tree: Any, slot: int) -> Any:
  """Slot ``slot`` of a stacked global tree, read from this process's shard holding it."""

  def take(x):
    for shard in x.addressable_shards:
      start, stop, _ = shard.index[0].indices(x.shape[0])
      if start <= slot < stop:
        return shard.data[slot - start]
    raise ValueError(f"Slot {slot} is not held by process {jax.process_index()}.")

  return jax.tree.map(take, tree)


def slot_sharding(num_slots_: int, mesh: Mesh, slot: int) -> NamedSharding:
  """The sharding of one category's state for a collective checkpoint.

  Its first device is the one holding ``slot`` in ``mesh``; with several
  processes one device of every other process follows, because orbax needs an
  addressable shard on every process. The array is nominally replicated: only
  the first device's copy (replica 0, the one orbax writes) holds the state, the
  other processes contribute zeros that are never written or read.
  """
  device = slot_device(mesh, num_slots_, slot)
  others = {}
  for d in mesh.devices.flat:
    if d.process_index != device.process_index:
      others.setdefault(d.process_index, d)
  devices = [device] + [others[p] for p in sorted(others)]
  return NamedSharding(Mesh(np.asarray(devices, dtype=object), ("replica",)), P())


def slot_owner(num_slots_: int, mesh: Mesh, slot: int) -> int:
  """The index of the process that holds ``slot``."""
  return slot_device(mesh, num_slots_, slot).process_index


def slot_state(tree: Any, slot: int, sharding: NamedSharding) -> Any:
  """Slot ``slot`` of a stacked global tree as a global array on ``sharding``.

  Every process calls it (a collective checkpoint): the holder of the slot
  passes its data, every other process zeros on its device (see
  ``slot_sharding``).
  """
  owner = sharding.mesh.devices.flat[0]
  local = [d for d in sharding.mesh.devices.flat if d.process_index == jax.process_index()]

  def take(x):
    if owner.process_index == jax.process_index():
      shard = next(s for s in x.addressable_shards if s.device == owner)
      start = shard.index[0].indices(x.shape[0])[0]
      arrays = [shard.data[slot - start]]
    else:
      arrays = [jax.device_put(jnp.zeros(x.shape[1:], x.dtype), local[0])]
    return jax.make_array_from_single_device_arrays(x.shape[1:], sharding, arrays)

  return jax.tree.map(take, tree)


def set_local_slot(tree: Any, slot: int, value: Any) -> Any:
  """``tree`` with slot ``slot`` replaced by ``value`` (a job's state entering its slot).

  Only this process's shards are touched (each device that holds the slot gets
  ``value``; every other shard is reused as is), so nothing is compiled for the
  whole mesh and no other process takes part. A no-op on processes that do not
  hold the slot.
  """

  def put(x, v):
    v = np.asarray(v, dtype=x.dtype)
    arrays = []
    for shard in x.addressable_shards:
      start, stop, _ = shard.index[0].indices(x.shape[0])
      data = shard.data
      if start <= slot < stop:
        data = data.at[slot - start].set(jax.device_put(v, shard.device))
      arrays.append(data)
    return jax.make_array_from_single_device_arrays(x.shape, x.sharding, arrays)

  return jax.tree.map(put, tree, value)


def device_copies(tree: Any) -> dict[jax.Device, Any]:
  """{device: this process's copy of a replicated tree on that device}."""
  leaves, treedef = jax.tree.flatten(tree)
  per_device: dict[jax.Device, list] = {}
  for leaf in leaves:
    for shard in leaf.addressable_shards:
      per_device.setdefault(shard.device, []).append(shard.data)
  return {d: treedef.unflatten(v) for d, v in per_device.items()}


def slot_device(mesh: Mesh, num_slots_: int, slot: int) -> jax.Device:
  """The (first) device that holds ``slot``."""
  rows = mesh.shape[CATEGORY_AXIS]
  return mesh.devices[slot // (num_slots_ // rows), 0]


def put_stacked(tree: Any, mesh: Mesh) -> Any:
  return jax.device_put(tree, shardings(mesh)["state"])


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  return jax.device_put(batch, shardings(mesh)["batch"])


def put_replicated(tree: Any, mesh: Mesh) -> Any:
  """``tree`` (the same on every process) replicated on every device of ``mesh``."""
  sharding = shardings(mesh)["replicated"]

  def put(x):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(put, tree)


def allgather_json(obj: Any) -> list[Any]:
  """Every process's JSON-serialisable ``obj``, in process order (a collective)."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils

  data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray(len(data), np.int64)))
  buffer = np.zeros(int(sizes.max()), np.uint8)
  buffer[: len(data)] = data
  gathered = np.asarray(multihost_utils.process_allgather(buffer))
  return [json.loads(bytes(gathered[i, : sizes[i]])) for i in range(len(sizes))]
