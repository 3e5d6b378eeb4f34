"""Per-category orbax checkpoints: the trained state plus a JSON item.

Layout: ``<workdir>/<category>/checkpoints/<step>/{state,meta}``. ``state`` is the
category's own (unstacked) ``TrainState``; the frozen teacher is never saved.
``meta`` is JSON: config, method facts, schedule, thresholds and score
normalisation, so ``predict`` needs nothing else.

Survival rules:

- Writes are atomic: orbax writes ``<step>.orbax-checkpoint-tmp-*`` and renames
  it when complete, and such a folder is never listed as a step. Rewriting an
  existing step (a finished run evaluated again) first moves the old one to
  ``<step>.replaced``, and only deletes it once the new one is complete; a run
  killed in between gets the old one back when the manager is next opened.
- A step that cannot be read (a truncated or missing file, a deleted ``state/``
  or ``manifest.ocdbt``, a missing item) is reported with the reason and left on
  disk, and ``restore`` / ``restore_meta`` fall back to the newest readable one.
- A checkpoint of another model (the config changed the student's shape) raises
  ``CheckpointError`` naming the settings that differ from the stored config,
  instead of orbax's tree-structure dump.
"""

from __future__ import annotations

from collections.abc import Callable
import itertools
import json
import os
import re
import shutil
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

# Periodic checkpoints kept per category (the final one is always the latest).
KEEP_LATEST = 2
# Where an existing step waits while it is being rewritten (see ``save``).
REPLACED_SUFFIX = ".replaced"
# Config fields that decide the shapes of the saved state (the student, the
# method's extra modules): named when a checkpoint holds another model.
MODEL_SHAPE_PREFIXES = ("model.", "mrkd.", "rd_expert.")
MODEL_SHAPE_IGNORED = ("model.teacher_weights", "model.dtype")
# Programming errors are never taken for a broken checkpoint.
_BUGS = (TypeError, AttributeError, NameError, AssertionError, NotImplementedError)

_barriers = itertools.count()


class CheckpointError(ValueError):
  """A checkpoint that cannot be used as asked; the message names the step and the fix."""


def checkpoint_dir(workdir: str, category: str) -> str:
  return os.path.join(os.path.abspath(workdir), category, "checkpoints")


def _sync(name: str) -> None:
  """A barrier of every process (nothing with one process)."""
  if jax.process_count() > 1:
    ocp.multihost.sync_global_processes(f"skrd4ad-{name}-{next(_barriers)}")


def _recover_interrupted_replace(directory: str) -> None:
  """Finishes or rolls back a rewrite of a step that a killed run left half done."""
  if jax.process_index() == 0 and os.path.isdir(directory):
    for name in sorted(os.listdir(directory)):
      if not name.endswith(REPLACED_SUFFIX):
        continue
      old = os.path.join(directory, name)
      new = os.path.join(directory, name[: -len(REPLACED_SUFFIX)])
      if os.path.isdir(new):
        shutil.rmtree(old)  # The rewrite completed; only the deletion was missed.
      else:
        os.rename(old, new)
        logging.warning("Restored checkpoint %s: its rewrite had been interrupted.", new)
  _sync("recover")


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
  if not read_only:
    _recover_interrupted_replace(checkpoint_dir(workdir, category))
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
  """Writes the state and its JSON item at ``step`` (atomically).

  A finished run that is evaluated again rewrites its final step, so that the
  stored thresholds and metrics always match the latest evaluation settings;
  the old step is kept aside until the new one is complete.
  """
  if jax.process_count() == 1:
    state = jax.device_get(state)  # with several processes: a global array (see make_manager)
  step = int(step)
  replaced = None
  if step in manager.all_steps():
    path = os.path.join(os.fspath(manager.directory), str(step))
    replaced = path + REPLACED_SUFFIX
    if jax.process_index() == 0:
      if os.path.isdir(replaced):
        shutil.rmtree(replaced)
      os.rename(path, replaced)
    _sync(f"replace-{step}")
    manager.reload()
  state_args = (
    ocp.args.StandardSave(state) if jax.process_count() == 1 else ocp.args.PyTreeSave(state)
  )
  manager.save(
    step, args=ocp.args.Composite(state=state_args, meta=ocp.args.JsonSave(meta)), force=True
  )
  manager.wait_until_finished()
  if replaced is not None:
    _sync(f"replaced-{step}")
    if jax.process_index() == 0:
      shutil.rmtree(replaced, ignore_errors=True)


