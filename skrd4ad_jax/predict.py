"""OK/NG, heat maps and defect masks for new images, from a trained run.

  python -m skrd4ad_jax.predict --workdir=runs/tiny --category=brick \
      --input=new_images/ --output=predictions/ [--save_masks] [--batch_size=8]

``--input`` is an image file, a folder (searched recursively: a ``test/`` folder
with one sub-folder per defect works; ``--output`` is skipped if it lies inside)
or a glob (``'lot_42/*.png'``, ``'lot_42/**/*.png'``, quoted). ``--category`` may
be left out when the run trained a single category.

The latest checkpoint of the category carries everything needed: the config
(the method is rebuilt from it), the thresholds and the score normalisation
(its JSON item, written by ``trainer.py``). Images are decoded exactly as the
evaluation pipeline decodes them (``skrd4ad_jax.data.input_pipeline``), streamed
through tf.data in batches of ``--batch_size`` (default: the run's
``config.eval.batch_size``, which also reproduces the evaluation's raw scores
bit for bit), so memory does not grow with the size of the folder.

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
import copy
import csv
import dataclasses
import math
import os
import re
import sys
import time
from typing import Any
import warnings

from absl import app, flags, logging
import jax
import ml_collections
import numpy as np

from skrd4ad_jax import methods, teachers
from skrd4ad_jax.data import folder
from skrd4ad_jax.evaluation import thresholds as thresholds_lib
from skrd4ad_jax.evaluation import visualize
from skrd4ad_jax.training import checkpoints, schedule, train

CSV_COLUMNS = ("image_path", "pred_score", "pred_score_raw", "pred_label")
MASK_DIR = "masks"
PROGRESS_SECONDS = 5.0  # At most one progress line per this many seconds.
_THRESHOLD_KEYS = (
  "image_threshold",
  "pixel_threshold",
  "image_min",
  "image_max",
  "pixel_min",
  "pixel_max",
)

FLAGS = flags.FLAGS


class PredictError(ValueError):
  """A run, category or input that cannot be predicted on; the message says why."""


@dataclasses.dataclass
class ImageResult:
  """The prediction for one input image.

  For an image that could not be read only ``image_path`` and ``error`` are set.

  Attributes:
    image_path: the input file.
    pred_score: normalised image score in [0, 1], 0.5 = the image threshold
      (NaN without a threshold).
    pred_score_raw: the raw image score of the method (as in the evaluation).
    pred_label: ``'NG'``, ``'OK'``, or ``''`` without an image threshold.
    anomaly_map: [S, S] float32 raw anomaly map at the network input size.
    anomaly_map_normalized: [S, S] float32, 0.5 = the pixel threshold (the raw
      map when there is no pixel threshold).
    pred_mask: [S, S] bool, ``anomaly_map >= pixel_threshold``; None without a
      pixel threshold.
    image: [S, S, 3] uint8, the resized image the network saw.
    error: why the image was skipped; None when it was predicted.
  """

  image_path: str
  pred_score: float = math.nan
  pred_score_raw: float = math.nan
  pred_label: str = ""
  anomaly_map: np.ndarray | None = None
  anomaly_map_normalized: np.ndarray | None = None
  pred_mask: np.ndarray | None = None
  image: np.ndarray | None = None
  error: str | None = None

  @property
  def ok(self) -> bool:
    return self.error is None


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


def stored_thresholds(meta: dict[str, Any]) -> dict[str, Any]:
  """The checkpoint's thresholds with every numeric field a float (NaN if missing)."""
  thr = dict(meta.get("thresholds") or {})
  for key in _THRESHOLD_KEYS:
    value = thr.get(key)
    thr[key] = float("nan") if value is None else float(value)
  return thr


# ---------------------------------------------------------------------------
# Input streaming.


def _failure_message(path: str, image_size: int) -> str:
  """Why ``path`` could not be loaded (the streaming pipeline only drops it)."""
  try:
    folder.check_image(path)
  except folder.DatasetError as e:
    return str(e)
  try:
    from skrd4ad_jax.data import input_pipeline

    input_pipeline.decode_and_resize(path, image_size).numpy()
  except Exception as e:
    first = (str(e).strip().splitlines() or [""])[0]
    # TensorFlow wraps the decoder's words in op names: keep the words.
    first = re.sub(r"\s*\[Op:.*$", "", re.sub(r"\{\{.*?\}\}\s*", "", first))
    return (
      f"Could not decode image {path} ({type(e).__name__}: {first}). Fix: replace "
      "the file with a valid image or remove it."
    )
  return f"Could not load image {path}."


