"""What a run writes besides checkpoints: TensorBoard runs per job, the results tables.

``JobWriters`` keeps one clu writer per job (one TensorBoard run under
``<workdir>/<job>``), or, with ``train.tensorboard=False`` or when clu's
TensorBoard writer cannot be imported (no TensorFlow), a ``LoggingWriter`` that
sends the scalars to the log.
``write_results`` gathers every job's results row from all processes and
writes ``results.csv``, ``results.md`` (and ``results_per_seed.csv``) with the
run's notes.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from absl import logging
import jax
import ml_collections

from skrd4ad_jax import config as config_lib
from skrd4ad_jax import errors, faults
from skrd4ad_jax.evaluation import evaluate
from skrd4ad_jax.evaluation import results as results_lib
from skrd4ad_jax.teachers import recipe
from skrd4ad_jax.training import parallel
from skrd4ad_jax.training.jobs import Job, config_to_json


class LoggingWriter:
  """Scalars to the log: no TensorBoard asked for, or clu's writer cannot be had (no TensorFlow)."""

  def __init__(self, collection: str):
    self.collection = collection

  def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
    text = ", ".join(f"{k}={float(v):.6g}" for k, v in sorted(scalars.items()))
    logging.info("[%s] step %d: %s", self.collection, step, text)

  def write_images(self, step: int, images: dict[str, Any]) -> None:
    del step, images  # pictures are written as PNG files under <workdir>/<job>/images

  def write_hparams(self, hparams: dict[str, Any]) -> None:
    del hparams  # stored with every checkpoint (meta.config)

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


_warned_no_tensorboard = []


def make_writer(workdir: str, collection: str, tensorboard: bool = True):
  """clu's default writer (one TensorBoard run per job), or scalars to the log (no TF)."""
  if not tensorboard:
    return LoggingWriter(collection)
  try:
    from clu import metric_writers
  except ImportError as e:  # clu's summary writer imports TensorFlow
    if not _warned_no_tensorboard:
      _warned_no_tensorboard.append(True)
      logging.warning(
        "No TensorBoard events are written (%s): training scalars go to the log. Install "
        "tensorflow-cpu for TensorBoard runs.",
        e,
      )
    return LoggingWriter(collection)
  return metric_writers.create_default_writer(workdir, collection=collection)


