"""Per-category orbax checkpoints: the trained state plus a JSON item.

Layout: ``<workdir>/<category>/checkpoints/<step>/{state,meta}``. ``state`` is the
category's own (unstacked) ``TrainState``; the frozen teacher is never saved.
``meta`` is JSON: config, method facts, schedule, thresholds and score
normalisation, so ``predict`` needs nothing else.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

# Periodic checkpoints kept per category (the final one is always the latest).
KEEP_LATEST = 2


def checkpoint_dir(workdir: str, category: str) -> str:
  return os.path.join(os.path.abspath(workdir), category, "checkpoints")


def make_manager(
  workdir: str, category: str, read_only: bool = False, owner: int = 0
) -> ocp.CheckpointManager:
  """The category's checkpoint manager.

  With several processes every process opens every category's manager and
  saves and restores collectively (orbax's multi-host protocol): the state is a
  global array that lives on the devices of the ``owner`` process, which writes
  it, and the owner is the primary host that writes the JSON item and the
  checkpoint's metadata (the other processes' JSON is ignored).
  """
  options = ocp.options.MultiprocessingOptions(
    primary_host=owner, barrier_sync_key_prefix=f"ckpt-{category}"
  )
  if jax.process_count() == 1:
    state_handler = ocp.handlers.StandardCheckpointHandler(multiprocessing_options=options)
  else:
    # Only the owner's replica holds the state (``parallel.slot_sharding``): no
    # replica-parallel writes, which would take slices from the other replicas.
    registry = ocp.type_handlers.create_type_handler_registry(
      (jax.Array, ocp.type_handlers.ArrayHandler(primary_host=owner, use_replica_parallel=False))
    )
    state_handler = ocp.handlers.PyTreeCheckpointHandler(
      multiprocessing_options=options, type_handler_registry=registry
    )
  handlers = {
    "state": state_handler,
    "meta": ocp.handlers.JsonCheckpointHandler(multiprocessing_options=options),
  }
  manager_options = ocp.CheckpointManagerOptions(
    create=not read_only,
    read_only=read_only,
    enable_async_checkpointing=False,
    preservation_policy=checkpoint_managers.LatestN(KEEP_LATEST),
    multiprocessing_options=options,
  )
  return ocp.CheckpointManager(
    checkpoint_dir(workdir, category), options=manager_options, item_handlers=handlers
  )


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  """Writes the state and its JSON item at ``step``.

  A finished run that is evaluated again rewrites its final step, so that the
  stored thresholds and metrics always match the latest evaluation settings.
  """
  if jax.process_count() == 1:
    state = jax.device_get(state)  # with several processes: a global array (see make_manager)
  if int(step) in manager.all_steps():
    manager.delete(int(step))
  state_args = (
    ocp.args.StandardSave(state) if jax.process_count() == 1 else ocp.args.PyTreeSave(state)
  )
  manager.save(
    int(step), args=ocp.args.Composite(state=state_args, meta=ocp.args.JsonSave(meta)), force=True
  )
  manager.wait_until_finished()


def restore(
  manager: ocp.CheckpointManager, abstract_state: Any, step: int | None = None
) -> tuple[Any, dict] | None:
  """(state, meta) of ``step`` (default: the latest), or None when there is none.

  Args:
    manager: the category's manager.
    abstract_state: ``jax.eval_shape`` of the method's init, the restore target.
    step: a specific step.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  # Targets without a sharding go to the first local device (a checkpoint written by
  # several processes records their devices, which orbax will not guess).
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract_state = jax.tree.map(
    lambda x: (
      x
      if getattr(x, "sharding", None) is not None
      else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=default)
    ),
    abstract_state,
  )
  state_args = (
    ocp.args.StandardRestore(abstract_state)
    if jax.process_count() == 1
    else ocp.args.PyTreeRestore(
      abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)
    )
  )
  restored = manager.restore(
    step, args=ocp.args.Composite(state=state_args, meta=ocp.args.JsonRestore())
  )
  return restored["state"], dict(restored["meta"])


def restore_meta(manager: ocp.CheckpointManager, step: int | None = None) -> dict | None:
  """Only the JSON item of ``step`` (default: the latest)."""
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
  return dict(restored["meta"])
