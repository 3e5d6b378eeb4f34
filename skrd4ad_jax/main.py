"""Trains and evaluates every category of a dataset config.

  python -m skrd4ad_jax.main --config=configs/demo.py
  python -m skrd4ad_jax.main --config=configs/mvtec.py:bottle,cable --workdir=runs/mvtec
  python -m skrd4ad_jax.main --config=configs/mvtec.py --config.model.name=rd4ad

The workdir (default ``runs/<config name>``) receives one TensorBoard run, orbax
checkpoints and heat-map pictures per category, and ``results.csv`` /
``results.md``. Re-running the same command resumes from the latest checkpoints.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "Output directory (default: runs/<config name>).")
config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                lock_config=True)
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  # TensorFlow is only the input pipeline: keep it off the accelerators JAX uses.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  import jax  # pylint: disable=g-import-not-at-top
  from skrd4ad_jax import trainer  # pylint: disable=g-import-not-at-top
  from data_pipelines.folder import DatasetError  # pylint: disable=g-import-not-at-top

  if not FLAGS["verbosity"].present:
    # orbax logs every checkpoint step at INFO; keep the console for progress.
    logging.get_absl_handler().addFilter(lambda r: "orbax" not in r.pathname)
  config = FLAGS.config
  workdir = FLAGS.workdir or os.path.join("runs", config.name)
  logging.info("JAX process %d/%d, devices: %s", jax.process_index(), jax.process_count(),
               jax.devices())
  logging.info("workdir: %s", os.path.abspath(workdir))
  try:
    trainer.train_and_evaluate(config, workdir)
  except (DatasetError, ValueError, OSError, FloatingPointError, RuntimeError) as e:
    # A clear message instead of a traceback; whatever was written stays.
    logging.error("%s: %s", type(e).__name__, e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