class JobWriters:
  """One writer per job, made on first use (by the loop or the host work: locked)."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict):
    self._workdir = workdir
    self._tensorboard = bool(config.train.get("tensorboard", True))
    self._hparams = config_lib.flatten(config_to_json(config))
    self._writers: dict[str, Any] = {}
    self._lock = threading.Lock()

  def __call__(self, job: Job):
    with self._lock:
      if job.name not in self._writers:
        writer = make_writer(self._workdir, job.name, self._tensorboard)
        writer.write_hparams({**self._hparams, "job": job.name})
        self._writers[job.name] = writer
      return self._writers[job.name]

  def close(self) -> None:
    with self._lock:
      for writer in self._writers.values():
        writer.close()


def notes(
  config: ml_collections.ConfigDict,
  method,
  jobs: dict[str, Job],
  eval_only: bool,
  stats: dict[str, float],
  num_slots: int,
) -> list[str]:
  """The notes under the results table: the recipe, the protocol, the loop's speed."""
  cfg = config
  map_kwargs = method.map_kwargs
  differ = recipe.recipe_notes(cfg)
  out = [
    f"method: {method.name}; teacher: {cfg.model.teacher} "
    f"(weights: {cfg.model.teacher_weights or 'default'}); image size "
    f"{cfg.data.image_size}; dtype {cfg.model.get('dtype', 'float32')}.",
    f"Loss: {cfg.loss.kind}; anomaly map: {map_kwargs['mode']} of levels "
    f"{map_kwargs['levels']}, Gaussian sigma {map_kwargs['sigma']:g}.",
  ]
  if differ:
    out.append("Recipe settings that differ from the official code: " + "; ".join(differ) + ".")
  out += [
    "Headline metrics are those of the last training step on the test set; no checkpoint "
    "or epoch was selected on the test set.",
    "pixel_aupro: pooled MVTec/anomalib protocol (FPR <= 0.3). pixel_aupro_rd4ad: "
    "the RD4AD-family per-image average (what the papers report).",
    evaluate.protocol_note(cfg.eval.get("protocol", "project")),
    "Thresholds chosen on: "
    + (
      "held-out normal training images."
      if cfg.thresholds.source == "val"
      else "the test set (optimistic, as the peers do)."
    ),
  ]
  if int(cfg.train.get("seeds", 1)) > 1:
    out.append(
      f"{cfg.train.seeds} seeds per category (seed k = config.seed + k = "
      f"{cfg.seed} + k): mean ± standard deviation over seeds; the mean row's spread is "
      "the standard deviation over seeds of the per-seed category means. Every seed's row "
      "is in results_per_seed.csv."
    )
  if int(cfg.train.eval_every_epochs) > 0:
    out.append(
      "Columns marked 'test-selected' hold the best value over the periodic test-set "
      "evaluations (what SK-RD4AD, URD and RD++ report): optimistic, for comparison only."
    )
  if eval_only:
    out.append("Evaluation-only run: the models were not trained by this command.")
  if any("imported_from" in j.kept_meta for j in jobs.values()):
    out.append(
      "Some models were imported from official PyTorch checkpoints "
      "(python -m skrd4ad_jax.import_checkpoint)."
    )
  out += method.notes()
  if stats["loop_seconds"] > 0:
    out.append(
      f"Training loop: {stats['images'] / stats['loop_seconds']:.2f} images/s over "
      f"{stats['loop_seconds']:.0f} s on {num_slots} slot(s) (train_seconds and "
      "images/s of a job count the wall time of every loop iteration it took part in); host "
      f"time {100 * stats['host_seconds'] / stats['loop_seconds']:.1f} % of the loop."
    )
  return out


def write_results(
  config: ml_collections.ConfigDict,
  workdir: str,
  jobs: dict[str, Job],
  finished_here: list[Job],
  categories: list[str],
  run_notes: list[str],
) -> list[dict[str, Any]]:
  """results.csv / results.md (and results_per_seed.csv), gathered from all processes.

  Call after every piece of host work has finished (the rows are its results).

  Args:
    config: the prepared config.
    workdir: the run's directory.
    jobs: every job of the run.
    finished_here: the jobs this process finished (evaluated at their last step).
    categories: the categories in table order.
    run_notes: the lines under the table (``notes``).

  Returns:
    One row per finished job (every seed of every category).

  Raises:
    TrainingFailed: some jobs stopped on a non-finite loss (after the table of
      the others is written).
  """
  faults.point("results_write", path=workdir)  # [ckpt]
  local = [{"job": j.name, **j.results.row} for j in finished_here if j.results.row is not None]
  failed = {name: job.failed for name, job in jobs.items() if job.failed}
  by_job = {r["job"]: r for rows in parallel.allgather_json(local) for r in rows}
  seed_rows = [dict(by_job[name]) for name in jobs if name in by_job]
  for r in seed_rows:
    r.pop("job")
  if seed_rows and jax.process_index() == 0:
    rows, mean = results_lib.aggregate_seeds(seed_rows, list(categories))
    results_lib.write_results_table(
      rows, workdir, dataset=config.data.dataset, notes=run_notes, mean=mean
    )
    if int(config.train.get("seeds", 1)) > 1:
      results_lib.write_rows_csv(seed_rows, os.path.join(workdir, "results_per_seed.csv"))
    print(results_lib.format_console_table(rows, dataset=config.data.dataset, mean=mean))
  if failed:
    where = (
      f" Results of the other jobs are in {workdir}/results.md."
      if seed_rows
      else " No job finished, so no results table was written."
    )
    raise errors.TrainingFailed(
      "Training failed for " + "; ".join(f"{name}: {why}" for name, why in failed.items()) + where
    )
  return seed_rows
