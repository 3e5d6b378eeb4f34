"""Exports a trained category for deployment (ONNX or TensorFlow SavedModel).

  python -m skrd4ad_jax.export --workdir=runs/demo --category=grass \
      --format=onnx --output=export/grass [--seed=0] [--with_postprocessing] \
      [--thresholds_as=inputs|constants] [--platforms=cpu,cuda] [--nocheck]

Writes the model (``model.onnx`` or ``saved_model/``) and
``skrd4ad_export.json`` (thresholds, score normalisation, image size, method,
teacher, project version, input/output names) into ``--output``, then runs the
written model on synthetic images against the checkpoint (``--nocheck`` skips
it). Run it with ``python -m skrd4ad_jax.export.run --model=DIR ...``; see
``exporter.py`` and ``run.py``.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from skrd4ad_jax.export import exporter
from skrd4ad_jax.export.spec import FORMATS, THRESHOLDS_AS, ExportError

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training run directory (the --workdir of main).")
flags.DEFINE_string("category", None, "Category to export; optional when the run has one.")
flags.DEFINE_integer("seed", 0, "Seed of a multi-seed run: k > 0 exports <category>/seed_<k>.")
flags.DEFINE_string("format", None, f"One of {', '.join(FORMATS)}.")
flags.DEFINE_string("output", None, "Directory to write the model and its JSON into.")
flags.DEFINE_bool(
  "with_postprocessing",
  False,
  "Also output anomaly_map_normalized, pred_score, pred_label and pred_mask.",
)
flags.DEFINE_string(
  "thresholds_as",
  "inputs",
  f"Post-processing thresholds: {' or '.join(THRESHOLDS_AS)} (graph inputs stay changeable).",
)
flags.DEFINE_list("platforms", list(exporter.DEFAULT_PLATFORMS), "SavedModel lowering platforms.")
flags.DEFINE_bool("check", True, "Run the written model against the checkpoint.")
flags.mark_flags_as_required(["workdir", "format", "output"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:  # Progress lines, not orbax's INFO log.
    logging.set_verbosity(logging.ERROR)
  try:
    exporter.export(
      FLAGS.workdir,
      FLAGS.category,
      FLAGS.format,
      FLAGS.output,
      seed=FLAGS.seed,
      with_postprocessing=FLAGS.with_postprocessing,
      thresholds_as=FLAGS.thresholds_as,
      platforms=FLAGS.platforms,
      check=FLAGS.check,
      log=lambda s: print(s, flush=True),
    )
  except (ExportError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