def _step_dir(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(os.fspath(manager.directory), str(step))


def _first_line(error: BaseException, limit: int = 240) -> str:
  """A short reason: TensorStore's messages end in a spec several KB long."""
  while error.__cause__ is not None:  # orbax wraps TensorStore's own error
    error = error.__cause__
  text = (str(error).strip().splitlines() or [""])[0]
  for cut in (" [tensorstore_spec", " See full TensorStore details", "tensorstore_spec"):
    text = text.split(cut, 1)[0]
  # TensorStore nests its causes: the innermost file and reason are the news.
  inner = re.search(r'(Error \w+ local file "[^"]*": .*)$', text)
  text = inner.group(1) if inner else text
  text = re.sub(r'"[^"]*/checkpoints/\d+/', '"', text).strip(" '\"")
  if len(text) > limit:
    text = text[: limit - 3] + "..."
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _read_json(path: str) -> tuple[Any, str | None]:
  """(content, None), or (None, why it cannot be read)."""
  name = os.path.join(*path.split(os.sep)[-2:])
  if not os.path.isfile(path):
    return None, f"{name} is missing"
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f), None
  except (OSError, ValueError) as e:
    return None, f"{name} cannot be read ({_first_line(e)}); the file is truncated or damaged"


def _meta_problem(manager: ocp.CheckpointManager, step: int) -> str | None:
  """Why the JSON item of ``step`` cannot be read, or None."""
  meta, problem = _read_json(os.path.join(_step_dir(manager, step), "meta", "metadata"))
  if problem is None and not isinstance(meta, dict):
    problem = "meta/metadata is not a JSON object"
  return problem


def stored_meta(manager: ocp.CheckpointManager, step: int) -> dict | None:
  """The JSON item of ``step`` read straight from disk (no collective), or None."""
  meta, problem = _read_json(os.path.join(_step_dir(manager, step), "meta", "metadata"))
  return meta if problem is None and isinstance(meta, dict) else None


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'params.decoder.layer1...': shape} for a state, its abstract twin or orbax's metadata."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
    shape = getattr(leaf, "shape", None)
    out[name] = tuple(shape) if shape is not None else ()
  return out


