"""``train_and_evaluate``: every job of a config (categories x seeds) on the device slots.

A *job* is one category trained with one seed (``jobs.py``). The mesh offers a
fixed number of *slots*; the plan lays the jobs out on them so that no slot
idles while others still train (``slots.py``), and one jitted step advances
every slot by one step of the job it holds (``parallel.py``). A job's numbers
are a function of its seed, category and step only: they do not depend on the
slot, on which jobs share the run, or on where a run was interrupted and
resumed. Evaluation, thresholds, checkpoints, TensorBoard runs and pictures
stay per job, under ``<workdir>/<category>`` for seed 0 and
``<workdir>/<category>/seed_<k>`` for seed k.

The host side keeps the device busy: images are decoded once into memory
before training (``inputs.py``), the next steps' batches are made by worker
threads while the device computes (``batches.Prefetcher``), and with one
process the host part of an evaluation and checkpoint writing run in a
background thread while the other slots go on training (``host.py``).

SIGTERM or SIGINT during training writes a checkpoint of every job in a slot at
its current step and raises ``host.Preempted``; rerunning the same command
resumes every job where it was.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from skrd4ad_jax import methods, teachers
from skrd4ad_jax.training import batches as batches_lib
from skrd4ad_jax.training import evaluator as evaluator_lib
from skrd4ad_jax.training import host as host_lib
from skrd4ad_jax.training import inputs as inputs_lib
from skrd4ad_jax.training import jobs as jobs_lib
from skrd4ad_jax.training import memory, parallel, preflight, schedule, slots, steps, workdir_lock
from skrd4ad_jax.training import writers as writers_lib
from skrd4ad_jax.training.slot_states import PREFETCH_STEPS, SlotStates


@dataclasses.dataclass(frozen=True)
class Run:
  """What every part of a run reads: set up once, before the loop."""

  config: ml_collections.ConfigDict
  workdir: str
  method: Any
  jobs: dict[str, jobs_lib.Job]
  data: dict[str, Any]
  teacher_vars: Any
  eval_only: bool


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  eval_only: bool = False,
  source=None,
  prepared: bool = False,
) -> list[dict[str, Any]]:
  """Trains and evaluates every job of ``config``; writes everything to ``workdir``.

  Args:
    config: a config from ``configs/``.
    workdir: where checkpoints, TensorBoard runs, pictures and results go.
    eval_only: evaluate what ``workdir`` holds (trained or imported) without
      training: every job needs a checkpoint.
    source: the ``skrd4ad_jax.data.source.DataSource`` that reads the data
      (None = ``PillowSource()``; ``data_pipelines.select_source`` picks tf.data).
    prepared: ``config`` is already ``preflight.prepare``'s result (``main``
      prepares it before TensorFlow is imported); otherwise it is prepared here.

  Returns:
    One results row per job (every seed of every category; ``results.csv``
    holds their per-category mean and spread).

  Raises:
    memory.OutOfMemory: the device ran out of memory during the run (its
      ``__cause__`` is the device's error).
  """
  if not prepared:
    config = preflight.prepare(config)  # validated, the teacher's defaults filled in
  if source is None:
    from skrd4ad_jax.data.source import PillowSource

    source = PillowSource()
  workdir = workdir_lock.ensure_writable(workdir)
  method = methods.build_method(config)
  # Scanning is cheap; every process scans every category to plan the same slots.
  data = {c: source.category_data(config.data, c) for c in source.categories(config.data)}
  jobs = jobs_lib.make_jobs(config, method, data)
  # [ckpt] The plan reads every latest checkpoint in full: the teacher comes first.
  teacher_vars = teachers.load_teacher_variables(
    config.model.teacher, config.model.teacher_weights, image_size=int(config.data.image_size)
  )
  abstract_state = jax.eval_shape(method.init, jax.random.PRNGKey(0), teacher_vars)
  jobs_lib.read_checkpoint_steps(jobs, workdir, abstract_state, config, eval_only)
  run = Run(config, workdir, method, jobs, data, teacher_vars, eval_only)
  inputs = inputs_lib.JobInputs(config, method, data, teacher_vars)
  plan = slots.make_plan(config, method, teacher_vars, inputs.batch_template, jobs, list(data))
  writers = writers_lib.JobWriters(workdir, config)
  at_once = False
  try:
    inputs_lib.load_data(config, data, plan.local_categories, eval_only)
    stats = {"loop_seconds": 0.0, "host_seconds": 0.0, "steps": 0, "images": 0}
    prefetcher = batches_lib.Prefetcher(inputs_lib.host_workers(config))
    try:
      teacher = parallel.put_replicated(teacher_vars, plan.mesh)
      evaluate = evaluator_lib.Evaluator(config, method, data, plan, teacher)
      # The stop request encloses the host work: a signal while the last
      # evaluations and writes are waited for is handled, not the default exit.
      with (
        host_lib.StopRequest() as stop,
        host_lib.HostWork(background=jax.process_count() == 1) as host,
      ):
        states = SlotStates(run, plan, host, prefetcher, inputs, writers, evaluate, abstract_state)
        train_loop(run, plan, states, teacher, inputs.batch_template(), stop, stats)
      if stop.signum:  # it came while the last host work was waited for
        logging.warning("The stop signal came after the last step: the run finishes as usual.")
    except host_lib.StoppedAtOnce:
      prefetcher.close(wait=False)  # a batch being made is not waited for
      raise
    finally:
      prefetcher.close()
      inputs.release()
    notes = writers_lib.notes(config, method, jobs, eval_only, stats, plan.num_slots)
    return writers_lib.write_results(
      config, workdir, jobs, plan.finished_here(jobs), list(data), notes
    )
  except host_lib.StoppedAtOnce:
    at_once = True  # the host work may still be writing: leave the writers as they are
    raise
  except Exception as e:
    if memory.is_out_of_memory(e):
      raise memory.OutOfMemory(config, plan.slots_per_device) from e
    raise
  finally:
    if not at_once:
      writers.close()  # TensorBoard's last events, also when stopped or failed


def train_loop(
  run: Run,
  plan: slots.SlotPlan,
  states: SlotStates,
  teacher: Any,
  template: dict[str, np.ndarray],
  stop: host_lib.StopRequest,
  stats: dict[str, float],
) -> None:
  """Every iteration: jobs leave and enter slots, every slot steps, boundaries are handled."""
  cfg = run.config
  p_step = parallel.make_parallel_train_step(
    run.method, plan.mesh, cfg.parallel.get("category_loop", "auto")
  )
  horizon = plan.horizon
  log_every = max(1, int(cfg.train.log_every_steps))
  progress = Progress(horizon)
  iteration_start = time.time()
  for it in range(horizon + 1):
    states.leave_ended(it)
    signum = stop_requested(stop)
    if signum:
      states.preempt(signum)
    states.enter_due(it)
    if it == horizon:
      break
    stepping = states.stepping()
    if not stepping:
      iteration_start = time.time()
      continue
    t_host = time.time()
    batch, rngs, active = slot_inputs(plan, states, stepping, template)
    stats["host_seconds"] += time.time() - t_host
    states.stacked, metrics = p_step(states.stacked, teacher, batch, rngs, active)
    for job in stepping.values():
      job.step += 1
    stats["steps"] += 1
    stats["images"] += len(stepping) * int(cfg.train.batch_size)
    events = {s: j for s, j in stepping.items() if is_boundary(j.step, j.schedule, log_every)}
    if events:
      at_boundaries(run, plan, states, events, metrics)
    now = time.time()
    dt, iteration_start = now - iteration_start, now
    stats["loop_seconds"] += dt
    for job in stepping.values():
      job.train_seconds += dt
    if events:
      progress.log(it, now, stepping)


def slot_inputs(plan: slots.SlotPlan, states: SlotStates, stepping, template):
  """(batch, rngs, active) of this step, global arrays over the slots; asks for later batches."""
  per_slot = {}
  for slot, job in stepping.items():
    if slot in plan.local:
      per_slot[slot] = states.prefetcher.get(job.input, job.step)
      ahead = job.step + PREFETCH_STEPS
      if ahead < states.current[slot].stop:
        states.prefetcher.ask(job.input, ahead)
  n, mesh = plan.num_slots, plan.mesh
  active = parallel.global_stacked(
    {s: np.bool_(s in stepping) for s in plan.local}, np.bool_(False), n, mesh
  )
  keys = {s: np.asarray(jax.random.PRNGKey(j.seed)) for s, j in stepping.items() if s in plan.local}
  rngs = parallel.global_stacked(keys, np.zeros(2, np.uint32), n, mesh)
  return parallel.global_batch(per_slot, template, n, mesh), rngs, active


def is_boundary(step: int, s: schedule.Schedule, log_every: int) -> bool:
  """Whether a job's step is logged, evaluated or checkpointed."""
  return (
    step % log_every == 0
    or step == s.total_steps
    or bool(s.eval_every and step % s.eval_every == 0)
    or bool(s.checkpoint_every and step % s.checkpoint_every == 0)
  )


def at_boundaries(run: Run, plan, states: SlotStates, events: dict, metrics: dict) -> None:
  """Logs, checks the loss, evaluates and checkpoints the jobs at a boundary."""
  # Reading the metrics waits for the step.
  host_metrics = {k: parallel.slot_values(v) for k, v in metrics.items()}
  for slot, job in events.items():
    if slot in plan.local:
      log_and_check(run, states, job, slot, host_metrics)
  # Which jobs stopped on a NaN loss: every process must know (collective).
  failed = {
    name: why
    for d in parallel.allgather_json({j.name: j.failed for j in events.values() if j.failed})
    for name, why in d.items()
  }
  for name, why in failed.items():
    run.jobs[name].failed = why
    states.prefetcher.forget(name)
  for slot, job in events.items():
    every = job.schedule.checkpoint_every
    if not job.failed and every and job.step % every == 0 and job.step != states.current[slot].stop:
      states.checkpoint(job, slot)
      job.has_checkpoint = True


def log_and_check(run: Run, states: SlotStates, job, slot: int, host_metrics: dict) -> None:
  """Logs the job's training scalars, checks the loss, evaluates when due."""
  s = job.schedule
  scalars = {f"train/{k}": float(v[slot]) for k, v in host_metrics.items()}
  images = job.step * int(run.config.train.batch_size)
  scalars["train/epoch"] = job.step / s.steps_per_epoch
  scalars["train/images_per_second"] = images / max(job.train_seconds, 1e-9)
  states.writers(job).write_scalars(job.step, scalars)
  losses = {k: v for k, v in scalars.items() if k.startswith("train/loss")}
  try:
    steps.check_finite(losses, job.last_logged + 1, job.step, job.name)
  except FloatingPointError as e:
    # The other jobs go on; this one keeps its last checkpoint.
    job.failed = str(e)
    logging.error("%s", e)
    return
  job.last_logged = job.step
  if s.eval_every and job.step % s.eval_every == 0 and job.step < s.total_steps:
    states.evaluate(job, slot)


def stop_requested(stop: host_lib.StopRequest) -> int | None:
  """The signal that asks to stop, agreed by every process (collective), or None."""
  signum = stop.signum or 0
  if jax.process_count() > 1:
    signum = max(parallel.allgather_json(signum))
  return signum or None


class Progress:
  """The console's progress line, at most once a second at a boundary."""

  def __init__(self, horizon: int):
    self.horizon = horizon
    self._t, self._it = time.time(), 0

  def log(self, it: int, now: float, stepping: dict) -> None:
    if now - self._t <= 1.0:
      return
    sec = (now - self._t) / max(1, it + 1 - self._it)
    self._t, self._it = now, it + 1
    logging.info(
      "iteration %d/%d | %.2f s/step | ETA %.0f s | %s",
      it + 1,
      self.horizon,
      sec,
      (self.horizon - it - 1) * sec,
      " ".join(f"{j.name}:{j.step}/{j.total_steps}" for j in stepping.values()),
    )
