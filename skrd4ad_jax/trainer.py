"""``train_and_evaluate``: every category of a config, trained in parallel, evaluated.

All categories train in one program: their states are stacked and one jitted,
vmapped step advances them all (``parallel.py``). Each category keeps its own
schedule (its epochs over its own training set); a category whose schedule is
done, or a padded slot, is inactive and its state is left untouched, so the
results do not depend on which categories share a run. Evaluation, thresholds,
checkpoints, TensorBoard runs and pictures stay per category.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time
import zlib
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from skrd4ad_jax import checkpoints
from skrd4ad_jax import evaluate
from skrd4ad_jax import methods
from skrd4ad_jax import parallel
from skrd4ad_jax import results as results_lib
from skrd4ad_jax import teachers
from skrd4ad_jax import train

RESULT_METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro", "pixel_aupro_rd4ad",
                  "image_f1max", "pixel_ap")


@dataclasses.dataclass
class Schedule:
  """One category's training schedule, in steps of ``batch_size`` images."""

  epochs: int
  steps_per_epoch: int
  total_steps: int
  eval_every: int  # steps; 0 = only the final evaluation
  checkpoint_every: int  # steps; 0 = only the final checkpoint


def parse_category_values(spec: str, name: str) -> dict[str, int]:
  """``'carpet:10,leather:10'`` -> {'carpet': 10, 'leather': 10}."""
  out = {}
  for item in filter(None, (s.strip() for s in (spec or "").split(","))):
    cat, sep, value = item.partition(":")
    if not sep or not value.strip().isdigit():
      raise ValueError(f"Cannot parse {name}={spec!r}: expected 'category:N,category:N'.")
    out[cat.strip()] = int(value)
  return out


def make_schedule(train_cfg, category: str, num_train: int, default_num_steps: int = 0
                  ) -> Schedule:
  """Epochs (or a fixed step count) over the category's own training set.

  Args:
    train_cfg: ``config.train``.
    category: the category's name (for per-category overrides).
    num_train: its number of training images.
    default_num_steps: the method's own step budget (RD with Expert counts
      iterations, not epochs); used when ``config.train.num_steps`` is 0.
  """
  steps_per_epoch = max(1, math.ceil(num_train / int(train_cfg.batch_size)))
  epochs = parse_category_values(train_cfg.category_epochs, "config.train.category_epochs"
                                 ).get(category, int(train_cfg.epochs))
  total = epochs * steps_per_epoch
  category_steps = parse_category_values(train_cfg.get("category_steps", ""),
                                         "config.train.category_steps")
  num_steps = category_steps.get(category, int(train_cfg.get("num_steps", 0))
                                 or int(default_num_steps))
  if num_steps > 0:
    total = num_steps
    epochs = math.ceil(num_steps / steps_per_epoch)
  return Schedule(epochs=epochs, steps_per_epoch=steps_per_epoch, total_steps=total,
                  eval_every=int(train_cfg.eval_every_epochs) * steps_per_epoch,
                  checkpoint_every=int(train_cfg.checkpoint_every_epochs) * steps_per_epoch)


