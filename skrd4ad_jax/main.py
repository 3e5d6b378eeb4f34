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
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  # TensorFlow is only the input pipeline: keep it off the accelerators JAX uses.
  import tensorflow as tf

  tf.config.set_visible_devices([], "GPU")
  initialize_distributed()
  import jax

  from skrd4ad_jax.data.folder import DatasetError
  from skrd4ad_jax.training import trainer

  if not FLAGS["verbosity"].present:
    # orbax logs every checkpoint step at INFO; keep the console for progress.
    logging.get_absl_handler().addFilter(lambda r: "orbax" not in r.pathname)
  config = FLAGS.config
  workdir = FLAGS.workdir or os.path.join("runs", config.name)
  logging.info(
    "JAX process %d/%d, devices: %s", jax.process_index(), jax.process_count(), jax.devices()
  )
  logging.info("workdir: %s", os.path.abspath(workdir))
  try:
    trainer.train_and_evaluate(config, workdir, eval_only=FLAGS.eval_only)
  except trainer.Preempted as e:
    print(str(e), file=sys.stderr, flush=True)
    sys.exit(128 + e.signum)
  except (DatasetError, ValueError, OSError, FloatingPointError, RuntimeError) as e:
    # A clear message instead of a traceback; whatever was written stays.
    logging.error("%s: %s", type(e).__name__, e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
