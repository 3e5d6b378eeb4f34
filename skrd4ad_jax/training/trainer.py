"""``train_and_evaluate``: every job of a config (categories x seeds) on the device slots.

A *job* is one category trained with one seed (``config.train.seeds`` of them
per category; seed k uses ``config.seed + k`` for initialisation, shuffling and
augmentation). The mesh offers a fixed number of *slots*; ``schedule.plan_slots``
lays the jobs out on them so that no slot idles while others still train, and
one jitted step advances every slot by one step of the job it holds
(``parallel.py``). A job's numbers are a function of its seed, category and
step only: they do not depend on the slot, on which jobs share the run, or on
where a run was interrupted and resumed. Evaluation, thresholds, checkpoints,
TensorBoard runs and pictures stay per job, under ``<workdir>/<category>`` for
seed 0 and ``<workdir>/<category>/seed_<k>`` for seed k.

The host side keeps the device busy: images are decoded once into memory
before training (every split, so a bad file stops the run before the first
step), the next steps' batches are made by worker threads while the device
computes (``batches.Prefetcher``), and with one process the host part of an
evaluation (metrics, pictures, checkpoint writing) runs in a background thread
while the other slots go on training.

SIGTERM or SIGINT during training writes a checkpoint of every job in a slot at
its current step and raises ``Preempted``; rerunning the same command resumes
every job where it was.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent import futures
import csv
import dataclasses
import json
import math
import os
import signal
import threading
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from skrd4ad_jax import config as config_lib
from skrd4ad_jax import errors, faults, methods, teachers
from skrd4ad_jax.evaluation import evaluate
from skrd4ad_jax.evaluation import results as results_lib
from skrd4ad_jax.teachers import recipe
from skrd4ad_jax.training import batches as batches_lib
from skrd4ad_jax.training import checkpoints, memory, parallel, preflight, schedule, steps

RESULT_METRICS = results_lib.METRIC_COLUMNS
# Metrics whose best value over the periodic evaluations is reported, apart and
# labelled, as the test-selected (optimistic) figure some papers report.
SELECTED_METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro", "pixel_aupro_rd4ad")
# Batches made ahead per slot.
PREFETCH_STEPS = 2
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(RuntimeError):
  """Training stopped on a signal after checkpointing every job in a slot."""

  def __init__(self, signum: int, message: str):
    super().__init__(message)
    self.signum = signum


@dataclasses.dataclass
class Job:
  """Host-side bookkeeping of one (category, seed) job; every process keeps every job."""

  name: str
  category: str
  seed_index: int
  seed: int
  schedule: schedule.Schedule
  step: int = 0
  train_seconds: float = 0.0
  failed: str | None = None
  row: dict[str, Any] | None = None
  best: dict[str, float] = dataclasses.field(default_factory=dict)
  last_logged: int = 0
  has_checkpoint: bool = False
  kept_meta: dict[str, Any] = dataclasses.field(default_factory=dict)
  writer: Any = None
  input: batches_lib.JobInput | None = None

  @property
  def total_steps(self) -> int:
    return self.schedule.total_steps

  @property
  def done(self) -> bool:
    return self.step >= self.total_steps


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
  faults.point("test_predictions_csv", path=path)  # [ckpt]
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


class LoggingWriter:
  """Scalars to the log when clu's TensorBoard writer cannot be had (no TensorFlow)."""

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


def make_writer(workdir: str, collection: str):
  """clu's default writer (one TensorBoard run per job), or scalars to the log without TF."""
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


class HostWork:
  """Runs host-side work (metrics, pictures, checkpoint writes) off the training loop.

  With one process a single background thread takes it, in submission order;
  with several processes it runs inline, since checkpoint writes are
  collective and every process must reach them at the same step.
  """

  def __init__(self, background: bool):
    self.pool = futures.ThreadPoolExecutor(1, "host-work") if background else None
    self.pending: dict[str, futures.Future] = {}
    self.failures: list[BaseException] = []

  def submit(self, job_name: str, fn: Callable[[], None]) -> None:
    if self.pool is None:
      fn()
      return
    self.pending[job_name] = self.pool.submit(fn)

  def wait(self, job_name: str | None = None) -> None:
    """Waits for ``job_name``'s work (or all); re-raises what it raised."""
    names = [job_name] if job_name is not None else list(self.pending)
    for name in names:
      future = self.pending.pop(name, None)
      if future is not None:
        future.result()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      if self.pool is not None:
        self.pool.shutdown(wait=True)