def stream_batches(
  paths: Sequence[str], image_size: int, batch_size: int
) -> Iterator[tuple[dict[str, np.ndarray], list[tuple[int, str]]]]:
  """Decodes ``paths`` in order, as the evaluation pipeline does, in padded batches.

  Args:
    paths: image files.
    image_size: side of the network input.
    batch_size: images per batch; the last batch is padded with zeros.

  Yields:
    (batch, failures): ``batch`` holds ``image`` float32 [B, S, S, 3]
    ImageNet-normalised, ``image_8bit`` uint8 [B, S, S, 3], ``index`` int64 [B]
    (position in ``paths``, -1 for padding) and ``valid`` bool [B];
    ``failures`` lists (index, message) of the files dropped since the
    previous batch, up to this batch's last index (a last item ``(None,
    failures)`` reports files dropped after the last batch).
  """
  # TensorFlow stays at the edge: only this function needs it.
  import tensorflow as tf

  from skrd4ad_jax.data import input_pipeline

  input_pipeline.configure_tensorflow()

  def readable(path: bytes) -> np.ndarray:
    try:
      folder.check_image(path.decode())
    except folder.DatasetError:
      return np.array(False)
    return np.array(True)

  def check(index, path):
    return index, path, tf.numpy_function(readable, [path], tf.bool, stateful=False)

  def load(index, path):
    image = input_pipeline.decode_image_8bit(tf.io.read_file(path), image_size)
    return {"index": index, "image_8bit": image, "image": input_pipeline.normalize(image)}

  n = len(paths)
  ds = tf.data.Dataset.from_tensor_slices(
    (tf.range(n, dtype=tf.int64), tf.constant(list(paths), tf.string, shape=[n]))
  )
  # A bad file is dropped here and reported from the gap in the indices, so it
  # does not stop the stream. PIL's check first drops most of them quietly
  # (TensorFlow logs a traceback for each decoder error it meets).
  ds = ds.map(check, num_parallel_calls=tf.data.AUTOTUNE).filter(lambda i, p, ok: ok)
  ds = ds.map(lambda i, p, ok: load(i, p), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.ignore_errors()
  ds = ds.batch(batch_size).prefetch(input_pipeline.PREFETCH_BATCHES)
  ds = ds.with_options(input_pipeline.dataset_options())

  expected = 0
  for batch in ds.as_numpy_iterator():
    index = batch["index"]  # ascending
    seen = set(index.tolist())
    failures = [
      (i, _failure_message(paths[i], image_size))
      for i in range(expected, int(index[-1]))
      if i not in seen
    ]
    expected = int(index[-1]) + 1
    m = len(index)
    pad = batch_size - m
    padded = {
      k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
      for k, v in batch.items()
      if k != "index"
    }
    padded["index"] = np.concatenate([index, -np.ones(pad, np.int64)])
    padded["valid"] = np.arange(batch_size) < m
    yield padded, failures
  if expected < n:
    yield None, [(i, _failure_message(paths[i], image_size)) for i in range(expected, n)]


# ---------------------------------------------------------------------------
# The predictor.


class Predictor:
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
  """

  def __init__(self, workdir: str, category: str | None = None, seed: int = 0):
    """Restores the latest checkpoint of ``category``'s seed ``seed`` (``resolve_job``).

    ``self.category`` is then the job's name: the category for seed 0,
    ``<category>/seed_<k>`` otherwise.
    """
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
    self._eval_step = train.jitted_eval_step(self.method)
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

  def _set_thresholds(self, thresholds: dict[str, Any] | None, where: str) -> None:
    self.thresholds = stored_thresholds({"thresholds": thresholds})
    self.warnings = []
    if not thresholds:
      self.warnings.append(
        f"The {where} holds no thresholds (training did not finish?): pred_score and "
        "pred_label are left empty, pictures show raw scores, no mask is drawn."
      )
    else:
      if not self.has_image_threshold:
        self.warnings.append(
          f"The {where} holds no image threshold (NaN): pred_score and pred_label are left empty."
        )
      if not self.has_pixel_threshold:
        self.warnings.append(
          f"The {where} holds no pixel threshold (NaN): no defect contour or mask."
        )
    for message in self.warnings:
      warnings.warn(message, RuntimeWarning, stacklevel=3)

  def with_thresholds(self, thresholds: dict[str, Any]) -> Predictor:
    """The same restored model with other thresholds (another operating point).

    Args:
      thresholds: the keys of the checkpoint's ``thresholds`` (missing ones
        are taken from the checkpoint); NaN disables the image or pixel
        decision.

    Returns:
      A new ``Predictor`` sharing the model and its compiled step.
    """
    other = copy.copy(self)
    merged = {**(self.meta.get("thresholds") or {}), **thresholds}
    other._set_thresholds(merged, "with_thresholds call")
    return other

  @property
  def has_image_threshold(self) -> bool:
    return math.isfinite(self.thresholds["image_threshold"])

  @property
  def has_pixel_threshold(self) -> bool:
    return math.isfinite(self.thresholds["pixel_threshold"])

  def describe_thresholds(self) -> str:
    thr = self.thresholds
    return (
      f"image threshold {thr['image_threshold']:.6g}, pixel threshold "
      f"{thr['pixel_threshold']:.6g} (rule {thr.get('rule', '?')}, chosen on "
      f"{thr.get('source', '?')})"
    )

  def _result(self, path: str, image: np.ndarray, amap: np.ndarray, score: float) -> ImageResult:
    thr = self.thresholds
    result = ImageResult(
      image_path=path,
      pred_score_raw=float(score),
      anomaly_map=amap,
      image=image,
      anomaly_map_normalized=amap,
    )
    if self.has_image_threshold:
      # float32 as in evaluate.normalized, so test_predictions.csv matches too.
      result.pred_score = float(
        np.float32(
          thresholds_lib.normalize_scores(
            score, thr["image_threshold"], thr["image_min"], thr["image_max"]
          )
        )
      )
      # The raw comparison is the decision; the normalised score only shows it.
      result.pred_label = "NG" if score >= thr["image_threshold"] else "OK"
    if self.has_pixel_threshold:
      result.anomaly_map_normalized = np.asarray(
        thresholds_lib.normalize_scores(
          amap, thr["pixel_threshold"], thr["pixel_min"], thr["pixel_max"]
        ),
        np.float32,
      )
      result.pred_mask = amap >= thr["pixel_threshold"]
    return result

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
    for batch, failures in stream_batches(paths, self.image_size, batch_size):
      ordered = [(i, ImageResult(image_path=paths[i], error=message)) for i, message in failures]
      if batch is not None:
        maps, scores = self._eval_step(self.state, self.teacher_vars, batch["image"], self.rng)
        maps = np.asarray(maps, np.float32)  # [B, S, S]
        scores = np.asarray(scores, np.float32)  # [B]
        for j in np.flatnonzero(batch["valid"]):
          i = int(batch["index"][j])
          ordered.append((i, self._result(paths[i], batch["image_8bit"][j], maps[j], scores[j])))
      ordered.sort(key=lambda item: item[0])
      for _, result in ordered:
        yield result

  def picture(self, result: ImageResult) -> np.ndarray:
    """The overlay picture of a result (normalised scale: 0.5 = threshold)."""
    title = os.path.basename(result.image_path)
    label = result.pred_label or None
    if self.has_pixel_threshold:
      vmin, vmax = 0.0, 1.0
    else:  # Raw map: the run's range keeps the colours comparable between images.
      vmin = self.thresholds["pixel_min"] if math.isfinite(self.thresholds["pixel_min"]) else None
      vmax = self.thresholds["pixel_max"] if math.isfinite(self.thresholds["pixel_max"]) else None
    if self.has_image_threshold:
      score, threshold = result.pred_score, 0.5
    else:
      score, threshold = result.pred_score_raw, None
    return visualize.overlay_picture(
      result.image,
      result.anomaly_map_normalized,
      None,
      result.pred_mask,
      score=score,
      label=label,
      threshold=threshold,
      vmin=vmin,
      vmax=vmax,
      title=title,
    )

  def mask_image(self, result: ImageResult) -> np.ndarray | None:
    """uint8 {0, 255} defect mask at the original image size; None without threshold.

    The raw map is resized (bilinear) to the original size and compared with
    the pixel threshold, so the mask lies on the user's own image.
    """
    if not self.has_pixel_threshold or result.anomaly_map is None:
      return None
    from PIL import Image

    with Image.open(result.image_path) as im:
      size = im.size
    amap = Image.fromarray(np.asarray(result.anomaly_map, np.float32))  # mode F
    if amap.size != size:
      amap = amap.resize(size, Image.Resampling.BILINEAR)
    mask = np.asarray(amap) >= self.thresholds["pixel_threshold"]
    return mask.astype(np.uint8) * 255


def predict_images(
  workdir: str, category: str | None, paths: Sequence[str], batch_size: int | None = None
) -> Iterator[ImageResult]:
  """Predicts images with the latest checkpoint of a category of a run.

  Args:
    workdir: the training run directory.
    category: the category; None when the run trained exactly one.
    paths: image files, e.g. ``skrd4ad_jax.data.folder.list_images('dir/')``.
    batch_size: images per batch; None = the run's ``config.eval.batch_size``.

  Yields:
    One ``ImageResult`` per path, in order (unreadable files carry ``error``
    and no score).

  Raises:
    PredictError: no run / checkpoint, or a category that was not trained.
  """
  yield from Predictor(workdir, category).predict(paths, batch_size)


# ---------------------------------------------------------------------------
# Writing the outputs.


def output_names(paths: Sequence[str]) -> list[str]:
  """Unique picture names (no extension).

  The stems when they are unique; otherwise ``<folder>_<stem>`` for every image
  (MVTec test folders all hold ``000.png``), and ``_1``, ``_2``... on a clash
  that remains.
  """
  names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  if len(set(names)) < len(names):
    names = [
      f"{os.path.basename(os.path.dirname(os.path.abspath(p)))}_{s}" for p, s in zip(paths, names)
    ]
  used: set[str] = set()
  for i, name in enumerate(names):
    unique, k = name, 1
    while unique in used:
      unique, k = f"{name}_{k}", k + 1
    used.add(unique)
    names[i] = unique
  return names


def _csv_float(x: float) -> str:
  return "" if not math.isfinite(x) else repr(float(x))


def write_predictions(
  predictor: Predictor,
  paths: Sequence[str],
  output: str,
  batch_size: int | None = None,
  save_masks: bool = False,
  log=print,
) -> dict[str, Any]:
  """Predicts ``paths`` and writes pictures, ``predictions.csv`` and masks.

  Args:
    predictor: the restored category.
    paths: image files.
    output: output directory (created).
    batch_size: inference batch size (None = the run's eval batch size).
    save_masks: also write ``masks/<name>.png``.
    log: where progress and skip reports go (a print-like function).

  Returns:
    dict(predicted=int, skipped=list of (path, message), ng=int, csv=path).
  """
  names = output_names(paths)
  inputs = {os.path.abspath(p) for p in paths}
  for name in names:
    target = os.path.abspath(os.path.join(output, f"{name}.png"))
    if target in inputs:
      raise PredictError(
        f"Writing the picture {target} would overwrite an input image; "
        "choose another --output directory."
      )
  os.makedirs(output, exist_ok=True)
  if save_masks and not predictor.has_pixel_threshold:
    log("warning: no pixel threshold in the checkpoint: no mask is written.")
    save_masks = False
  csv_path = os.path.join(output, "predictions.csv")
  summary = {"predicted": 0, "skipped": [], "ng": 0, "csv": csv_path}
  t0 = last = time.time()
  with open(csv_path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(CSV_COLUMNS)
    # One result per path, in order: the names line up.
    results = zip(names, predictor.predict(paths, batch_size))
    for done, (name, result) in enumerate(results, start=1):
      if not result.ok:
        summary["skipped"].append((result.image_path, result.error))
        log(f"warning: skipped {result.image_path}: {result.error}")
      else:
        visualize.save_picture(os.path.join(output, f"{name}.png"), predictor.picture(result))
        if save_masks:
          visualize.save_picture(
            os.path.join(output, MASK_DIR, f"{name}.png"), predictor.mask_image(result)
          )
        writer.writerow(
          [
            result.image_path,
            _csv_float(result.pred_score),
            _csv_float(result.pred_score_raw),
            result.pred_label,
          ]
        )
        summary["predicted"] += 1
        summary["ng"] += result.pred_label == "NG"
      now = time.time()
      if now - last >= PROGRESS_SECONDS or done == len(paths):
        f.flush()
        last = now
        log(
          f"[{predictor.category}] {done}/{len(paths)} images "
          f"({done / max(now - t0, 1e-9):.1f} images/s, {len(summary['skipped'])} skipped)"
        )
  return summary


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
) -> dict[str, Any]:
  """The command line's work: resolve, restore, predict, write; see module doc.

  Raises:
    PredictError / DatasetError: a message for the user (no run, untrained
      category, no image at ``input_path``, every image unreadable).
  """
  category = resolve_category(workdir, category)  # Fails before any image listing.
  resolve_job(workdir, category, seed)
  paths = input_images(input_path, output)
  predictor = Predictor(workdir, category, seed)
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
  try:
    run(
      FLAGS.workdir,
      FLAGS.category,
      FLAGS.input,
      FLAGS.output,
      FLAGS.save_masks,
      FLAGS.batch_size,
      log=lambda s: print(s, flush=True),
      seed=FLAGS.seed,
    )
  except (folder.DatasetError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
