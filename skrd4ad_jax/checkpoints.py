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


def make_manager(workdir: str, category: str, read_only: bool = False
                 ) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      create=not read_only, read_only=read_only, enable_async_checkpointing=False,
      preservation_policy=checkpoint_managers.LatestN(KEEP_LATEST))
  return ocp.CheckpointManager(checkpoint_dir(workdir, category), options=options,
                               item_names=("state", "meta"))


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  """Writes the state and its JSON item at ``step``.

  A finished run that is evaluated again rewrites its final step, so that the
  stored thresholds and metrics always match the latest evaluation settings.
  """
  state = jax.device_get(state)
  if int(step) in manager.all_steps():
    manager.delete(int(step))
  manager.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                  meta=ocp.args.JsonSave(meta)), force=True)
  manager.wait_until_finished()


def restore(manager: ocp.CheckpointManager, abstract_state: Any, step: int | None = None
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
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
  return restored["state"], dict(restored["meta"])


def restore_meta(manager: ocp.CheckpointManager, step: int | None = None) -> dict | None:
  """Only the JSON item of ``step`` (default: the latest)."""
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
  return dict(restored["meta"])
