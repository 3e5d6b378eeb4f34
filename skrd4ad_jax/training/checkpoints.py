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
- ``latest_usable`` (what a run plans from) reads the newest step in full; a
  step that cannot be read is renamed ``<step>.damaged`` (orbax never lists it
  again), reported in one line, and the next older step is tried. TensorStore's
  and asyncio's tracebacks of such a read go to ``checkpoint_errors.log`` next
  to ``checkpoints/``, never to the console.
- Disk errors while writing raise ``OSError`` naming the step folder; a step
  being rewritten gets its old copy back at once.
- A checkpoint of another model (the config changed the student's shape) raises
  ``CheckpointError`` naming the settings that differ from the stored config,
  instead of orbax's tree-structure dump.

Why one module of this size: the survival rules above hold only if every read
and write of a checkpoint (save, restore, the JSON item alone, the full read a
plan makes, the set-aside, the quiet logging around orbax) honours all of them;
split, each path would restate them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import contextlib
import errno
import gc
import itertools
import json
import logging as std_logging
import os
import re
import shutil
import sys
import threading
import time
import traceback
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from skrd4ad_jax import config as config_lib
from skrd4ad_jax import faults

# Periodic checkpoints kept per category (the final one is always the latest).
KEEP_LATEST = 2
# Where an existing step waits while it is being rewritten (see ``save``).
REPLACED_SUFFIX = ".replaced"
# A step that cannot be read is renamed so (orbax lists only digit names as steps).
DAMAGED_SUFFIX = ".damaged"
# Where the details of unreadable steps go (next to ``checkpoints/``).
DETAIL_LOG = "checkpoint_errors.log"
# Config fields that decide the shapes of the saved state (the student, the
# method's extra modules): named when a checkpoint holds another model.
MODEL_SHAPE_PREFIXES = ("model.", "mrkd.", "rd_expert.")
MODEL_SHAPE_IGNORED = ("model.teacher_weights", "model.dtype")
# Programming errors are never taken for a broken checkpoint.
_BUGS = (TypeError, AttributeError, NameError, AssertionError, NotImplementedError)
# Nor are orbax's complaints about how it was called (a ValueError, like a damaged file's).
_USAGE_ERRORS = ("registered handler", "Unsupported", "unexpected keyword")

_barriers = itertools.count()


class CheckpointError(ValueError):
  """A checkpoint that cannot be used as asked; the message names the step and the fix."""


def checkpoint_dir(workdir: str, category: str) -> str:
  return os.path.join(os.path.abspath(workdir), category, "checkpoints")


def _sync(name: str) -> None:
  """A barrier of every process (nothing with one process)."""
  if jax.process_count() > 1:
    ocp.multihost.sync_global_processes(f"skrd4ad-{name}-{next(_barriers)}")


# -- quiet reads -------------------------------------------------------------
#
# A read of a damaged step fails in one of orbax's concurrent TensorStore reads;
# the others are abandoned, and their coroutines, futures and TensorStore
# callbacks complain later (at garbage collection, from TensorStore's threads,
# at exit) through ``sys.unraisablehook`` and the ``asyncio`` logger. Once a
# read of a step has begun, those complaints go to the detail log for the rest
# of the process; everything else reaches the previous hooks as before.

_NOISE = ("orbax", "tensorstore", "TensorStore", "asyncio", "Event loop is closed")
_detail = {"path": None, "installed": False}
_detail_lock = threading.Lock()


def _write_detail(text: str) -> None:
  path = _detail["path"]
  if not path:
    return
  try:
    with _detail_lock, open(path, "a", encoding="utf-8") as f:
      f.write(text if text.endswith("\n") else text + "\n")
  except OSError:
    pass  # a read-only workdir: the details are lost, the one-line report is not


class _AsyncioNoise(std_logging.Filter):
  """Sends asyncio's "exception was never retrieved" records to the detail log."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    text = record.getMessage()
    if record.exc_info:
      text += "\n" + "".join(traceback.format_exception(*record.exc_info))
    if any(n in text for n in _NOISE):
      _write_detail(f"[asyncio] {text}")
      return False
    return True


def _install_noise_filters() -> None:
  if _detail["installed"]:
    return
  _detail["installed"] = True
  previous = sys.unraisablehook

  def hook(unraisable) -> None:
    text = "".join(
      traceback.format_exception(
        unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback
      )
    )
    head = f"{unraisable.err_msg or 'Exception ignored in'}: {unraisable.object!r}"
    if any(n in head or n in text for n in _NOISE):
      _write_detail(f"{head}\n{text}")
    else:
      previous(unraisable)

  sys.unraisablehook = hook
  previous_excepthook = sys.excepthook

  def excepthook(exc_type, exc_value, exc_traceback) -> None:
    # TensorStore's callbacks into a closed event loop print through here.
    if exc_type is RuntimeError and "Event loop is closed" in str(exc_value):
      _write_detail("".join(traceback.format_exception(exc_type, exc_value, exc_traceback)))
    else:
      previous_excepthook(exc_type, exc_value, exc_traceback)

  sys.excepthook = excepthook
  std_logging.getLogger("asyncio").addFilter(_AsyncioNoise())


@contextlib.contextmanager
def _quiet(detail_path: str | None) -> Iterator[None]:
  """Orbax's own logging muted while a possibly damaged step is read."""
  _detail["path"] = detail_path  # None: the details are dropped (a workdir only read)
  _install_noise_filters()
  orbax_logger = std_logging.getLogger("absl")
  noise = _AsyncioNoise()
  orbax_logger.addFilter(noise)
  try:
    yield
  finally:
    orbax_logger.removeFilter(noise)


def _after_failed_read() -> None:
  """Abandoned coroutines of a failed read complain now, into the detail log."""
  gc.collect()
  time.sleep(0.05)  # TensorStore's callbacks, from its own threads
  gc.collect()


def _detail_path(directory: str) -> str:
  return os.path.join(os.path.dirname(os.path.abspath(directory)), DETAIL_LOG)


def _json_handler(options: Any) -> ocp.handlers.JsonCheckpointHandler:
  """Orbax's JSON handler with a fault point inside the write (tests only).

  The instance's methods are wrapped, not subclassed: orbax finds a handler by
  its exact class.
  """
  handler = ocp.handlers.JsonCheckpointHandler(multiprocessing_options=options)
  save, async_save = handler.save, handler.async_save

  def save_with_point(directory, *args, **kwargs):
    faults.point("checkpoint_write", path=directory)
    return save(directory, *args, **kwargs)

  async def async_save_with_point(directory, *args, **kwargs):
    faults.point("checkpoint_write", path=directory)
    return await async_save(directory, *args, **kwargs)

  handler.save, handler.async_save = save_with_point, async_save_with_point
  return handler


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
    "meta": _json_handler(options),
  }
  if not read_only:
    _recover_interrupted_replace(checkpoint_dir(workdir, category))
  manager_options = ocp.CheckpointManagerOptions(
    create=not read_only,
    read_only=read_only,
    # A killed run's half-written ``<step>.orbax-checkpoint-tmp-*`` folders go.
    cleanup_tmp_directories=not read_only,
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
  the old step is kept aside until the new one is complete, and put back when
  the write fails.

  Raises:
    OSError: the write failed (a full or read-only disk); the message names the
      step folder and the error. Steps written before are untouched.
  """
  if jax.process_count() == 1:
    state = jax.device_get(state)  # with several processes: a global array (see make_manager)
  step = int(step)
  path = _step_dir(manager, step)
  faults.point("checkpoint_save", path=path)
  replaced = None
  try:
    if step in manager.all_steps():
      replaced = path + REPLACED_SUFFIX
      if jax.process_index() == 0:
        if os.path.isdir(replaced):
          shutil.rmtree(replaced)
        os.rename(path, replaced)
      _sync(f"replace-{step}")
      manager.reload()
      faults.point("checkpoint_replace", path=replaced)
    state_args = (
      ocp.args.StandardSave(state) if jax.process_count() == 1 else ocp.args.PyTreeSave(state)
    )
    manager.save(
      step, args=ocp.args.Composite(state=state_args, meta=ocp.args.JsonSave(meta)), force=True
    )
    manager.wait_until_finished()
  except _BUGS:
    raise
  except Exception as e:
    if replaced is not None and jax.process_index() == 0 and not os.path.isdir(path):
      with contextlib.suppress(OSError):
        os.rename(replaced, path)
    with contextlib.suppress(Exception):
      manager.reload()
    if isinstance(e, OSError) or _is_disk_error(e):
      code = getattr(e, "errno", None) or errno.EIO
      why = getattr(e, "strerror", None) or _first_line(e)
      raise OSError(code, f"Cannot write checkpoint step {step}: {why}", path) from None
    raise
  faults.point("checkpoint_saved", path=path)
  if replaced is not None:
    _sync(f"replaced-{step}")
    if jax.process_index() == 0:
      shutil.rmtree(replaced, ignore_errors=True)


def _is_disk_error(error: BaseException) -> bool:
  """TensorStore and orbax report a failing disk as ValueError / bare Exception."""
  while error is not None:
    if isinstance(error, OSError):
      return True
    text = str(error)
    if any(w in text for w in ("No space left", "Read-only file system", "Permission denied")):
      return True
    error = error.__cause__ or error.__context__
  return False


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


def _flat_config(config: Any) -> dict[str, Any]:
  """``config_lib.flatten`` with lists as tuples (JSON gives lists back)."""
  flat = config_lib.flatten(config or {})
  return {k: tuple(v) if isinstance(v, list) else v for k, v in flat.items()}


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


def _read_step(
  manager: ocp.CheckpointManager,
  step: int,
  abstract_state: Any,
  config: Any,
  detail_path: str | None = None,
) -> tuple[tuple[Any, dict] | None, str | None]:
  """((state, meta), None) of ``step``, or (None, why it cannot be read); quietly.

  ``abstract_state`` carries the restore shardings (see ``restore``); the
  tracebacks of a failed read go to ``detail_path`` (None: nowhere).

  Raises:
    CheckpointError: the step holds another model, or (several processes) its
      arrays cannot be read.
  """
  with _quiet(detail_path):
    # File and metadata checks read the same shared files on every process, so all
    # processes agree on them before the collective read.
    problem = (
      _meta_problem(manager, step)
      or _metadata_problem(manager, step)
      or _state_problem(manager, step, abstract_state, config)
    )
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
          step, args=ocp.args.Composite(state=state_args, meta=ocp.args.JsonRestore())
        )
      except _BUGS:
        raise
      except Exception as e:  # A damaged array file: TensorStore raises bare Exception.
        if any(w in str(e) for w in _USAGE_ERRORS):
          raise
        reason = _first_line(e)
        _write_detail(
          f"step {step} in {os.fspath(manager.directory)}:\n"
          + "".join(traceback.format_exception(type(e), e, e.__traceback__))
        )
        del e
        _after_failed_read()
        if jax.process_count() > 1:
          # The other processes wait in orbax's barrier: no agreement on a fallback.
          raise CheckpointError(
            f"Checkpoint step {step} in {os.fspath(manager.directory)} cannot be read "
            f"({reason}). Fix: move that step folder out of the way and rerun."
          ) from None
        return None, f"its arrays cannot be read ({reason})"
      meta = dict(restored["meta"])
      meta.setdefault("step", step)
      return (restored["state"], meta), None
  _after_failed_read()
  return None, problem


def _metadata_problem(manager: ocp.CheckpointManager, step: int) -> str | None:
  """Why the step's own ``_CHECKPOINT_METADATA`` cannot be read (a missing one is fine)."""
  path = os.path.join(_step_dir(manager, step), "_CHECKPOINT_METADATA")
  if not os.path.exists(path):
    return None
  content, problem = _read_json(path)
  if problem is None and not isinstance(content, dict):
    problem = "_CHECKPOINT_METADATA is not a JSON object"
  return problem


def _targets(abstract_state: Any) -> Any:
  """Targets without a sharding go to the first local device (a checkpoint written by
  several processes records their devices, which orbax will not guess)."""
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(
    lambda x: (
      x
      if getattr(x, "sharding", None) is not None
      else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=default)
    ),
    abstract_state,
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
  abstract_state = _targets(abstract_state)
  for i, s in enumerate(steps):
    restored, problem = _read_step(manager, s, abstract_state, config)
    if restored is not None:
      return restored
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


def _set_aside(directory: str, step: int) -> str:
  """Renames an unreadable step out of orbax's view; its new name, or why it stays."""
  path = os.path.join(directory, str(step))
  target = path + DAMAGED_SUFFIX
  n = 1
  while os.path.exists(target):
    n += 1
    target = f"{path}{DAMAGED_SUFFIX}-{n}"
  if jax.process_index() == 0:
    try:
      os.rename(path, target)
    except OSError as e:
      _sync(f"aside-{step}")
      return f"left in place (it cannot be renamed: {e.strerror})"
  _sync(f"aside-{step}")
  return f"renamed to {os.path.basename(target)}"


def latest_usable(
  workdir: str,
  job_name: str,
  abstract_state: Any,
  *,
  config: Any = None,
  report: Callable[[str], None] | None = None,
  set_aside: bool = True,
) -> tuple[int, dict] | None:
  """(step, meta) of the job's newest checkpoint that reads in full, or None.

  Every step from the newest down is read as a restore reads it (the JSON item,
  the checkpoint metadata, every array); the first that reads is the answer, so
  that a plan made from it is the step ``restore`` returns later. A step that
  does not read is renamed ``<step>.damaged`` (``set_aside``), which orbax
  never lists again, and reported in one line naming the step and the reason;
  the tracebacks behind it go to ``checkpoint_errors.log`` next to the
  ``checkpoints/`` folder.

  Args:
    workdir: the run's workdir.
    job_name: the job (``<category>`` or ``<category>/seed_<k>``).
    abstract_state: ``jax.eval_shape`` of the method's init.
    config: the current config (names the settings of another model).
    report: called with one line per unreadable step (default: a logged warning).
    set_aside: rename unreadable steps (False: only report them, e.g. for a
      workdir that is read, never written).

  Raises:
    CheckpointError: a readable checkpoint holds another model than ``config``.
  """
  report = report or _log_warning
  directory = checkpoint_dir(workdir, job_name)
  if not os.path.isdir(directory):
    return None
  manager = make_manager(workdir, job_name, read_only=True)
  steps = sorted(manager.all_steps(), reverse=True)
  abstract_state = _targets(abstract_state)
  for i, s in enumerate(steps):
    if config is not None:
      check_model(manager, s, config)
    detail = _detail_path(directory) if set_aside else None
    restored, problem = _read_step(manager, s, abstract_state, config, detail)
    if restored is not None:
      # Only its readability mattered: the loop restores it into its slot later.
      return s, restored[1]
    where = _set_aside(directory, s) if set_aside else "left in place"
    then = f"using step {steps[i + 1]}" if i + 1 < len(steps) else "no older step is left"
    report(
      f"[{job_name}] checkpoint step {s} cannot be read ({problem}): {where} in "
      f"{directory}; {then}."
    )
  return None