def ensure_workdir(workdir: str) -> str:
  """Creates ``workdir`` and proves it is writable, or says how to fix it."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".write_test")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise OSError(f"Cannot write to the workdir {workdir!r} ({e.strerror}). Choose another "
                  "directory with --workdir=DIR or fix its permissions.") from e
  return workdir


def write_test_predictions(pred: evaluate.Predictions, thr: dict[str, Any], path: str) -> None:
  """Per-image test results: raw and normalised scores, OK/NG at the stored threshold."""
  norm_scores, _ = evaluate.normalized(pred, thr)
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["image_path", "defect_type", "gt_label", "pred_score_raw", "pred_score",
                "pred_label"])
    for i in range(len(pred)):
      # The decision is on the raw score, as in predict and threshold_metrics.
      label = ("" if not math.isfinite(thr["image_threshold"]) else
               "NG" if pred.scores[i] >= thr["image_threshold"] else "OK")
      w.writerow([pred.paths[i], pred.defect_types[i], int(pred.labels[i]),
                  repr(float(pred.scores[i])), repr(float(norm_scores[i])), label])


def config_to_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort())


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
  return out


class CategoryRun:
  """Host-side bookkeeping of one category inside a parallel run."""

  def __init__(self, slot: int, category: str, data, schedule: Schedule, workdir: str):
    self.slot = slot
    self.category = category
    self.data = data
    self.schedule = schedule
    self.manager = checkpoints.make_manager(workdir, category)
    self.step = 0
    self.train_seconds = 0.0
    self.failed: str | None = None
    self.row: dict[str, Any] | None = None
    self.iterator = None
    self.writer = None
    self.last_logged = 0

  @property
  def active(self) -> bool:
    return self.failed is None and self.step < self.schedule.total_steps


class Trainer:
  """Trains and evaluates the categories of one config; see ``train_and_evaluate``."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    from data_pipelines import input_pipeline  # pylint: disable=g-import-not-at-top

    self.config = config
    self.workdir = ensure_workdir(workdir)
    if config.thresholds.source not in ("val", "test"):
      raise ValueError(f"config.thresholds.source={config.thresholds.source!r}: use 'val' "
                       "(held-out normal training images) or 'test'.")
    if config.thresholds.source == "val" and not float(config.data.val_fraction) > 0:
      raise ValueError("config.thresholds.source='val' needs config.data.val_fraction > 0 "
                       "(or set config.thresholds.source='test').")
    self.method = methods.build_method(config)
    categories = input_pipeline.resolve_categories(config.data)
    # Reading and checking every category first: bad data fail before any training.
    datas = [input_pipeline.make_category_data(config.data, c) for c in categories]
    self.teacher_vars = teachers.load_teacher_variables(
        config.model.teacher, config.model.teacher_weights,
        image_size=int(config.data.image_size), seed=int(config.seed))
    self.mesh = parallel.make_mesh(len(categories), int(config.parallel.data_axis_size))
    self.num_slots = parallel.num_slots(len(categories), self.mesh)
    self.runs = [CategoryRun(i, c, d, make_schedule(config.train, c, d.num_train,
                                                    self.method.default_num_steps(c)),
                             self.workdir)
                 for i, (c, d) in enumerate(zip(categories, datas))]
    hparams = _flatten(config_to_json(config))
    for run in self.runs:
      run.writer = metric_writers.create_default_writer(
          self.workdir, just_logging=jax.process_index() > 0, collection=run.category)
      run.writer.write_hparams(hparams)
    self.base_key = jax.random.PRNGKey(int(config.seed))
    self.eval_step = train.jitted_eval_step(self.method)

  # -- state ---------------------------------------------------------------

  def initial_states(self) -> list[Any]:
    """Each category's state: restored from its latest checkpoint, else fresh.

    Every category starts from the same seed, as the official per-class scripts
    do, so a category's run does not depend on its slot.
    """
    fresh = jax.jit(self.method.init)(self.base_key, self.teacher_vars)
    abstract = jax.eval_shape(lambda: fresh)
    states = []
    for run in self.runs:
      restored = checkpoints.restore(run.manager, abstract)
      if restored is None:
        states.append(fresh)
        continue
      state, meta = restored
      run.step = int(state.step)
      run.train_seconds = float(meta.get("train_seconds", 0.0))
      logging.info("[%s] resumed from step %d of %d", run.category, run.step,
                   run.schedule.total_steps)
      states.append(state)
    states += [fresh] * (self.num_slots - len(states))
    return states

  def meta(self, run: CategoryRun, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"category": run.category, "step": run.step,
            "total_steps": run.schedule.total_steps, "epochs": run.schedule.epochs,
            "train_seconds": run.train_seconds, "image_size": int(self.config.data.image_size),
            "method": self.method.describe(), "config": config_to_json(self.config),
            **(extra or {})}

  # -- evaluation ----------------------------------------------------------

  def evaluate(self, run: CategoryRun, state: Any, final: bool) -> dict[str, Any]:
    """Test metrics (+ thresholds, pictures, final checkpoint when ``final``)."""
    cfg = self.config
    eval_fn = lambda images: self.eval_step(state, self.teacher_vars, images, self.base_key)  # pylint: disable=unnecessary-lambda-assignment
    bs = int(cfg.eval.batch_size)
    t0 = time.time()
    test = evaluate.predict(eval_fn, run.data.eval_batches("test", bs), run.data.has_masks,
                            keep_images=True)
    if cfg.thresholds.source == "val":
      val = evaluate.predict(eval_fn, run.data.eval_batches("val", bs), has_masks=False)
    else:
      val = test
    thr = evaluate.choose_thresholds(val, float(cfg.thresholds.normal_quantile))
    thr["source"] = cfg.thresholds.source
    m = evaluate.compute_metrics(test, float(cfg.eval.fpr_limit))
    m.update(evaluate.threshold_metrics(test, thr))
    eval_seconds = time.time() - t0
    run.writer.write_scalars(run.step, {f"eval/{k}": v for k, v in m.items()
                                        if isinstance(v, float) and math.isfinite(v)})
    run.writer.write_scalars(run.step, {"eval/seconds": eval_seconds})
    n_pics = int(cfg.eval.tensorboard_pictures)
    if n_pics:
      run.writer.write_images(run.step, {"eval/heatmaps": evaluate.picture_grid(test, thr, n_pics)[None]})
    if final:
      write_test_predictions(test, thr, os.path.join(self.workdir, run.category,
                                                     "test_predictions.csv"))
      if cfg.eval.save_pictures:
        evaluate.save_pictures(test, thr, os.path.join(self.workdir, run.category, "images", "test"))
      checkpoints.save(run.manager, run.step, state,
                       self.meta(run, {"final": True, "thresholds": thr, "metrics": m}))
    run.writer.flush()
    logging.info("[%s] step %d: %s", run.category, run.step,
                 ", ".join(f"{k}={m[k]:.4f}" for k in RESULT_METRICS if k in m))
    return m

  def baseline_metrics(self, run: CategoryRun) -> dict[str, float]:
    """The colour-statistics baseline on the same split (no learning involved)."""
    from skrd4ad_jax import baseline  # pylint: disable=g-import-not-at-top
    bs = int(self.config.eval.batch_size)
    identity = lambda images: (np.zeros(images.shape[:3], np.float32),  # pylint: disable=unnecessary-lambda-assignment
                               np.zeros(images.shape[:1], np.float32))
    train = evaluate.predict(identity, run.data.eval_batches("train", bs), False, True)
    test = evaluate.predict(identity, run.data.eval_batches("test", bs), run.data.has_masks,
                            True)
    test.maps = baseline.colour_statistics_baseline(train.images, test.images)
    test.scores = test.maps.reshape(len(test), -1).max(-1)
    m = evaluate.compute_metrics(test, float(self.config.eval.fpr_limit))
    return {f"baseline_{k}": m[k] for k in ("image_auroc", "pixel_auroc", "pixel_aupro")}

  def finish(self, run: CategoryRun, state: Any) -> None:
    m = self.evaluate(run, state, final=True)
    if self.config.eval.get("baseline", False):
      m.update(self.baseline_metrics(run))
    images = run.step * int(self.config.train.batch_size)
    run.row = {"category": run.category, **{k: m.get(k, float("nan")) for k in RESULT_METRICS},
               "image_f1_at_threshold": m["image_f1_at_threshold"],
               "image_precision": m["image_precision"], "image_recall": m["image_recall"],
               **{k: v for k, v in m.items() if k.startswith("baseline_")},
               "train_seconds": run.train_seconds,
               "train_images_per_second": images / run.train_seconds if run.train_seconds else
               float("nan")}

  # -- training ------------------------------------------------------------

  def cached_feature_batches(self, run: CategoryRun, batch_size: int, seed: int):
    """Endless batches of precomputed teacher features of the training images.

    Without input augmentation the frozen teacher's features of a training image
    never change, so they are computed once instead of every epoch (the numbers
    are identical). Each epoch is a fresh permutation; batches are always full.
    """
    teacher_fn = jax.jit(self.method.teacher_features)
    feats = [[], [], []]
    for batch in run.data.eval_batches("train", int(self.config.eval.batch_size)):
      valid = np.asarray(batch["valid"], bool)
      for level, f in enumerate(teacher_fn(self.teacher_vars, batch["image"])):
        feats[level].append(np.asarray(f)[valid])
    feats = [np.concatenate(f) for f in feats]
    n = len(feats[0])
    epoch, order = 0, np.empty(0, np.int64)
    while True:
      while len(order) < batch_size:
        order = np.concatenate([order, np.random.default_rng((seed, epoch)).permutation(n)])
        epoch += 1
      idx, order = order[:batch_size], order[batch_size:]
      yield {f"feature{level + 1}": f[idx] for level, f in enumerate(feats)}

  def batch_rng(self, run: CategoryRun) -> np.random.Generator:
    """Host RNG for synthetic anomalies: a function of (seed, category, step) only."""
    return np.random.default_rng((int(self.config.seed), zlib.crc32(run.category.encode()),
                                  run.step))

  def next_batch(self) -> dict[str, np.ndarray]:
    """[K, B, ...] stacked host batch; inactive slots get zeros."""
    per_slot: list[dict[str, np.ndarray] | None] = [None] * self.num_slots
    for run in self.runs:
      if run.active:
        item = next(run.iterator)
        per_slot[run.slot] = item if isinstance(item, dict) else self.method.make_batch(
            item, self.batch_rng(run), run.category)
    template = next(b for b in per_slot if b is not None)
    filled = [b if b is not None else {k: np.zeros_like(v) for k, v in template.items()}
              for b in per_slot]
    return {k: np.stack([b[k] for b in filled]) for k in template}

  def run(self) -> list[dict[str, Any]]:
    cfg = self.config
    bs = int(cfg.train.batch_size)
    stacked = parallel.put_stacked(parallel.stack(self.initial_states()), self.mesh)
    teacher_vars = parallel.put_replicated(self.teacher_vars, self.mesh)
    p_step = parallel.make_parallel_train_step(
        self.method, self.mesh, cfg.parallel.get("category_loop", "auto"))
    use_cache = bool(cfg.train.get("cache_teacher_features", False))
    if use_cache and not self.method.supports_feature_cache:
      raise ValueError(f"config.train.cache_teacher_features needs a method without input "
                       f"augmentation; {self.method.name} augments its inputs.")
    for run in self.runs:
      # Resumed runs continue with a fresh shuffle seeded by their step.
      seed = int(cfg.data.shuffle_seed) + run.step
      run.iterator = (self.cached_feature_batches(run, bs, seed) if use_cache and run.active
                      else run.data.train_batches(bs, seed=seed))
      run.last_logged = run.step
    # Categories restored at their final step are only evaluated again.
    for run in self.runs:
      if not run.active:
        self.finish(run, parallel.unstack(stacked, run.slot))
    log_every = max(1, int(cfg.train.log_every_steps))
    console_t, console_steps, loop_steps = time.time(), 0, 0
    while any(r.active for r in self.runs):
      active = np.array([i < len(self.runs) and self.runs[i].active
                         for i in range(self.num_slots)])
      batch = parallel.put_batch(self.next_batch(), self.mesh)
      t0 = time.time()
      stacked, metrics = p_step(stacked, teacher_vars, batch, self.base_key, active)
      stepped = [r for r in self.runs if r.active]
      boundary = [r for r in stepped if self._is_boundary(r.step + 1, r.schedule, log_every)]
      host_metrics = jax.device_get(metrics) if boundary else None  # waits for the step
      dt = time.time() - t0  # without a boundary: dispatch only; the wait lands later
      loop_steps += 1
      for run in stepped:
        run.step += 1
        run.train_seconds += dt
      for run in boundary:
        self._on_boundary(run, stacked, host_metrics)
      if boundary and any(r.active for r in self.runs):
        sec_per_step = (time.time() - console_t) / max(1, loop_steps - console_steps)
        console_t, console_steps = time.time(), loop_steps
        left = max(r.schedule.total_steps - r.step for r in self.runs if r.active)
        logging.info("steps %s | %.2f s/step | ETA %.0f s", " ".join(
            f"{r.category}:{r.step}/{r.schedule.total_steps}" for r in self.runs),
                     sec_per_step, left * sec_per_step)
    return self.write_results()

  @staticmethod
  def _is_boundary(step: int, s: Schedule, log_every: int) -> bool:
    return (step % log_every == 0 or step == s.total_steps
            or (s.eval_every and step % s.eval_every == 0)
            or (s.checkpoint_every and step % s.checkpoint_every == 0))

  def _on_boundary(self, run: CategoryRun, stacked: Any, host_metrics: dict) -> None:
    s = run.schedule
    scalars = {f"train/{k}": float(v[run.slot]) for k, v in host_metrics.items()}
    epoch = run.step / s.steps_per_epoch
    scalars.update({"train/epoch": epoch,
                    "train/images_per_second": run.step * int(self.config.train.batch_size)
                                               / max(run.train_seconds, 1e-9)})
    run.writer.write_scalars(run.step, scalars)
    try:
      train.check_finite({k: v for k, v in scalars.items() if k.startswith("train/loss")},
                         run.last_logged + 1, run.step, run.category)
    except FloatingPointError as e:
      # The other categories go on; this one keeps its last checkpoint.
      run.failed = str(e)
      logging.error("%s", e)
      return
    run.last_logged = run.step
    if run.step == s.total_steps:
      self.finish(run, parallel.unstack(stacked, run.slot))
      return
    if s.checkpoint_every and run.step % s.checkpoint_every == 0:
      checkpoints.save(run.manager, run.step, parallel.unstack(stacked, run.slot),
                       self.meta(run, {"final": False}))
    if s.eval_every and run.step % s.eval_every == 0:
      self.evaluate(run, parallel.unstack(stacked, run.slot), final=False)

  # -- results -------------------------------------------------------------

  def write_results(self) -> list[dict[str, Any]]:
    cfg = self.config
    rows = []
    for run in self.runs:
      if run.row is not None:
        rows.append(run.row)
      else:
        rows.append({"category": run.category, "status": f"failed: {run.failed}"})
    notes = [
        f"method: {self.method.name}; teacher: {cfg.model.teacher} "
        f"(weights: {cfg.model.teacher_weights or 'default'}); image size {cfg.data.image_size}.",
        "Our metrics are those of the last training step on the test set; no checkpoint "
        "or epoch was selected on the test set.",
        "pixel_aupro: pooled MVTec/anomalib protocol (FPR <= 0.3). pixel_aupro_rd4ad: "
        "the RD4AD-family per-image average (what the papers report).",
        f"Thresholds chosen on: {'held-out normal training images' if cfg.thresholds.source == 'val' else 'the test set (optimistic, as the peers do)'}.",
    ]
    notes += self.method.notes()
    if self.num_slots > 1 and len(self.runs) > 1:
      notes.append("Categories trained in parallel: train_seconds is the shared wall time of "
                   "the steps each category took part in.")
    good = [r for r in rows if "status" not in r]
    if good:
      results_lib.write_results_table(good, self.workdir, dataset=cfg.data.dataset, notes=notes)
      print(results_lib.format_console_table(good, dataset=cfg.data.dataset))
    for run in self.runs:
      run.writer.close()
    failed = [r for r in self.runs if r.failed]
    if failed:
      raise RuntimeError("Training failed for " + "; ".join(
          f"{r.category}: {r.failed}" for r in failed) + ". Results of the other categories "
          f"are in {self.workdir}/results.md.")
    return rows


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
  """Trains and evaluates every category of ``config``; writes everything to ``workdir``.

  Args:
    config: a config from ``configs/``.
    workdir: where checkpoints, TensorBoard runs, pictures and results go.

  Returns:
    One results row per category (the rows of ``results.csv`` without the mean).
  """
  return Trainer(config, workdir).run()
