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
from typing import Any
import zlib

from absl import logging
import jax
import ml_collections
import numpy as np

from skrd4ad_jax import config as config_lib
from skrd4ad_jax import methods, teachers
from skrd4ad_jax.evaluation import evaluate
from skrd4ad_jax.evaluation import results as results_lib
from skrd4ad_jax.training import checkpoints, parallel, train

RESULT_METRICS = (
  "image_auroc",
  "pixel_auroc",
  "pixel_aupro",
  "pixel_aupro_rd4ad",
  "image_f1max",
  "pixel_ap",
)


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


def make_schedule(train_cfg, category: str, num_train: int, default_num_steps: int = 0) -> Schedule:
  """Epochs (or a fixed step count) over the category's own training set.

  Args:
    train_cfg: ``config.train``.
    category: the category's name (for per-category overrides).
    num_train: its number of training images.
    default_num_steps: the method's own step budget (RD with Expert counts
      iterations, not epochs); used when ``config.train.num_steps`` is 0.
  """
  steps_per_epoch = max(1, math.ceil(num_train / int(train_cfg.batch_size)))
  epochs = parse_category_values(train_cfg.category_epochs, "config.train.category_epochs").get(
    category, int(train_cfg.epochs)
  )
  total = epochs * steps_per_epoch
  num_steps = int(train_cfg.get("num_steps", 0)) or int(default_num_steps)
  if num_steps > 0:
    total = num_steps
    epochs = math.ceil(num_steps / steps_per_epoch)
  return Schedule(
    epochs=epochs,
    steps_per_epoch=steps_per_epoch,
    total_steps=total,
    eval_every=int(train_cfg.eval_every_epochs) * steps_per_epoch,
    checkpoint_every=int(train_cfg.checkpoint_every_epochs) * steps_per_epoch,
  )


