"""A job's evaluation: its slot's state to predictions (device), then metrics and files (host).

``Evaluator.predictions`` runs the jitted evaluation step of the state in a slot
on the slot's device, over the test split (and the held-out normal images when
the thresholds are chosen on them). The host part, which the loop hands to the
host work, is split by what it produces: ``metrics`` (thresholds, metrics, the
test-selected figures), ``write_summaries`` (TensorBoard scalars and heat maps,
the log line), ``write_final_files`` (``test_predictions.csv``, the pictures),
and ``result_row`` (the job's row of the results table).
"""

from __future__ import annotations

import math
import os
from typing import Any

from absl import logging
import jax
import ml_collections

from skrd4ad_jax import faults
from skrd4ad_jax.evaluation import evaluate, prediction_output
from skrd4ad_jax.evaluation import results as results_lib
from skrd4ad_jax.training import parallel, steps
from skrd4ad_jax.training.jobs import Job

RESULT_METRICS = results_lib.METRIC_COLUMNS
# Metrics whose best value over the periodic evaluations is reported, apart and
# labelled, as the test-selected (optimistic) figure some papers report.
SELECTED_METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro", "pixel_aupro_rd4ad")


class Evaluator:
  """Turns the state of a job in a slot into its (test, val) predictions."""

  def __init__(self, config, method, data: dict[str, Any], slots, teacher_vars: Any):
    """Args:
    config: the prepared config.
    method: the ``methods.Method``.
    data: ``CategoryData`` per category (loaded).
    slots: the ``slots.SlotPlan`` (mesh, number of slots).
    teacher_vars: the teacher's variables (host arrays), copied to each device.
    """
    self._config = config
    self._data = data
    self._slots = slots
    self._eval_step = steps.jitted_eval_step(method)
    replicated = parallel.put_replicated(teacher_vars, slots.mesh)
    self._teacher_copies = parallel.device_copies(replicated)

  def predictions(self, job: Job, slot: int, stacked: Any) -> tuple[Any, Any]:
    """(test, val) predictions of the job in ``slot`` (on its device); val None if unused."""
    cfg = self._config
    state = parallel.local_slot(stacked, slot)
    device = parallel.slot_device(self._slots.mesh, self._slots.num_slots, slot)
    teacher_vars = self._teacher_copies[device]
    key = jax.device_put(jax.random.PRNGKey(job.seed), device)

    def eval_fn(images):
      return self._eval_step(state, teacher_vars, jax.device_put(images, device), key)

    data = self._data[job.category]
    bs = int(cfg.eval.batch_size)
    test = evaluate.predict(eval_fn, data.eval_batches("test", bs), data.has_masks, True)
    val = None
    if cfg.thresholds.source == "val":
      val = evaluate.predict(eval_fn, data.eval_batches("val", bs), has_masks=False)
    return test, val


def metrics(
  config: ml_collections.ConfigDict, job: Job, workdir: str, test, val
) -> tuple[dict[str, Any], dict[str, Any]]:
  """(metrics, thresholds) of predictions; updates the job's test-selected figures (host work)."""
  faults.point("host_eval", path=os.path.join(workdir, job.name))  # [ckpt]
  thr = evaluate.choose_thresholds(
    val if val is not None else test, float(config.thresholds.normal_quantile)
  )
  thr["source"] = config.thresholds.source
  protocol = config.eval.get("protocol", "project")
  m = evaluate.compute_metrics(test, float(config.eval.fpr_limit), protocol=protocol)
  m.update(evaluate.threshold_metrics(test, thr))
  best = job.results.best
  for key in SELECTED_METRICS:
    value = m.get(key, float("nan"))
    if math.isfinite(value) and not value <= best.get(key, -math.inf):
      best[key] = value
  return m, thr


def write_summaries(config, writer, step: int, m: dict[str, Any], test, thr) -> None:
  """The evaluation's scalars (and heat maps) to the job's TensorBoard run."""
  writer.write_scalars(
    step, {f"eval/{k}": v for k, v in m.items() if isinstance(v, float) and math.isfinite(v)}
  )
  n_pics = int(config.eval.tensorboard_pictures)
  if n_pics:
    writer.write_images(step, {"eval/heatmaps": evaluate.picture_grid(test, thr, n_pics)[None]})


def log_metrics(writer, job: Job, step: int, m: dict[str, Any], seconds: float) -> None:
  writer.write_scalars(step, {"eval/seconds": seconds})
  writer.flush()
  logging.info(
    "[%s] step %d: %s",
    job.name,
    step,
    ", ".join(f"{k}={m[k]:.4f}" for k in RESULT_METRICS if k in m),
  )


def write_final_files(config, job: Job, workdir: str, test, thr: dict[str, Any]) -> None:
  """``<job>/test_predictions.csv`` and, when configured, the test pictures."""
  job_dir = os.path.join(workdir, job.name)
  norm_scores, _ = evaluate.normalized(test, thr)
  prediction_output.write_test_predictions(
    os.path.join(job_dir, "test_predictions.csv"),
    test.paths,
    test.defect_types,
    test.labels,
    test.scores,
    norm_scores,
    thr["image_threshold"],
  )
  pictures = config.eval.save_pictures and (
    job.seed_index == 0 or config.eval.get("pictures_all_seeds", False)
  )
  if pictures:
    evaluate.save_pictures(test, thr, os.path.join(job_dir, "images", "test"))


def result_row(
  config, job: Job, step: int, train_seconds: float, m: dict[str, Any]
) -> dict[str, Any]:
  """The job's row of the results table at its last step."""
  images = step * int(config.train.batch_size)
  row = {
    "category": job.category,
    "seed": job.seed,
    **{k: m.get(k, float("nan")) for k in RESULT_METRICS},
    "image_f1_at_threshold": m["image_f1_at_threshold"],
    "image_precision": m["image_precision"],
    "image_recall": m["image_recall"],
    **{k: v for k, v in m.items() if k.startswith("baseline_")},
    "train_seconds": train_seconds,
    "train_images_per_second": images / train_seconds if train_seconds else math.nan,
  }
  if int(config.train.eval_every_epochs) > 0:
    for key in SELECTED_METRICS:
      row[f"{key}_test_selected"] = job.results.best.get(key, math.nan)
  return row


def baseline_metrics(config, data) -> dict[str, float]:
  """The colour-statistics baseline on the same split (no learning involved)."""
  from skrd4ad_jax.evaluation import baseline

  test = data.split("test")
  train_images = data.split("train").image
  maps = baseline.colour_statistics_baseline(train_images, test.image)
  pred = evaluate.Predictions(
    maps=maps,
    scores=maps.reshape(len(maps), -1).max(-1),
    labels=test.gt_label,
    masks=test.gt_mask if data.has_masks else None,
    paths=list(test.image_path),
    defect_types=list(test.defect_type),
  )
  m = evaluate.compute_metrics(pred, float(config.eval.fpr_limit))
  return {f"baseline_{k}": m[k] for k in ("image_auroc", "pixel_auroc", "pixel_aupro")}