class StopRequest:
  """Turns SIGTERM / SIGINT into a request the loop polls (main thread only)."""

  def __init__(self):
    self.signum: int | None = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in STOP_SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None:  # a second signal: stop now
      raise KeyboardInterrupt
    self.signum = signum
    logging.warning("%s received: checkpointing at the current step", signal.Signals(signum).name)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False


class Trainer:
  """Trains and evaluates the jobs of one config; see ``train_and_evaluate``."""

  def __init__(
    self, config: ml_collections.ConfigDict, workdir: str, eval_only: bool = False, source=None
  ):
    from skrd4ad_jax.data.source import PillowSource

    source = source or PillowSource()  # the data_pipelines.select_source of the entry point

    # What the run uses and stores: validated, settings left to the teacher filled in.
    config = preflight.prepare(config)
    self.config = config
    self.eval_only = eval_only
    self.workdir = ensure_workdir(workdir)
    self.method = methods.build_method(config)
    self.categories = list(source.categories(config.data))
    # Scanning is cheap; every process scans every category to plan the same slots.
    self.data = {c: source.category_data(config.data, c) for c in self.categories}
    num_seeds = int(config.train.get("seeds", 1))
    self.jobs: dict[str, Job] = {}
    for category in self.categories:
      for k in range(num_seeds):
        name = schedule.job_name(category, k)
        sched = schedule.make_schedule(
          config.train,
          category,
          self.data[category].num_train,
          self.method.default_num_steps(category),
        )
        self.jobs[name] = Job(name, category, k, int(config.seed) + k, sched)
    # [ckpt] The plan reads every latest checkpoint in full: the teacher comes first.
    self.teacher_vars = teachers.load_teacher_variables(
      config.model.teacher,
      config.model.teacher_weights,
      image_size=int(config.data.image_size),
    )
    self.abstract_state = jax.eval_shape(self.method.init, jax.random.PRNGKey(0), self.teacher_vars)
    self._read_checkpoint_steps()

    devices = jax.devices()
    data_axis = int(config.parallel.data_axis_size)
    # -- memory-aware slots (training/memory.py): with the teacher loaded above, the
    # step's memory is estimated, slots are chosen or checked, the eval batch capped.
    loads = {j.name: max(0, j.total_steps - j.step) for j in self.jobs.values()}
    per_device, self.memory = memory.choose_slots_per_device(
      self.method,
      config,
      self.teacher_vars,
      self.batch_template,
      loads,
      max(1, len(devices) // data_axis),
      devices[0],
    )
    memory.cap_eval_batch(config, self.memory, per_device)
    self.slots_per_device = per_device
    # -- end of the memory-aware slots.
    self.mesh = parallel.make_mesh(len(self.jobs), data_axis)
    self.num_slots = parallel.num_slots(self.mesh, per_device)
    starts = {j.name: (min(j.step, j.total_steps), j.total_steps) for j in self.jobs.values()}
    self.plan = schedule.plan_slots(starts, self.num_slots)
    self.local = set(parallel.local_slots(self.num_slots, self.mesh))
    local_jobs = {seg.job for s in self.local for seg in self.plan[s]}
    self.local_categories = [
      c for c in self.categories if any(self.jobs[j].category == c for j in local_jobs)
    ]
    logging.info(
      "process %d/%d: %d job(s) on %d slot(s) (%d per device), useful work %.1f %%; %s; "
      "this process: slots %s, categories %s",
      jax.process_index(),
      jax.process_count(),
      len(self.jobs),
      self.num_slots,
      per_device,
      100 * schedule.useful_fraction(self.plan),
      self.memory.summary(per_device) if self.memory else "no device memory limit known",
      sorted(self.local),
      ", ".join(self.local_categories) or "none",
    )
    self._load_data()
    self.eval_step = steps.jitted_eval_step(self.method)
    self.host = HostWork(background=jax.process_count() == 1)
    self.prefetcher = batches_lib.Prefetcher(self._host_workers())
    self._managers: dict[tuple[str, int], Any] = {}
    self._fresh: dict[int, Any] = {}
    self._init = jax.jit(self.method.init)
    self._features: dict[str, list[np.ndarray]] = {}
    self.stats = {"loop_seconds": 0.0, "host_seconds": 0.0, "steps": 0, "images": 0}

  # -- set-up ---------------------------------------------------------------

  def _host_workers(self) -> int:
    workers = int(self.config.data.get("host_workers", 0))
    return workers if workers > 0 else min(4, os.cpu_count() or 1)

  def manager(self, job: Job, owner: int = 0):
    key = (job.name, owner)
    if key not in self._managers:
      self._managers[key] = checkpoints.make_manager(self.workdir, job.name, owner=owner)
    return self._managers[key]

  def _read_checkpoint_steps(self) -> None:
    """Where each job stands in the workdir: its latest checkpoint's step."""
    for job in self.jobs.values():
      # [ckpt] The newest checkpoint that reads in full; unreadable ones are set aside.
      usable = checkpoints.latest_usable(
        self.workdir, job.name, self.abstract_state, config=self.config
      )
      meta = usable[1] if usable else None
      if meta is None:
        if self.eval_only:
          raise FileNotFoundError(
            f"No checkpoint of {job.name!r} in {self.workdir}: an evaluation-only run needs "
            "one per category. Train first (without --eval_only), import one "
            "(python -m skrd4ad_jax.import_checkpoint), or choose the categories that have "
            "one (--config=...:a,b)."
          )
        continue
      job.has_checkpoint = True
      job.step = int(meta["step"])
      job.train_seconds = float(meta.get("train_seconds", 0.0))
      job.kept_meta = {k: meta[k] for k in ("imported_from",) if k in meta}
      job.best = dict(meta.get("best", {}))  # [ckpt] test-selected figures survive a resume
      if self.eval_only or "imported_from" in meta:
        # Evaluate what the workdir holds, at its step: nothing is trained.
        job.schedule = dataclasses.replace(job.schedule, total_steps=job.step)
      logging.info("[%s] checkpoint at step %d of %d", job.name, job.step, job.total_steps)

  def _load_data(self) -> None:
    """Decodes every split of this process's categories; problems stop every process."""
    from skrd4ad_jax.data.folder import DatasetError

    problems = []
    for category in self.local_categories:
      data = self.data[category]
      try:
        data.load()
      except DatasetError as e:
        problems.append(str(e))
        continue
      problems += self._split_problems(data)
    problems = [p for ps in parallel.allgather_json(problems) for p in ps]
    if problems:
      raise DatasetError(" | ".join(problems))

  def _split_problems(self, data) -> list[str]:
    where = f"category {data.category!r} ({data.location})"
    problems = []
    if not self.eval_only and data.num_train == 0:
      problems.append(
        f"{where}: split 'train' is empty. Fix: add normal images to train/good (or lower "
        "config.data.val_fraction)."
      )
    if data.num_test == 0:
      problems.append(
        f"{where}: split 'test' is empty. Fix: add test/good and test/<defect> images."
      )
    if self.config.thresholds.source == "val" and data.num_val == 0:
      problems.append(
        f"{where}: split 'val' (held-out normal training images for the thresholds) is "
        f"empty with {data.num_train} training image(s). Fix: add training images, raise "
        "config.data.val_fraction, or set config.thresholds.source='test'."
      )
    return problems

  def fresh_state(self, seed: int) -> Any:
    """The initial state of a job with this seed (host arrays, cached)."""
    if seed not in self._fresh:
      self._fresh[seed] = jax.device_get(self._init(jax.random.PRNGKey(seed), self.teacher_vars))
    return self._fresh[seed]

  def meta(self, job: Job, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
      "category": job.category,
      "job": job.name,
      "seed_index": job.seed_index,
      "seed": job.seed,
      "step": job.step,
      "total_steps": job.total_steps,
      "epochs": job.schedule.epochs,
      "train_seconds": job.train_seconds,
      "image_size": int(self.config.data.image_size),
      "method": self.method.describe(),
      "config": config_to_json(self.config),
      "best": dict(job.best),  # [ckpt]
      **job.kept_meta,
      **(extra or {}),
    }

  def writer(self, job: Job):
    if job.writer is None:
      job.writer = make_writer(self.workdir, job.name)
      job.writer.write_hparams({**config_lib.flatten(config_to_json(self.config)), "job": job.name})
    return job.writer

  # -- job inputs -----------------------------------------------------------

  def _job_input(self, job: Job) -> batches_lib.JobInput:
    data = self.data[job.category]
    bs = int(self.config.train.batch_size)
    if self.config.train.get("cache_teacher_features", False):
      return batches_lib.JobInput(
        job.name,
        job.category,
        job.seed,
        bs,
        self.method,
        features=self._teacher_features(job.category),
      )
    return batches_lib.JobInput(
      job.name, job.category, job.seed, bs, self.method, images=data.train_images
    )

  def _teacher_features(self, category: str) -> list[np.ndarray]:
    """The frozen teacher's features of the training images, once per category.

    Without input augmentation they never change, so they are computed once
    instead of every epoch; a job's batches are the same images in the same
    order as without the cache (the features, computed in evaluation batches,
    agree to float round-off).
    """
    if category not in self._features:
      teacher_fn = jax.jit(self.method.teacher_features)
      feats = [[], [], []]
      for batch in self.data[category].eval_batches("train", int(self.config.eval.batch_size)):
        valid = np.asarray(batch["valid"], bool)
        for level, f in enumerate(teacher_fn(self.teacher_vars, batch["image"])):
          feats[level].append(np.asarray(f)[valid])
      self._features[category] = [np.concatenate(f) for f in feats]
    return self._features[category]

  def batch_template(self) -> dict[str, np.ndarray]:
    """Zeros shaped like one slot's training batch (the same on every process)."""
    bs, size = int(self.config.train.batch_size), int(self.config.data.image_size)
    images = np.zeros((bs, size, size, 3), np.float32)
    if self.config.train.get("cache_teacher_features", False):
      shapes = jax.eval_shape(self.method.teacher_features, self.teacher_vars, images)
      return {f"feature{level + 1}": np.zeros(s.shape, s.dtype) for level, s in enumerate(shapes)}
    batch = self.method.make_batch(images, np.random.default_rng(0), "")
    return {k: np.zeros_like(v) for k, v in batch.items()}

  # -- evaluation -----------------------------------------------------------

  def predictions(self, job: Job, slot: int, stacked: Any) -> tuple[Any, Any]:
    """(test, val) predictions of the job in ``slot`` (on its device); val None if unused."""
    cfg = self.config
    state = parallel.local_slot(stacked, slot)
    device = parallel.slot_device(self.mesh, self.num_slots, slot)
    teacher_vars = self.teacher_copies[device]
    key = jax.device_put(jax.random.PRNGKey(job.seed), device)

    def eval_fn(images):
      return self.eval_step(state, teacher_vars, jax.device_put(images, device), key)

    data = self.data[job.category]
    bs = int(cfg.eval.batch_size)
    test = evaluate.predict(eval_fn, data.eval_batches("test", bs), data.has_masks, True)
    val = None
    if cfg.thresholds.source == "val":
      val = evaluate.predict(eval_fn, data.eval_batches("val", bs), has_masks=False)
    return test, val

  def evaluate_host(self, job: Job, step: int, test, val, final: bool) -> tuple[dict, dict]:
    """Metrics, thresholds, TensorBoard, and when ``final`` the csv and pictures."""
    cfg = self.config
    faults.point("host_eval", path=os.path.join(self.workdir, job.name))  # [ckpt]
    t0 = time.time()
    thr = evaluate.choose_thresholds(
      val if val is not None else test, float(cfg.thresholds.normal_quantile)
    )
    thr["source"] = cfg.thresholds.source
    protocol = cfg.eval.get("protocol", "project")
    m = evaluate.compute_metrics(test, float(cfg.eval.fpr_limit), protocol=protocol)
    m.update(evaluate.threshold_metrics(test, thr))
    for key in SELECTED_METRICS:
      value = m.get(key, float("nan"))
      if math.isfinite(value) and not value <= job.best.get(key, -math.inf):
        job.best[key] = value
    writer = self.writer(job)
    writer.write_scalars(
      step,
      {f"eval/{k}": v for k, v in m.items() if isinstance(v, float) and math.isfinite(v)},
    )
    n_pics = int(cfg.eval.tensorboard_pictures)
    if n_pics:
      writer.write_images(step, {"eval/heatmaps": evaluate.picture_grid(test, thr, n_pics)[None]})
    if final:
      job_dir = os.path.join(self.workdir, job.name)
      write_test_predictions(test, thr, os.path.join(job_dir, "test_predictions.csv"))
      pictures = cfg.eval.save_pictures and (
        job.seed_index == 0 or cfg.eval.get("pictures_all_seeds", False)
      )
      if pictures:
        evaluate.save_pictures(test, thr, os.path.join(job_dir, "images", "test"))
    writer.write_scalars(step, {"eval/seconds": time.time() - t0})
    writer.flush()
    logging.info(
      "[%s] step %d: %s",
      job.name,
      step,
      ", ".join(f"{k}={m[k]:.4f}" for k in RESULT_METRICS if k in m),
    )
    return m, thr

  def _row(self, job: Job, m: dict[str, Any]) -> dict[str, Any]:
    images = job.step * int(self.config.train.batch_size)
    row = {
      "category": job.category,
      "seed": job.seed,
      **{k: m.get(k, float("nan")) for k in RESULT_METRICS},
      "image_f1_at_threshold": m["image_f1_at_threshold"],
      "image_precision": m["image_precision"],
      "image_recall": m["image_recall"],
      **{k: v for k, v in m.items() if k.startswith("baseline_")},
      "train_seconds": job.train_seconds,
      "train_images_per_second": images / job.train_seconds if job.train_seconds else math.nan,
    }
    if int(self.config.train.eval_every_epochs) > 0:
      for key in SELECTED_METRICS:
        row[f"{key}_test_selected"] = job.best.get(key, math.nan)
    return row

  def baseline_metrics(self, job: Job) -> dict[str, float]:
    """The colour-statistics baseline on the same split (no learning involved)."""
    from skrd4ad_jax.evaluation import baseline

    data = self.data[job.category]
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
    m = evaluate.compute_metrics(pred, float(self.config.eval.fpr_limit))
    return {f"baseline_{k}": m[k] for k in ("image_auroc", "pixel_auroc", "pixel_aupro")}

  # -- checkpoints ----------------------------------------------------------

  def save(self, job: Job, slot: int, stacked: Any, final: bool) -> None:
    """Checkpoints ``job`` (in ``slot``) at its step; when ``final``, evaluates first.

    One process: the state comes to the host now and the host work (metrics,
    pictures, the write) runs in the background. Several processes: a
    collective write, the owner evaluating first.
    """
    owner = parallel.slot_owner(self.num_slots, self.mesh, slot)
    mine = owner == jax.process_index()
    test = val = None
    if final and mine:
      test, val = self.predictions(job, slot, stacked)
    step = job.step

    def finish() -> dict[str, Any]:
      extra: dict[str, Any] = {"final": final}
      if final:
        m, thr = self.evaluate_host(job, step, test, val, final=True)
        metrics = dict(m)
        if self.config.eval.get("baseline", False):
          m.update(self.baseline_metrics(job))
        job.row = self._row(job, m)
        extra.update(thresholds=thr, metrics=metrics)
      return self.meta(job, extra)

    manager = self.manager(job, owner)
    if jax.process_count() == 1:
      state = jax.device_get(parallel.local_slot(stacked, slot))

      def work():
        checkpoints.save(manager, step, state, finish())

      self.host.submit(job.name, work)
      return
    meta = finish() if mine else {}
    sharding = parallel.slot_sharding(self.num_slots, self.mesh, slot)
    checkpoints.save(manager, step, parallel.slot_state(stacked, slot, sharding), meta)

  def restore(self, job: Job, slot: int) -> Any | None:
    """The job's latest checkpointed state (this process's copy), or None (collective)."""
    self.host.wait(job.name)  # its last write, when it was paused in another slot
    owner = parallel.slot_owner(self.num_slots, self.mesh, slot)
    sharding = parallel.slot_sharding(self.num_slots, self.mesh, slot)
    target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), self.abstract_state
    )
    restored = checkpoints.restore(self.manager(job, owner), target, config=self.config)
    if restored is None:
      return None
    state, meta = restored
    if int(meta["step"]) != job.step:
      raise errors.UserError(
        f"[{job.name}] the latest checkpoint is at step {meta['step']}, the run expected "
        f"{job.step}: was the workdir changed during the run?"
      )
    return jax.tree.map(lambda x: x.addressable_data(0), state)

  # -- segments -------------------------------------------------------------

  def start_segment(self, seg: schedule.Segment, slot: int, stacked: Any) -> Any:
    """Puts the segment's job into ``slot``: its checkpoint, or a fresh state."""
    job = self.jobs[seg.job]
    faults.point("job_start", path=os.path.join(self.workdir, job.name))  # [ckpt]
    if job.failed:
      return stacked
    state = self.restore(job, slot) if job.has_checkpoint else None
    if state is None:
      if job.step:
        raise errors.UserError(f"[{job.name}] no checkpoint to continue from at step {job.step}.")
      state = self.fresh_state(job.seed)
    if slot in self.local:
      stacked = parallel.set_local_slot(stacked, slot, state)
      if seg.length:
        job.input = self._job_input(job)
        job.last_logged = job.step
        for t in range(job.step, min(job.step + PREFETCH_STEPS, seg.stop)):
          self.prefetcher.ask(job.input, t)
      logging.info(
        "[%s] slot %d: steps %d-%d of %d", job.name, slot, seg.start, seg.stop, job.total_steps
      )
    return stacked

  def end_segment(self, seg: schedule.Segment, slot: int, stacked: Any) -> None:
    """The job leaves ``slot``: finished (evaluate and save) or paused (save)."""
    job = self.jobs[seg.job]
    if job.failed:
      return
    self.prefetcher.forget(job.name)
    job.input = None
    if job.done:
      if job.total_steps == 0 and not (self.eval_only or job.kept_meta):
        logging.warning("[%s] evaluated without training (a zero step budget).", job.name)
      self.save(job, slot, stacked, final=True)
    else:
      self.save(job, slot, stacked, final=False)
    job.has_checkpoint = True

  # -- the loop -------------------------------------------------------------

  def run(self) -> list[dict[str, Any]]:
    try:
      with StopRequest() as stop:
        self._loop(stop)
      self.host.close()
    finally:
      self.prefetcher.close()
      self._release_features()
    return self.write_results()

  def _release_features(self) -> None:
    self._features.clear()

  def _stop_requested(self, stop: StopRequest) -> int | None:
    signum = stop.signum or 0
    if jax.process_count() > 1:
      signum = max(parallel.allgather_json(signum))
    return signum or None

  def _preempt(self, signum: int, current: dict[int, schedule.Segment], stacked: Any) -> None:
    """Checkpoints every job in a slot at its current step; raises ``Preempted``."""
    self.host.wait()
    saved = []
    for slot, seg in sorted(current.items()):
      job = self.jobs[seg.job]
      if job.failed or job.done or job.step == seg.start:
        continue  # nothing new since its last checkpoint (or since step 0)
      self.save(job, slot, stacked, final=False)
      saved.append(f"{job.name}@{job.step}")
    self.host.wait()
    name = signal.Signals(signum).name
    message = (
      f"Stopped by {name}: checkpoints written at the current step of "
      f"{', '.join(saved) or 'no job'}. Rerun the same command to resume."
    )
    raise Preempted(signum, message)

  def _loop(self, stop: StopRequest) -> None:
    cfg = self.config
    bs = int(cfg.train.batch_size)
    template = self.batch_template()
    fresh = self.fresh_state(int(cfg.seed))
    stacked = parallel.global_stacked({}, fresh, self.num_slots, self.mesh)
    teacher_vars = parallel.put_replicated(self.teacher_vars, self.mesh)
    self.teacher_copies = parallel.device_copies(teacher_vars)
    p_step = parallel.make_parallel_train_step(
      self.method, self.mesh, cfg.parallel.get("category_loop", "auto")
    )
    horizon = max(schedule.slot_loads(self.plan), default=0)
    queues = {s: list(q) for s, q in enumerate(self.plan)}
    current: dict[int, schedule.Segment] = {}
    log_every = max(1, int(cfg.train.log_every_steps))
    console_t, console_it = time.time(), 0
    iteration_start = time.time()
    for it in range(horizon + 1):
      for slot in sorted(current):
        if current[slot].end == it:
          self.end_segment(current.pop(slot), slot, stacked)
      signum = self._stop_requested(stop)
      if signum:
        self._preempt(signum, current, stacked)
      for slot, queue in queues.items():
        while queue and queue[0].begin == it and slot not in current:
          seg = queue.pop(0)
          stacked = self.start_segment(seg, slot, stacked)
          if seg.length == 0:
            self.end_segment(seg, slot, stacked)
          else:
            current[slot] = seg
      if it == horizon:
        break
      stepping = {
        s: self.jobs[seg.job] for s, seg in current.items() if not self.jobs[seg.job].failed
      }
      if not stepping:
        iteration_start = time.time()
        continue
      t_host = time.time()
      per_slot = {}
      for slot, job in stepping.items():
        if slot in self.local:
          seg = current[slot]
          per_slot[slot] = self.prefetcher.get(job.input, job.step)
          ahead = job.step + PREFETCH_STEPS
          if ahead < seg.stop:
            self.prefetcher.ask(job.input, ahead)
      active = parallel.global_stacked(
        {s: np.bool_(s in stepping) for s in self.local}, np.bool_(False), self.num_slots, self.mesh
      )
      rngs = parallel.global_stacked(
        {
          s: np.asarray(jax.random.PRNGKey(job.seed))
          for s, job in stepping.items()
          if s in self.local
        },
        np.zeros(2, np.uint32),
        self.num_slots,
        self.mesh,
      )
      batch = parallel.global_batch(per_slot, template, self.num_slots, self.mesh)
      self.stats["host_seconds"] += time.time() - t_host
      stacked, metrics = p_step(stacked, teacher_vars, batch, rngs, active)
      for job in stepping.values():
        job.step += 1
      self.stats["steps"] += 1
      self.stats["images"] += len(stepping) * bs
      events = {
        s: job
        for s, job in stepping.items()
        if self._is_boundary(job.step, job.schedule, log_every)
      }
      if events:
        # Reading the metrics waits for the step.
        host_metrics = {k: parallel.slot_values(v) for k, v in metrics.items()}
        for slot, job in events.items():
          if slot in self.local:
            self._on_boundary(job, slot, stacked, host_metrics)
        # Which jobs stopped on a NaN loss: every process must know (collective).
        failed = {
          name: why
          for d in parallel.allgather_json({j.name: j.failed for j in events.values() if j.failed})
          for name, why in d.items()
        }
        for name, why in failed.items():
          self.jobs[name].failed = why
          self.prefetcher.forget(name)
        for slot, job in events.items():
          sched = job.schedule
          periodic = sched.checkpoint_every and job.step % sched.checkpoint_every == 0
          if not job.failed and periodic and job.step != current[slot].stop:
            self.save(job, slot, stacked, final=False)
            job.has_checkpoint = True
      now = time.time()
      dt = now - iteration_start
      iteration_start = now
      self.stats["loop_seconds"] += dt
      for job in stepping.values():
        job.train_seconds += dt
      if events and now - console_t > 1.0:
        sec = (now - console_t) / max(1, it + 1 - console_it)
        console_t, console_it = now, it + 1
        logging.info(
          "iteration %d/%d | %.2f s/step | ETA %.0f s | %s",
          it + 1,
          horizon,
          sec,
          (horizon - it - 1) * sec,
          " ".join(f"{j.name}:{j.step}/{j.total_steps}" for j in stepping.values()),
        )

  @staticmethod
  def _is_boundary(step: int, s: schedule.Schedule, log_every: int) -> bool:
    return (
      step % log_every == 0
      or step == s.total_steps
      or bool(s.eval_every and step % s.eval_every == 0)
      or bool(s.checkpoint_every and step % s.checkpoint_every == 0)
    )

  def _on_boundary(self, job: Job, slot: int, stacked: Any, host_metrics: dict) -> None:
    """Logs the job's training scalars, checks the loss, evaluates when due."""
    s = job.schedule
    scalars = {f"train/{k}": float(v[slot]) for k, v in host_metrics.items()}
    scalars.update(
      {
        "train/epoch": job.step / s.steps_per_epoch,
        "train/images_per_second": job.step
        * int(self.config.train.batch_size)
        / max(job.train_seconds, 1e-9),
      }
    )
    self.writer(job).write_scalars(job.step, scalars)
    try:
      steps.check_finite(
        {k: v for k, v in scalars.items() if k.startswith("train/loss")},
        job.last_logged + 1,
        job.step,
        job.name,
      )
    except FloatingPointError as e:
      # The other jobs go on; this one keeps its last checkpoint.
      job.failed = str(e)
      logging.error("%s", e)
      return
    job.last_logged = job.step
    if s.eval_every and job.step % s.eval_every == 0 and job.step < s.total_steps:
      test, val = self.predictions(job, slot, stacked)
      step = job.step
      self.host.submit(
        f"{job.name}@eval{step}", lambda: self.evaluate_host(job, step, test, val, final=False)
      )

  # -- results --------------------------------------------------------------

  def notes(self) -> list[str]:
    cfg = self.config
    map_kwargs = self.method.map_kwargs
    differ = recipe.recipe_notes(cfg)
    notes = [
      f"method: {self.method.name}; teacher: {cfg.model.teacher} "
      f"(weights: {cfg.model.teacher_weights or 'default'}); image size "
      f"{cfg.data.image_size}; dtype {cfg.model.get('dtype', 'float32')}.",
      f"Loss: {cfg.loss.kind}; anomaly map: {map_kwargs['mode']} of levels "
      f"{map_kwargs['levels']}, Gaussian sigma {map_kwargs['sigma']:g}.",
    ]
    if differ:
      notes.append("Recipe settings that differ from the official code: " + "; ".join(differ) + ".")
    notes += [
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
      notes.append(
        f"{cfg.train.seeds} seeds per category (seed k = config.seed + k = "
        f"{cfg.seed} + k): mean ± standard deviation over seeds; the mean row's spread is "
        "the standard deviation over seeds of the per-seed category means. Every seed's row "
        "is in results_per_seed.csv."
      )
    if int(cfg.train.eval_every_epochs) > 0:
      notes.append(
        "Columns marked 'test-selected' hold the best value over the periodic test-set "
        "evaluations (what SK-RD4AD, URD and RD++ report): optimistic, for comparison only."
      )
    if self.eval_only:
      notes.append("Evaluation-only run: the models were not trained by this command.")
    if any("imported_from" in j.kept_meta for j in self.jobs.values()):
      notes.append(
        "Some models were imported from official PyTorch checkpoints "
        "(python -m skrd4ad_jax.import_checkpoint)."
      )
    notes += self.method.notes()
    if self.stats["loop_seconds"] > 0:
      notes.append(
        f"Training loop: {self.stats['images'] / self.stats['loop_seconds']:.2f} images/s over "
        f"{self.stats['loop_seconds']:.0f} s on {self.num_slots} slot(s) (train_seconds and "
        "images/s of a job count the wall time of every loop iteration it took part in); host "
        f"time {100 * self.stats['host_seconds'] / self.stats['loop_seconds']:.1f} % of the loop."
      )
    return notes

  def write_results(self) -> list[dict[str, Any]]:
    """results.csv / results.md (and results_per_seed.csv), gathered from all processes."""
    cfg = self.config
    faults.point("results_write", path=self.workdir)  # [ckpt]
    local = []
    for slot in self.local:
      for seg in self.plan[slot]:
        job = self.jobs[seg.job]
        if job.row is not None and seg.stop == job.total_steps:
          local.append({"job": job.name, **job.row})
    failed = {name: job.failed for name, job in self.jobs.items() if job.failed}
    by_job = {r["job"]: r for rows in parallel.allgather_json(local) for r in rows}
    seed_rows = [dict(by_job[name]) for name in self.jobs if name in by_job]
    for r in seed_rows:
      r.pop("job")
    rows = []
    if seed_rows and jax.process_index() == 0:
      num_seeds = int(cfg.train.get("seeds", 1))
      rows, mean = results_lib.aggregate_seeds(seed_rows, [c for c in self.categories])
      results_lib.write_results_table(
        rows, self.workdir, dataset=cfg.data.dataset, notes=self.notes(), mean=mean
      )
      if num_seeds > 1:
        results_lib.write_rows_csv(seed_rows, os.path.join(self.workdir, "results_per_seed.csv"))
      print(results_lib.format_console_table(rows, dataset=cfg.data.dataset, mean=mean))
    for job in self.jobs.values():
      if job.writer is not None:
        job.writer.close()
    if failed:
      where = (
        f" Results of the other jobs are in {self.workdir}/results.md."
        if seed_rows
        else " No job finished, so no results table was written."
      )
      raise errors.TrainingFailed(
        "Training failed for " + "; ".join(f"{name}: {why}" for name, why in failed.items()) + where
      )
    return [r for r in seed_rows]


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, eval_only: bool = False, source=None
) -> list[dict[str, Any]]:
  """Trains and evaluates every job of ``config``; writes everything to ``workdir``.

  Args:
    config: a config from ``configs/``.
    workdir: where checkpoints, TensorBoard runs, pictures and results go.
    eval_only: evaluate what ``workdir`` holds (trained or imported) without
      training: every job needs a checkpoint.
    source: the ``skrd4ad_jax.data.source.DataSource`` that reads the data
      (None = ``PillowSource()``; ``data_pipelines.select_source`` picks tf.data).

  Returns:
    One results row per job (every seed of every category; ``results.csv``
    holds their per-category mean and spread).
  """
  return Trainer(config, workdir, eval_only=eval_only, source=source).run()