def _flat_config(config: Any) -> dict[str, Any]:
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  out = {}

  def walk(node, prefix):
    for key, value in node.items():
      if isinstance(value, dict):
        walk(value, f"{prefix}{key}.")
      else:
        out[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value

  walk(config or {}, "")
  return out


def _override(key: str, value: Any) -> str:
  if isinstance(value, (tuple, list)):
    return f"--config.{key}='{tuple(value)!r}'"
  return f"--config.{key}={value}"


def model_differences(stored_config: Any, config: Any) -> list[tuple[str, Any, Any]]:
  """(key, stored value, current value) of the model-shaping settings that differ.

  Args:
    stored_config: the config in a checkpoint's JSON item.
    config: the current (resolved) config.
  """
  stored, current = _flat_config(stored_config), _flat_config(config)
  return [
    (key, stored.get(key), current.get(key))
    for key in sorted(set(stored) | set(current))
    if key.startswith(MODEL_SHAPE_PREFIXES)
    and key not in MODEL_SHAPE_IGNORED
    and key in stored
    and key in current
    and stored[key] != current[key]
  ]


def _mismatch_error(
  manager: ocp.CheckpointManager,
  step: int,
  stored_shapes: dict[str, tuple[int, ...]],
  shapes: dict[str, tuple[int, ...]],
  config: Any,
) -> CheckpointError:
  directory = os.fspath(manager.directory)
  meta = stored_meta(manager, step) or {}
  differ = model_differences(meta.get("config"), config) if config is not None else []
  where = f"The checkpoint at step {step} in {directory} holds another model than this config"
  if differ:
    settings = "; ".join(f"config.{k} is {a!r} there, {b!r} now" for k, a, b in differ)
    return CheckpointError(
      f"{where}: {settings}. Fix: rerun with the stored settings "
      f"({' '.join(_override(k, a) for k, a, _ in differ)}), or train this config in "
      "another --workdir."
    )
  missing = sorted(set(shapes) - set(stored_shapes))
  extra = sorted(set(stored_shapes) - set(shapes))
  other = sorted(k for k in set(shapes) & set(stored_shapes) if shapes[k] != stored_shapes[k])
  if other:
    detail = f"{other[0]} is {stored_shapes[other[0]]} there, {shapes[other[0]]} now"
  elif missing:
    detail = f"it lacks {missing[0]}"
  else:
    detail = f"it has {extra[0]}, which this model does not"
  count = len(missing) + len(extra) + len(other)
  return CheckpointError(
    f"{where} ({detail}; {count} array(s) differ). Fix: rerun with the config stored "
    f"in {os.path.join(directory, str(step), 'meta', 'metadata')}, or train this "
    "config in another --workdir."
  )


def check_model(manager: ocp.CheckpointManager, step: int, config: Any) -> None:
  """Raises ``CheckpointError`` when the checkpoint at ``step`` was written for another model.

  Compares the stored config's model-shaping settings with ``config`` (cheap:
  the JSON item only), so a run stops before training, not when it reaches
  the job.
  """
  meta = stored_meta(manager, step) or {}
  if meta.get("config") is not None and model_differences(meta["config"], config):
    raise _mismatch_error(manager, step, {}, {}, config)


def _state_problem(
  manager: ocp.CheckpointManager, step: int, abstract_state: Any, config: Any
) -> str | None:
  """Why ``step``'s state cannot be read, from its files and metadata alone, or None.

  Raises:
    CheckpointError: the state is readable but belongs to another model.
  """
  state_dir = os.path.join(_step_dir(manager, step), "state")
  if not os.path.isdir(state_dir):
    return "its state/ folder is missing"
  tree_metadata, problem = _read_json(os.path.join(state_dir, "_METADATA"))
  if problem:
    return problem
  ocdbt = isinstance(tree_metadata, dict) and tree_metadata.get("use_ocdbt", False)
  if ocdbt and not os.path.isfile(os.path.join(state_dir, "manifest.ocdbt")):
    return "state/manifest.ocdbt is missing"
  try:
    stored_shapes = _leaf_shapes(manager.item_metadata(step)["state"])
  except _BUGS:
    raise
  except Exception as e:  # TensorStore raises bare Exception / ValueError on damaged files.
    return f"its array metadata cannot be read ({_first_line(e)})"
  shapes = _leaf_shapes(abstract_state)
  if stored_shapes != shapes:
    raise _mismatch_error(manager, step, stored_shapes, shapes, config)
  return None


def _log_warning(message: str) -> None:
  logging.warning("%s", message)


def _broken_message(manager: ocp.CheckpointManager, step: int, problem: str, rest: list) -> str:
  directory = os.fspath(manager.directory)
  then = f"trying step {rest[0]}" if rest else "no older checkpoint is left"
  return (
    f"Checkpoint step {step} in {directory} cannot be read: {problem}. It is left "
    f"on disk as it is; {then}."
  )


def restore(
  manager: ocp.CheckpointManager,
  abstract_state: Any,
  step: int | None = None,
  *,
  config: Any = None,
  report: Callable[[str], None] | None = None,
) -> tuple[Any, dict] | None:
  """(state, meta) of ``step`` (default: the newest readable), or None when there is none.

  A step that cannot be read is reported and left on disk, and the next older
  one is tried; None (start fresh) when no step is readable.

  Args:
    manager: the category's manager.
    abstract_state: ``jax.eval_shape`` of the method's init, the restore target.
    step: a specific step (no fallback: a broken one raises ``CheckpointError``).
    config: the current config; when the checkpoint holds another model, the
      error names the settings that differ from the stored config.
    report: called with one line per broken step (default: a logged warning).

  Raises:
    CheckpointError: the checkpoint holds another model (its shapes differ from
      ``abstract_state``), or the requested ``step`` cannot be read.
  """
  report = report or _log_warning
  steps = [int(step)] if step is not None else sorted(manager.all_steps(), reverse=True)
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
  for i, s in enumerate(steps):
    # File and metadata checks read the same shared files on every process, so all
    # processes agree on them before the collective read.
    problem = _meta_problem(manager, s) or _state_problem(manager, s, abstract_state, config)
    if problem is None:
      state_args = (
        ocp.args.StandardRestore(abstract_state)
        if jax.process_count() == 1
        else ocp.args.PyTreeRestore(
          abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)
        )
      )
      try:
        restored = manager.restore(
          s, args=ocp.args.Composite(state=state_args, meta=ocp.args.JsonRestore())
        )
      except _BUGS:
        raise
      except Exception as e:  # A damaged array file: TensorStore raises bare Exception.
        if jax.process_count() > 1:
          # The other processes wait in orbax's barrier: no agreement on a fallback.
          raise CheckpointError(
            f"Checkpoint step {s} in {os.fspath(manager.directory)} cannot be read "
            f"({_first_line(e)}). Fix: move that step folder out of the way and rerun."
          ) from e
        problem = f"its arrays cannot be read ({_first_line(e)})"
      else:
        meta = dict(restored["meta"])
        meta.setdefault("step", s)
        return restored["state"], meta
    if step is not None:
      raise CheckpointError(
        f"Checkpoint step {s} in {os.fspath(manager.directory)} cannot be read: {problem}."
      )
    report(_broken_message(manager, s, problem, steps[i + 1 :]))
  if steps:
    report(
      f"No checkpoint in {os.fspath(manager.directory)} can be read; the unreadable "
      "steps stay on disk until a run writes the same steps again."
    )
  return None


def restore_meta(
  manager: ocp.CheckpointManager,
  step: int | None = None,
  report: Callable[[str], None] | None = None,
) -> dict | None:
  """Only the JSON item of ``step`` (default: the newest readable one), or None.

  Args:
    manager: the category's manager.
    step: a specific step (no fallback: a broken one raises ``CheckpointError``).
    report: called with one line per unreadable step (default: a logged warning).
  """
  report = report or _log_warning
  steps = [int(step)] if step is not None else sorted(manager.all_steps(), reverse=True)
  for i, s in enumerate(steps):
    problem = _meta_problem(manager, s)
    if problem is None:
      try:
        restored = manager.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      except _BUGS:
        raise
      except Exception as e:
        problem = f"its JSON item cannot be read ({_first_line(e)})"
      else:
        meta = dict(restored["meta"])
        meta.setdefault("step", s)
        return meta
    if step is not None:
      raise CheckpointError(
        f"Checkpoint step {s} in {os.fspath(manager.directory)} cannot be read: {problem}."
      )
    report(_broken_message(manager, s, problem, steps[i + 1 :]))
  return None
