"""Trains and evaluates every category of a dataset config (or only evaluates: --eval_only).

  python -m skrd4ad_jax.main --config=configs/demo.py
  python -m skrd4ad_jax.main --config=configs/mvtec.py:bottle,cable --workdir=runs/mvtec
  python -m skrd4ad_jax.main --config=configs/mvtec.py --config.model.name=rd4ad

The workdir (default ``runs/<config name>``) receives one TensorBoard run, orbax
checkpoints and heat-map pictures per category, and ``results.csv`` /
``results.md``. Re-running the same command resumes from the latest checkpoints.

Several processes (TPU pod, multi-node GPU) run the same command with
``--distributed`` (auto-detected cluster) or ``--coordinator_address=HOST:PORT
--num_processes=N --process_id=I``; see the README.

Mistakes the user can fix (an unknown ``--config.x`` key, a config value out
of range, bad data, a workdir in use, an unreadable checkpoint of another
model, some jobs stopped on a non-finite loss) end in one ``error: ...`` line
each and exit status 1; the config is checked before TensorFlow is imported, so
such a run stops within seconds. A device out of memory ends in one line naming
the setting and what to lower. Any other exception keeps its traceback: it is a
bug. Every error that is not the user's leaves its traceback in
``<workdir>/error.log`` (shown too with ``--verbosity=1``).
"""

from collections.abc import Sequence
import contextlib
import os
import re
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from skrd4ad_jax.config import validation

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "Output directory (default: runs/<config name>).")
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.DEFINE_bool(
  "distributed",
  False,
  "Run as one of several processes (jax.distributed.initialize). On TPU pods, "
  "SLURM and Open MPI everything is detected; elsewhere also pass the three "
  "flags below.",
)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (implies --distributed).")
flags.DEFINE_integer("num_processes", None, "Number of processes (implies --distributed).")
flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.")
flags.DEFINE_bool(
  "eval_only",
  False,
  "Evaluate what the workdir holds (trained, or imported with "
  "skrd4ad_jax.import_checkpoint) on the config's data without training: results, "
  "pictures, thresholds and TensorBoard scalars as at the end of a run.",
)
flags.mark_flags_as_required(["config"])

_CONFIG_FLAG = re.compile(r"^--?config(?:=(.*))?$")
_OVERRIDE_FLAG = re.compile(r"^--?(?:no)?config\.([^=]+)(?:=.*)?$")


def fail(problems: Sequence[str]) -> None:
  """One ``error:`` line per problem on stderr, then exit status 1."""
  for problem in problems:
    print(f"error: {problem}", file=sys.stderr)
  sys.exit(1)


def config_arguments(argv: Sequence[str]) -> tuple[str | None, list[str]]:
  """(the ``--config`` value, the dotted keys of the ``--config.x.y`` overrides)."""
  spec, overrides = None, []
  for i, arg in enumerate(argv[1:], start=1):
    if arg == "--":
      break
    m = _CONFIG_FLAG.match(arg)
    if m:
      spec = m.group(1) if m.group(1) is not None else (argv[i + 1] if i + 1 < len(argv) else None)
      continue
    m = _OVERRIDE_FLAG.match(arg)
    if m:
      overrides.append(m.group(1))
  return spec, overrides


