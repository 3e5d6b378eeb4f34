"""OK/NG, heat maps and defect masks for new images, from a trained run.

  python -m skrd4ad_jax.predict --workdir=runs/tiny --category=brick \
      --input=new_images/ --output=predictions/ [--save_masks] [--batch_size=8]

``--input`` is an image file, a folder (searched recursively: a ``test/`` folder
with one sub-folder per defect works; ``--output`` is skipped if it lies inside)
or a glob (``'lot_42/*.png'``, ``'lot_42/**/*.png'``, quoted). ``--category`` may
be left out when the run trained a single category.

The latest checkpoint of the category carries everything needed: the config
(the method is rebuilt from it), the thresholds and the score normalisation
(its JSON item, written by the training loop: ``training/slot_states.py``).
Images are decoded exactly as the evaluation decodes them, by the data source the command line picks
(``data_pipelines.select_source``: tf.data, or Pillow without TensorFlow; the
same arrays either way), streamed in batches of ``--batch_size`` (default: the
run's ``config.eval.batch_size``, which also reproduces the evaluation's raw
scores bit for bit), so memory does not grow with the size of the folder.

Outputs in ``--output``:

* ``<stem>.png``: image with the predicted defect contour, heat-map overlay and
  heat map, with the normalised score and the OK/NG label. Two inputs with the
  same stem (``good/000.png``, ``crack/000.png``) get the folder in the name
  (``good_000.png``).
* ``predictions.csv``: ``image_path, pred_score, pred_score_raw, pred_label``.
  ``pred_score`` is normalised so that the image threshold is 0.5 (clipped to
  [0, 1]); ``pred_label`` is ``NG`` when ``pred_score >= 0.5``, else ``OK``;
  both are empty when the checkpoint holds no image threshold.
* with ``--save_masks``: ``masks/<stem>.png``, 255 where the anomaly map,
  resized (bilinear) to the original image size, is >= the pixel threshold.

An unreadable image is reported and skipped; the others are predicted.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
import os
import sys
from typing import Any
import warnings

from absl import app, flags, logging
import jax
import ml_collections
import numpy as np

from skrd4ad_jax import host_memory, methods, teachers
from skrd4ad_jax.data import folder
from skrd4ad_jax.data import source as source_lib
from skrd4ad_jax.evaluation.prediction_output import (  # noqa: F401 (the module's API)
  CSV_COLUMNS,
  MASK_DIR,
  ImageResult,
  PredictError,
  ThresholdedPredictor,
  output_names,
  stored_thresholds,
  write_predictions,
)
from skrd4ad_jax.training import checkpoints, schedule, steps

FLAGS = flags.FLAGS


# ---------------------------------------------------------------------------
# Runs and categories.


def trained_categories(workdir: str) -> list[str]:
  """Categories of ``workdir`` that have at least one complete checkpoint."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if not os.path.isdir(workdir):
    return []
  found = []
  for name in sorted(os.listdir(workdir)):
    if not os.path.isdir(checkpoints.checkpoint_dir(workdir, name)):
      continue
    if checkpoints.make_manager(workdir, name, read_only=True).latest_step() is not None:
      found.append(name)
  return found


def resolve_category(workdir: str, category: str | None) -> str:
  """``category``, checked against the run, or the run's only category.

  Raises:
    PredictError: no run or no checkpoint at ``workdir``, an untrained
      ``category``, or several categories and none chosen.
  """
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if not os.path.isdir(workdir):
    raise PredictError(
      f"Run directory not found: {workdir}. Pass the --workdir of a "
      "training run (python -m skrd4ad_jax.main --workdir=...)."
    )
  found = trained_categories(workdir)
  if not found:
    hint = ""
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
      hint = (
        f" It looks like a category folder: use --workdir={os.path.dirname(workdir)} "
        f"--category={os.path.basename(workdir)}."
      )
    raise PredictError(
      f"No checkpoint found in the run directory {workdir} (expected "
      f"<workdir>/<category>/checkpoints/<step>/). Has training finished "
      f"a checkpoint there?{hint}"
    )
  if category:
    if category not in found:
      raise PredictError(
        f"Category {category!r} was not trained in {workdir}; trained "
        f"categories: {', '.join(found)}."
      )
    return category
  if len(found) > 1:
    raise PredictError(
      f"The run {workdir} holds several categories ({', '.join(found)}); "
      "choose one with --category=NAME."
    )
  return found[0]


def resolve_job(workdir: str, category: str | None, seed: int = 0) -> str:
  """The job (folder) of ``category``'s seed ``seed``: the category, or ``<category>/seed_<k>``.

  Raises:
    PredictError: as ``resolve_category``, or a seed that was not trained.
  """
  category = resolve_category(workdir, category)
  if not seed:
    return category
  job = schedule.job_name(category, int(seed))
  workdir = os.path.abspath(os.path.expanduser(workdir))
  manager = checkpoints.make_manager(workdir, job, read_only=True)
  if not os.path.isdir(checkpoints.checkpoint_dir(workdir, job)) or manager.latest_step() is None:
    trained = sorted(
      int(d[len("seed_") :])
      for d in os.listdir(os.path.join(workdir, category))
      if d.startswith("seed_") and d[len("seed_") :].isdigit()
    )
    raise PredictError(
      f"Seed {seed} of {category!r} was not trained in {workdir}; seeds there: "
      f"{', '.join(map(str, [0] + trained))} (config.train.seeds of the run)."
    )
  return job