def ensure_workdir(workdir: str) -> str:
  """Creates ``workdir`` and proves it is writable, or says how to fix it."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  try:
    os.makedirs(workdir, exist_ok=True)
    # One probe per process: several processes may share the workdir.
    probe = os.path.join(workdir, f".write_test.{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise OSError(
      f"Cannot write to the workdir {workdir!r} ({e.strerror}). Choose another "
      "directory with --workdir=DIR or fix its permissions."
    ) from e
  return workdir


def write_test_predictions(pred: evaluate.Predictions, thr: dict[str, Any], path: str) -> None:
  """Per-image test results: raw and normalised scores, OK/NG at the stored threshold."""
  norm_scores, _ = evaluate.normalized(pred, thr)
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(
      ["image_path", "defect_type", "gt_label", "pred_score_raw", "pred_score", "pred_label"]
    )
    for i in range(len(pred)):
      # The decision is on the raw score, as in predict and threshold_metrics.
      label = (
        ""
        if not math.isfinite(thr["image_threshold"])
        else "NG"
        if pred.scores[i] >= thr["image_threshold"]
        else "OK"
      )
      w.writerow(
        [
          pred.paths[i],
          pred.defect_types[i],
          int(pred.labels[i]),
          repr(float(pred.scores[i])),
          repr(float(norm_scores[i])),
          label,
        ]
      )


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

  def __init__(self, slot: int, category: str, data, schedule: Schedule):
    self.slot = slot
    self.category = category
    self.data = data
    self.schedule = schedule
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
    from clu import metric_writers

    from skrd4ad_jax.data import input_pipeline

    # What the run uses and stores: settings left to the teacher are filled in.
    config = config_lib.resolve(config)
    self.config = config
    self.workdir = ensure_workdir(workdir)
    if config.thresholds.source not in ("val", "test"):
      raise ValueError(
        f"config.thresholds.source={config.thresholds.source!r}: use 'val' "
        "(held-out normal training images) or 'test'."
      )
    if config.thresholds.source == "val" and not float(config.data.val_fraction) > 0:
      raise ValueError(
        "config.thresholds.source='val' needs config.data.val_fraction > 0 "
        "(or set config.thresholds.source='test')."
      )
    self.method = methods.build_method(config)
    categories = input_pipeline.resolve_categories(config.data)
    self.mesh = parallel.make_mesh(len(categories), int(config.parallel.data_axis_size))
    self.num_slots = parallel.num_slots(len(categories), self.mesh)
    # With several processes each one reads, trains, evaluates and writes only the
    # categories whose slots live on its devices.
    local = set(parallel.local_slots(self.num_slots, self.mesh))
    self.categories = list(categories)
    mine = [(i, c) for i, c in enumerate(categories) if i in local]
    logging.info(
      "process %d/%d trains %s (slots %s of %d)",
      jax.process_index(),
      jax.process_count(),
      ", ".join(c for _, c in mine) or "no category",
      [i for i, _ in mine],
      self.num_slots,
    )
    # Reading and checking every category first: bad data fail before any training.
    datas = [input_pipeline.make_category_data(config.data, c) for _, c in mine]
    self.teacher_vars = teachers.load_teacher_variables(
      config.model.teacher,
      config.model.teacher_weights,
      image_size=int(config.data.image_size),
      seed=int(config.seed),
    )
    self.runs = [
      CategoryRun(
        i, c, d, make_schedule(config.train, c, d.num_train, self.method.default_num_steps(c))
      )
      for (i, c), d in zip(mine, datas)
    ]
    self.local_runs = {run.category: run for run in self.runs}
    # Checkpoints are collective (every process opens every category's manager);
    # a category's state lives on, and is written by, the process that owns its slot.
    self.slot_shardings = {
      c: parallel.slot_sharding(self.num_slots, self.mesh, i) for i, c in enumerate(categories)
    }
    self.managers = {
      c: checkpoints.make_manager(
        self.workdir, c, owner=parallel.slot_owner(self.num_slots, self.mesh, i)
      )
      for i, c in enumerate(categories)
    }
    hparams = _flatten(config_to_json(config))
    for run in self.runs:
      run.writer = metric_writers.create_default_writer(self.workdir, collection=run.category)
      run.writer.write_hparams(hparams)
    self.base_key = jax.random.PRNGKey(int(config.seed))
    self.eval_step = train.jitted_eval_step(self.method)

  # -- state ---------------------------------------------------------------

  def initial_states(self) -> tuple[dict[int, Any], Any]:
    """({slot: state} of this process's categories, the fresh state).

    A category's state is restored from its latest checkpoint, else fresh. Every
    category starts from the same seed, as the official per-class scripts do, so
    a category's run does not depend on its slot; padded slots hold the fresh
    state.
    """
    fresh = jax.jit(self.method.init)(self.base_key, self.teacher_vars)
    abstract = jax.eval_shape(lambda: fresh)
    states = {}
    for slot, category in enumerate(self.categories):  # collective restores
      target = jax.tree.map(
        lambda x, sh=self.slot_shardings[category]: jax.ShapeDtypeStruct(
          x.shape, x.dtype, sharding=sh
        ),
        abstract,
      )
      restored = checkpoints.restore(self.managers[category], target)
      run = self.local_runs.get(category)
      if run is None:
        continue
      if restored is None:
        states[slot] = fresh
        continue
      state, meta = restored
      # This process's copy (the state lives on its device; see parallel.slot_sharding).
      state = jax.tree.map(lambda x: x.addressable_data(0), state)
      run.step = int(meta["step"])
      run.train_seconds = float(meta.get("train_seconds", 0.0))
      logging.info(
        "[%s] resumed from step %d of %d", run.category, run.step, run.schedule.total_steps
      )
      states[slot] = state
    return states, fresh

  def meta(self, run: CategoryRun, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
      "category": run.category,
      "step": run.step,
      "total_steps": run.schedule.total_steps,
      "epochs": run.schedule.epochs,
      "train_seconds": run.train_seconds,
      "image_size": int(self.config.data.image_size),
      "method": self.method.describe(),
      "config": config_to_json(self.config),
      **(extra or {}),
    }

  # -- evaluation ----------------------------------------------------------

  def evaluate(
    self, run: CategoryRun, state: Any, final: bool
  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(test metrics, thresholds); when ``final`` also per-image csv and pictures."""
    cfg = self.config
    eval_fn = lambda images: self.eval_step(state, self.teacher_vars, images, self.base_key)
    bs = int(cfg.eval.batch_size)
    t0 = time.time()
    test = evaluate.predict(
      eval_fn, run.data.eval_batches("test", bs), run.data.has_masks, keep_images=True
    )
    if cfg.thresholds.source == "val":
      val = evaluate.predict(eval_fn, run.data.eval_batches("val", bs), has_masks=False)
    else:
      val = test
    thr = evaluate.choose_thresholds(val, float(cfg.thresholds.normal_quantile))
    thr["source"] = cfg.thresholds.source
    m = evaluate.compute_metrics(test, float(cfg.eval.fpr_limit))
    m.update(evaluate.threshold_metrics(test, thr))
    eval_seconds = time.time() - t0
    run.writer.write_scalars(
      run.step, {f"eval/{k}": v for k, v in m.items() if isinstance(v, float) and math.isfinite(v)}
    )
    run.writer.write_scalars(run.step, {"eval/seconds": eval_seconds})
    n_pics = int(cfg.eval.tensorboard_pictures)
    if n_pics:
      run.writer.write_images(
        run.step, {"eval/heatmaps": evaluate.picture_grid(test, thr, n_pics)[None]}
      )
    if final:
      write_test_predictions(
        test, thr, os.path.join(self.workdir, run.category, "test_predictions.csv")
      )
      if cfg.eval.save_pictures:
        evaluate.save_pictures(
          test, thr, os.path.join(self.workdir, run.category, "images", "test")
        )
    run.writer.flush()
    logging.info(
      "[%s] step %d: %s",
      run.category,
      run.step,
      ", ".join(f"{k}={m[k]:.4f}" for k in RESULT_METRICS if k in m),
    )
    return m, thr

  def baseline_metrics(self, run: CategoryRun) -> dict[str, float]:
    """The colour-statistics baseline on the same split (no learning involved)."""
    from skrd4ad_jax.evaluation import baseline

    bs = int(self.config.eval.batch_size)
    identity = lambda images: (
      np.zeros(images.shape[:3], np.float32),
      np.zeros(images.shape[:1], np.float32),
    )
    train = evaluate.predict(identity, run.data.eval_batches("train", bs), False, True)
    test = evaluate.predict(identity, run.data.eval_batches("test", bs), run.data.has_masks, True)
    test.maps = baseline.colour_statistics_baseline(train.images, test.images)
    test.scores = test.maps.reshape(len(test), -1).max(-1)
    m = evaluate.compute_metrics(test, float(self.config.eval.fpr_limit))
    return {f"baseline_{k}": m[k] for k in ("image_auroc", "pixel_auroc", "pixel_aupro")}

  def save(self, category: str, step: int, stacked: Any, final: bool) -> None:
    """Checkpoints ``category`` (collective: every process calls it at the same step).

    The owner evaluates first when ``final`` (metrics and thresholds go into the
    JSON item); the other processes only take part in the write.
    """
    run = self.local_runs.get(category)
    meta = {}
    if run is not None:
      extra = {"final": final}
      if final:
        m, thr = self.finish(run, parallel.local_slot(stacked, run.slot))
        extra.update(thresholds=thr, metrics=m)
      meta = self.meta(run, extra)
    slot = self.categories.index(category)
    checkpoints.save(
      self.managers[category],
      step,
      parallel.slot_state(stacked, slot, self.slot_shardings[category]),
      meta,
    )

  def finish(self, run: CategoryRun, state: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The final evaluation and results row; returns (metrics, thresholds)."""
    m, thr = self.evaluate(run, state, final=True)
    metrics = dict(m)
    if self.config.eval.get("baseline", False):
      m.update(self.baseline_metrics(run))
    images = run.step * int(self.config.train.batch_size)
    run.row = {
      "category": run.category,
      **{k: m.get(k, float("nan")) for k in RESULT_METRICS},
      "image_f1_at_threshold": m["image_f1_at_threshold"],
      "image_precision": m["image_precision"],
      "image_recall": m["image_recall"],
      **{k: v for k, v in m.items() if k.startswith("baseline_")},
      "train_seconds": run.train_seconds,
      "train_images_per_second": images / run.train_seconds if run.train_seconds else float("nan"),
    }
    return metrics, thr

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
    return np.random.default_rng(
      (int(self.config.seed), zlib.crc32(run.category.encode()), run.step)
    )

  def batch_template(self, use_cache: bool) -> dict[str, np.ndarray]:
    """Zeros shaped like one category's training batch (the same on every process)."""
    bs, size = int(self.config.train.batch_size), int(self.config.data.image_size)
    images = np.zeros((bs, size, size, 3), np.float32)
    if use_cache:
      shapes = jax.eval_shape(self.method.teacher_features, self.teacher_vars, images)
      return {f"feature{level + 1}": np.zeros(s.shape, s.dtype) for level, s in enumerate(shapes)}
    batch = self.method.make_batch(images, np.random.default_rng(0), "")
    return {k: np.zeros_like(v) for k, v in batch.items()}

  def next_batch(self) -> dict[int, dict[str, np.ndarray]]:
    """{slot: batch} of this process's active categories."""
    per_slot = {}
    for run in self.runs:
      if run.active:
        item = next(run.iterator)
        per_slot[run.slot] = (
          item
          if isinstance(item, dict)
          else self.method.make_batch(item, self.batch_rng(run), run.category)
        )
    return per_slot

  def run(self) -> list[dict[str, Any]]:
    cfg = self.config
    bs = int(cfg.train.batch_size)
    states, fresh = self.initial_states()
    stacked = parallel.global_stacked(states, fresh, self.num_slots, self.mesh)
    del states
    teacher_vars = parallel.put_replicated(self.teacher_vars, self.mesh)
    base_key = parallel.put_replicated(self.base_key, self.mesh)
    p_step = parallel.make_parallel_train_step(
      self.method, self.mesh, cfg.parallel.get("category_loop", "auto")
    )
    use_cache = bool(cfg.train.get("cache_teacher_features", False))
    if use_cache and not self.method.supports_feature_cache:
      raise ValueError(
        f"config.train.cache_teacher_features needs a method without input "
        f"augmentation; {self.method.name} augments its inputs."
      )
    template = self.batch_template(use_cache)
    for run in self.runs:
      # Resumed runs continue with a fresh shuffle seeded by their step.
      seed = int(cfg.data.shuffle_seed) + run.step
      run.iterator = (
        self.cached_feature_batches(run, bs, seed)
        if use_cache and run.active
        else run.data.train_batches(bs, seed=seed)
      )
      run.last_logged = run.step
    # Every process follows every category's schedule: checkpoints are collective.
    gathered = {
      c: v
      for rows in parallel.allgather_json(
        {r.category: [dataclasses.asdict(r.schedule), r.step] for r in self.runs}
      )
      for c, v in rows.items()
    }
    schedules = {c: Schedule(**sched) for c, (sched, _) in gathered.items()}
    steps = {c: step for c, (_, step) in gathered.items()}
    failed: set[str] = set()
    # Categories restored at their final step are only evaluated again.
    for c in self.categories:
      if steps[c] >= schedules[c].total_steps:
        self.save(c, steps[c], stacked, final=True)
    # Every process runs the program as often as the longest schedule of the run needs.
    iterations = max((sched.total_steps - steps[c] for c, sched in schedules.items()), default=0)
    log_every = max(1, int(cfg.train.log_every_steps))
    console_t, console_steps, loop_steps = time.time(), 0, 0
    for _ in range(iterations):
      stepping = [
        c for c in self.categories if c not in failed and steps[c] < schedules[c].total_steps
      ]
      if not stepping:
        break  # e.g. the longest category stopped on a NaN loss
      active = parallel.global_stacked(
        {r.slot: np.bool_(r.active) for r in self.runs}, np.bool_(False), self.num_slots, self.mesh
      )
      batch = parallel.global_batch(self.next_batch(), template, self.num_slots, self.mesh)
      t0 = time.time()
      stacked, metrics = p_step(stacked, teacher_vars, batch, base_key, active)
      for c in stepping:
        steps[c] += 1
      events = [c for c in stepping if self._is_boundary(steps[c], schedules[c], log_every)]
      local_events = [self.local_runs[c] for c in events if c in self.local_runs]
      # Reading the metrics waits for the step.
      host_metrics = (
        {k: parallel.slot_values(v) for k, v in metrics.items()} if local_events else None
      )
      dt = time.time() - t0  # without a boundary: dispatch only; the wait lands later
      loop_steps += 1
      for run in self.runs:
        if run.category in stepping:
          run.step += 1
          run.train_seconds += dt
      if not events:
        continue
      for run in local_events:
        self._on_boundary(run, stacked, host_metrics)
      # Which categories stopped on a NaN loss: every process must know (collective).
      failed.update(
        c for cs in parallel.allgather_json([r.category for r in self.runs if r.failed]) for c in cs
      )
      for c in events:
        sched = schedules[c]
        if c in failed:
          continue
        if steps[c] == sched.total_steps:
          self.save(c, steps[c], stacked, final=True)
        elif sched.checkpoint_every and steps[c] % sched.checkpoint_every == 0:
          self.save(c, steps[c], stacked, final=False)
      if local_events and any(r.active for r in self.runs):
        sec_per_step = (time.time() - console_t) / max(1, loop_steps - console_steps)
        console_t, console_steps = time.time(), loop_steps
        left = max(r.schedule.total_steps - r.step for r in self.runs if r.active)
        logging.info(
          "steps %s | %.2f s/step | ETA %.0f s",
          " ".join(f"{r.category}:{r.step}/{r.schedule.total_steps}" for r in self.runs),
          sec_per_step,
          left * sec_per_step,
        )
    return self.write_results()

  @staticmethod
  def _is_boundary(step: int, s: Schedule, log_every: int) -> bool:
    return (
      step % log_every == 0
      or step == s.total_steps
      or (s.eval_every and step % s.eval_every == 0)
      or (s.checkpoint_every and step % s.checkpoint_every == 0)
    )

  def _on_boundary(self, run: CategoryRun, stacked: Any, host_metrics: dict) -> None:
    """Logs the category's training scalars, checks the loss, evaluates when due."""
    s = run.schedule
    scalars = {f"train/{k}": float(v[run.slot]) for k, v in host_metrics.items()}
    epoch = run.step / s.steps_per_epoch
    scalars.update(
      {
        "train/epoch": epoch,
        "train/images_per_second": run.step
        * int(self.config.train.batch_size)
        / max(run.train_seconds, 1e-9),
      }
    )
    run.writer.write_scalars(run.step, scalars)
    try:
      train.check_finite(
        {k: v for k, v in scalars.items() if k.startswith("train/loss")},
        run.last_logged + 1,
        run.step,
        run.category,
      )
    except FloatingPointError as e:
      # The other categories go on; this one keeps its last checkpoint.
      run.failed = str(e)
      logging.error("%s", e)
      return
    run.last_logged = run.step
    if s.eval_every and run.step % s.eval_every == 0 and run.step < s.total_steps:
      self.evaluate(run, parallel.local_slot(stacked, run.slot), final=False)

  # -- results -------------------------------------------------------------

  def write_results(self) -> list[dict[str, Any]]:
    """results.csv / results.md of every category (gathered from all processes)."""
    cfg = self.config
    local = []
    for run in self.runs:
      if run.row is not None:
        local.append(run.row)
      else:
        local.append({"category": run.category, "status": f"failed: {run.failed}"})
    by_category = {r["category"]: r for rows in parallel.allgather_json(local) for r in rows}
    rows = [by_category[c] for c in self.categories if c in by_category]
    described = self.method.describe()
    # RD-style distillation losses (RD4AD, SK-RD4AD, MRKD); URD has its own.
    loss_note = (
      f"Loss: {described['loss']} (official code: flat_cosine); " if "loss" in described else ""
    )
    map_kwargs = self.method.map_kwargs
    notes = [
      f"method: {self.method.name}; teacher: {cfg.model.teacher} "
      f"(weights: {cfg.model.teacher_weights or 'default'}); image size {cfg.data.image_size}.",
      loss_note
      + ("anomaly map" if loss_note else "Anomaly map")
      + f": {map_kwargs['mode']} of levels {map_kwargs['levels']} (official: (1, 2, 3)), "
      f"Gaussian sigma {map_kwargs['sigma']:g}.",
      *(
        [
          "Recipe settings that differ from the official code: "
          + "; ".join(config_lib.teacher_recipe_notes(cfg))
          + "."
        ]
        if config_lib.teacher_recipe_notes(cfg)
        else []
      ),
      "Our metrics are those of the last training step on the test set; no checkpoint "
      "or epoch was selected on the test set.",
      "pixel_aupro: pooled MVTec/anomalib protocol (FPR <= 0.3). pixel_aupro_rd4ad: "
      "the RD4AD-family per-image average (what the papers report).",
      "Thresholds chosen on: "
      + (
        "held-out normal training images."
        if cfg.thresholds.source == "val"
        else "the test set (optimistic, as the peers do)."
      ),
    ]
    notes += self.method.notes()
    if self.num_slots > 1 and len(self.categories) > 1:
      notes.append(
        "Categories trained in parallel: train_seconds is the shared wall time of "
        "the steps each category took part in."
      )
    good = [r for r in rows if "status" not in r]
    if good and jax.process_index() == 0:
      results_lib.write_results_table(good, self.workdir, dataset=cfg.data.dataset, notes=notes)
      print(results_lib.format_console_table(good, dataset=cfg.data.dataset))
    for run in self.runs:
      run.writer.close()
    failed = [r for r in rows if "status" in r]
    if failed:
      raise RuntimeError(
        "Training failed for "
        + "; ".join(f"{r['category']}: {r['status'][len('failed: ') :]}" for r in failed)
        + f". Results of the other categories are in {self.workdir}/results.md."
      )
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