def command_line_problems(argv: Sequence[str]) -> list[str]:
  """What in ``--config`` and ``--config.x.y=...`` cannot work, before absl parses them.

  ml_collections reports a missing config file only when the config is first
  read, and an unknown override key or a ``get_config`` argument error as a
  chain of tracebacks; these are checked here, with the config file itself.

  Raises:
    ConfigError: from the config file's ``get_config`` (e.g. an unknown category
      after the ``:``).
  """
  from skrd4ad_jax.config import load_config

  spec, overrides = config_arguments(argv)
  if not spec:
    return []  # absl says that --config is required.
  path = spec.partition(":")[0]
  if not os.path.isfile(path):
    here = os.path.join(os.path.dirname(path) or ".", "")
    choices = (
      sorted(f for f in os.listdir(here) if f.endswith(".py")) if os.path.isdir(here) else []
    )
    hint = f" Config files in {here}: {', '.join(choices)}." if choices else ""
    return [
      f"Config file not found: {path} (--config={spec}). Pass the path of a config "
      f"file, e.g. --config=configs/mvtec.py.{hint}"
    ]
  config = load_config(spec)
  known = list(validation.flat_keys(config))
  problems = []
  for key in overrides:
    node, parts = config, key.split(".")
    for depth, part in enumerate(parts):
      if not hasattr(node, "keys") or part not in node:
        siblings = list(node.keys()) if hasattr(node, "keys") else []
        unknown = ".".join(parts[: depth + 1])
        problems.append(validation.unknown_key_problem(unknown, known, siblings, "--config."))
        break
      node = node[part]
  return problems


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing, after the config file and override keys are checked."""
  try:
    problems = command_line_problems(argv)
  except validation.ConfigError as e:  # e.g. configs/mvtec.py:unknown_category
    problems = e.problems
  if problems:
    fail(problems)
  return app.parse_flags_with_usage(argv)


def initialize_distributed() -> None:
  """``jax.distributed.initialize`` when asked to; must run before JAX is used."""
  explicit = {
    "coordinator_address": FLAGS.coordinator_address,
    "num_processes": FLAGS.num_processes,
    "process_id": FLAGS.process_id,
  }
  if not FLAGS.distributed and all(v is None for v in explicit.values()):
    return
  import jax

  jax.distributed.initialize(**{k: v for k, v in explicit.items() if v is not None})


def distributed_requested() -> bool:
  return FLAGS.distributed or any(
    v is not None for v in (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  )


@contextlib.contextmanager
def workdir_held(workdir: str):
  """Process 0 holds the workdir; with several processes all of them stop if it cannot."""
  import jax

  from skrd4ad_jax.training import workdir_lock

  if jax.process_count() == 1:
    with workdir_lock.hold(workdir):
      yield
    return
  from jax.experimental import multihost_utils
  import numpy as np

  with contextlib.ExitStack() as stack:
    message = ""
    if jax.process_index() == 0:
      try:
        stack.enter_context(workdir_lock.hold(workdir))
      except (workdir_lock.WorkdirInUseError, OSError) as e:
        message = str(e)
    stopped = multihost_utils.broadcast_one_to_all(np.int32(bool(message)))
    if int(stopped):
      raise workdir_lock.WorkdirInUseError(
        message or f"Process 0 could not take the workdir {workdir}; see its error."
      )
    yield


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  from skrd4ad_jax import host_memory
  from skrd4ad_jax.data import source as source_lib
  from skrd4ad_jax.training import workdir_lock

  try:
    # Before JAX starts: a step's freed buffers stay in the process for the next one.
    host_memory.keep_freed_memory()
    source_lib.decoder_choice()  # checked now, used when the data are read
  except ValueError as e:  # a misspelt SKRD4AD_HOST_MALLOC or SKRD4AD_DECODER
    fail([str(e)])
  workdir = FLAGS.workdir or os.path.join("runs", FLAGS.config.name)
  with contextlib.ExitStack() as stack:
    try:
      from skrd4ad_jax.training import preflight

      # Validated and resolved once, in seconds, before TensorFlow and any data are read.
      config = preflight.prepare(FLAGS.config)
      if not distributed_requested():
        # One process: a second run on this workdir stops here, before any import.
        stack.enter_context(workdir_lock.hold(workdir))
    except (validation.ConfigError, workdir_lock.WorkdirInUseError, OSError) as e:
      fail(getattr(e, "problems", None) or [str(e)])
    train(config, workdir)


def train(config, workdir: str) -> None:
  """Trains under the workdir lock; a user's mistake ends in one line per problem.

  Args:
    config: the prepared config (``preflight.prepare``).
    workdir: the run's directory.
  """
  # TensorFlow (when installed) is only the input pipeline: select_source keeps it off the
  # accelerators JAX uses; without it the data are decoded with Pillow, to the same arrays.
  import data_pipelines

  try:
    source = data_pipelines.select_source(config.data)
  except ValueError as e:  # SKRD4AD_DECODER=tf.data without TensorFlow
    fail([str(e)])
  initialize_distributed()
  import jax

  from skrd4ad_jax import errors
  from skrd4ad_jax.data.folder import DatasetError
  from skrd4ad_jax.teachers.porting import WeightsError
  from skrd4ad_jax.training import checkpoints, host, memory, train, workdir_lock

  # The user's to fix: one line each. Anything else is a bug and keeps its traceback.
  user_errors = (
    validation.ConfigError,
    DatasetError,
    checkpoints.CheckpointError,
    WeightsError,  # a teacher weight file that is not what its suffix says
    workdir_lock.WorkdirInUseError,
    FloatingPointError,  # a NaN loss
    OSError,  # an unwritable workdir, a missing weights file, a full disk
    errors.UserError,  # "Training failed for <category>: ...", a failed download
  )
  if not FLAGS["verbosity"].present:
    # orbax logs every checkpoint step at INFO; keep the console for progress.
    logging.get_absl_handler().addFilter(lambda r: "orbax" not in r.pathname)
  logging.info(
    "JAX process %d/%d, devices: %s", jax.process_index(), jax.process_count(), jax.devices()
  )
  logging.info("workdir: %s", os.path.abspath(workdir))
  try:
    with workdir_held(workdir):  # (already held by the one process; a no-op then)
      train.train_and_evaluate(
        config, workdir, eval_only=FLAGS.eval_only, source=source, prepared=True
      )
  except host.StoppedAtOnce as e:
    # No clean-up on purpose (a background write still in flight is dropped, never
    # renamed into place): the newest complete checkpoint is what the rerun finds.
    print(str(e), file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(128 + e.signum)
  except host.Preempted as e:
    # Checkpoints are written; the exit status says which signal stopped the run.
    print(str(e), file=sys.stderr, flush=True)
    sys.exit(128 + e.signum)
  except user_errors as e:
    # A clear message instead of a traceback; whatever was written stays.
    fail(getattr(e, "problems", None) or [str(e)])
  except Exception as e:
    log_path = write_error_log(workdir, e, jax.process_index(), jax.process_count())
    # During the run the error names the slot plan; before it, no slots were chosen.
    planned = e if isinstance(e, memory.OutOfMemory) else None
    if planned is None and not memory.is_out_of_memory(e):
      raise  # a bug: absl prints the traceback
    if FLAGS.verbosity >= 1:
      traceback.print_exception(e)
    slots = planned.slots_per_device if planned else None
    fail([memory.out_of_memory_advice(planned.config if planned else config, slots, log_path)])


def write_error_log(workdir: str, error: BaseException, process: int, processes: int) -> str | None:
  """Writes ``error``'s traceback to ``<workdir>/error.log``; returns its path (None if it can't).

  With several processes each writes its own ``error.process<i>.log``.
  """
  name = "error.log" if processes == 1 else f"error.process{process}.log"
  path = os.path.join(os.path.abspath(workdir), name)
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      f.write("".join(traceback.format_exception(error)))
  except OSError:
    return None
  return path


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