# ---------------------------------------------------------------------------
# The predictor.


class Predictor(ThresholdedPredictor):
  """A trained category restored from its latest checkpoint, ready to predict.

  Attributes:
    workdir: the run directory.
    category: the category.
    step: training step of the restored checkpoint.
    meta: the checkpoint's JSON item.
    config: the training config (``ml_collections.ConfigDict``).
    thresholds: image/pixel thresholds and normalisation (floats, NaN when
      not chosen) with ``rule`` and ``source``.
    image_size: side of the network input.
    source: the ``DataSource`` that decodes the images.
  """

  def __init__(
    self,
    workdir: str,
    category: str | None = None,
    seed: int = 0,
    source: source_lib.DataSource | None = None,
  ):
    """Restores the latest checkpoint of ``category``'s seed ``seed`` (``resolve_job``).

    ``self.category`` is then the job's name: the category for seed 0,
    ``<category>/seed_<k>`` otherwise. ``source`` decodes the images (None =
    ``PillowSource()``; the command line passes ``data_pipelines.select_source()``).
    """
    self.source = source or source_lib.PillowSource()
    self.workdir = os.path.abspath(os.path.expanduser(workdir))
    self.category = resolve_job(self.workdir, category, seed)
    manager = checkpoints.make_manager(self.workdir, self.category, read_only=True)
    # An unreadable latest checkpoint is reported (once) and the newest readable one used.
    reported = set()

    def report(message: str) -> None:
      if message not in reported:
        reported.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)

    none_readable = PredictError(
      f"No readable checkpoint of {self.category!r} in {self.workdir} (see the warnings "
      "above). Train it again with python -m skrd4ad_jax.main."
    )
    meta = checkpoints.restore_meta(manager, report=report)
    if meta is None:
      raise none_readable
    self._build(meta)
    abstract = jax.eval_shape(self.method.init, self.rng, self.teacher_vars)
    restored = checkpoints.restore(manager, abstract, report=report)
    if restored is None:
      raise none_readable
    if restored[1].get("config") != meta.get("config"):
      # The state comes from an older step than the JSON item read first (the newer
      # one's arrays are damaged): that step's own config builds the method.
      self._build(restored[1])
      abstract = jax.eval_shape(self.method.init, self.rng, self.teacher_vars)
      restored = checkpoints.restore(manager, abstract, step=restored[1]["step"], report=report)
    self.state, self.meta = restored
    self.step = int(self.meta["step"])
    self._eval_step = steps.jitted_eval_step(self.method)
    self._set_thresholds(
      self.meta.get("thresholds"), f"checkpoint of {self.category!r} at step {self.step}"
    )

  def _build(self, meta: dict[str, Any]) -> None:
    """The method, teacher and key of the config stored in a checkpoint's JSON item."""
    if "config" not in meta:
      raise PredictError(
        f"The checkpoint of {self.category!r} at step {meta.get('step')} in "
        f"{self.workdir} has no config in its JSON item."
      )
    self.config = ml_collections.ConfigDict(meta["config"])
    self.image_size = int(meta.get("image_size", self.config.data.image_size))
    self.method = methods.build_method(self.config)
    self.teacher_vars = teachers.load_teacher_variables(
      self.config.model.teacher,
      self.config.model.teacher_weights,
      image_size=int(self.config.data.image_size),
    )
    # The trainer evaluates a job with its own seed's key; the same key gives the
    # same scores (MRKD's test-time masks draw from it).
    self.rng = jax.random.PRNGKey(int(meta.get("seed", self.config.seed)))

  def predict(self, paths: Sequence[str], batch_size: int | None = None) -> Iterator[ImageResult]:
    """Predicts ``paths`` in order, streamed in batches.

    Args:
      paths: image files (e.g. from ``skrd4ad_jax.data.folder.list_images``).
      batch_size: images per inference batch; None = the run's
        ``config.eval.batch_size`` (what reproduces the evaluation's scores).

    Yields:
      One ``ImageResult`` per path, in order; unreadable files have ``error``.
    """
    batch_size = int(batch_size or self.config.eval.batch_size)
    if batch_size < 1:
      raise PredictError(f"batch_size must be >= 1, got {batch_size}.")
    paths = [os.fspath(p) for p in paths]
    if not paths:
      return
    for batch in self.source.image_batches(paths, self.image_size, batch_size):
      ordered = [(i, ImageResult(image_path=paths[i], error=m)) for i, m in batch["failures"]]
      if "valid" in batch:
        maps, scores = self._eval_step(self.state, self.teacher_vars, batch["image"], self.rng)
        maps = np.asarray(maps, np.float32)  # [B, S, S]
        scores = np.asarray(scores, np.float32)  # [B]
        for j in np.flatnonzero(batch["valid"]):
          i = int(batch["index"][j])
          ordered.append((i, self._result(paths[i], batch["image_8bit"][j], maps[j], scores[j])))
      ordered.sort(key=lambda item: item[0])
      for _, result in ordered:
        yield result


def predict_images(
  workdir: str,
  category: str | None,
  paths: Sequence[str],
  batch_size: int | None = None,
  source: source_lib.DataSource | None = None,
) -> Iterator[ImageResult]:
  """Predicts images with the latest checkpoint of a category of a run.

  Args:
    workdir: the training run directory.
    category: the category; None when the run trained exactly one.
    paths: image files, e.g. ``skrd4ad_jax.data.folder.list_images('dir/')``.
    batch_size: images per batch; None = the run's ``config.eval.batch_size``.
    source: the ``DataSource`` that decodes the images (None = Pillow).

  Yields:
    One ``ImageResult`` per path, in order (unreadable files carry ``error``
    and no score).

  Raises:
    PredictError: no run / checkpoint, or a category that was not trained.
  """
  yield from Predictor(workdir, category, source=source).predict(paths, batch_size)


# ---------------------------------------------------------------------------
# Command line.


def define_flags() -> None:
  """The command-line flags (defined on demand: ``main.py`` also has --workdir)."""
  flags.DEFINE_string("workdir", None, "Training run directory (the --workdir of main).")
  flags.DEFINE_string("category", None, "Category to use; optional when the run has one.")
  flags.DEFINE_integer(
    "seed", 0, "Which seed's model (and stored thresholds) of a multi-seed run (0 = the first)."
  )
  flags.DEFINE_string(
    "input",
    None,
    "An image file, a folder (searched recursively, sub-folders included), or a glob "
    "pattern in quotes ('lot/*.png', 'lot/**/*.png').",
  )
  flags.DEFINE_string("output", None, "Directory for pictures, predictions.csv and masks.")
  flags.DEFINE_bool("save_masks", False, "Also write masks/<stem>.png (255 = defect).")
  flags.DEFINE_integer("batch_size", 0, "Images per batch; 0 = the run's config.eval.batch_size.")
  flags.mark_flags_as_required(["workdir", "input", "output"])


def input_images(input_path: str | Iterable[str], output: str) -> list[str]:
  """The images of ``--input``: folders searched recursively, minus ``output``'s own files.

  Raises:
    DatasetError: nothing to predict at ``input_path``.
  """
  paths = folder.list_images(input_path, recursive=True)
  # A second run must not predict the pictures the first one wrote into the input.
  out = os.path.join(os.path.abspath(output), "")
  kept = [p for p in paths if not os.path.abspath(p).startswith(out)]
  if not kept:
    raise folder.DatasetError(
      f"No image found at {input_path!r} outside the --output folder {output}."
    )
  return kept


def run(
  workdir: str,
  category: str | None,
  input_path: str | Iterable[str],
  output: str,
  save_masks: bool = False,
  batch_size: int | None = None,
  log=print,
  seed: int = 0,
  source: source_lib.DataSource | None = None,
) -> dict[str, Any]:
  """The command line's work: resolve, restore, predict, write; see module doc.

  ``source`` decodes the images (None = Pillow; the command line passes
  ``data_pipelines.select_source()``).

  Raises:
    PredictError / DatasetError: a message for the user (no run, untrained
      category, no image at ``input_path``, every image unreadable).
  """
  category = resolve_category(workdir, category)  # Fails before any image listing.
  resolve_job(workdir, category, seed)
  paths = input_images(input_path, output)
  predictor = Predictor(workdir, category, seed, source)
  log(f"[{predictor.category}] checkpoint step {predictor.step}; {predictor.describe_thresholds()}")
  log(f"[{predictor.category}] predicting {len(paths)} image(s) into {output}")
  summary = write_predictions(predictor, paths, output, batch_size or None, save_masks, log)
  if not summary["predicted"]:
    raise PredictError(f"None of the {len(paths)} image(s) could be read; nothing predicted.")
  skipped = len(summary["skipped"])
  log(
    f"[{predictor.category}] {summary['predicted']} predicted ({summary['ng']} NG), "
    f"{skipped} skipped; results in {summary['csv']}"
  )
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:  # Progress lines, not orbax's INFO log.
    logging.set_verbosity(logging.ERROR)
  # A warning (e.g. no thresholds) reads as one line, not as a source excerpt.
  warnings.showwarning = lambda message, *a, **k: print(f"warning: {message}", file=sys.stderr)
  import data_pipelines

  try:
    host_memory.keep_freed_memory()  # before JAX starts, as in training
    run(
      FLAGS.workdir,
      FLAGS.category,
      FLAGS.input,
      FLAGS.output,
      FLAGS.save_masks,
      FLAGS.batch_size,
      log=lambda s: print(s, flush=True),
      seed=FLAGS.seed,
      source=data_pipelines.select_source(),
    )
  except (folder.DatasetError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
