"""The slots' states during the run: jobs enter (restored or fresh) and leave (saved).

``SlotStates`` holds the stacked state of every slot and which segment each
slot runs now. A job entering a slot gets its latest checkpoint or a fresh
state; a job leaving it is checkpointed, and when it has reached its last step
it is finished first: evaluated, its files written, its results row made. The
device part of an evaluation and the state's copy to the host run in the loop;
the rest goes to the host work (``host.HostWork``), in this order per job:
``host_eval``, TensorBoard, ``test_predictions.csv``, pictures, the checkpoint
write. ``preempt`` checkpoints every job in a slot and raises ``Preempted``.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from absl import logging
import jax

from skrd4ad_jax import errors, faults
from skrd4ad_jax.training import checkpoints, evaluator, jobs, parallel, schedule
from skrd4ad_jax.training.host import Preempted

# Batches made ahead per slot.
PREFETCH_STEPS = 2


class SlotStates:
  """The stacked slot states, the segments running now, and the jobs' entries and exits."""

  def __init__(self, run, plan, host, prefetcher, inputs, writers, evaluate, abstract_state):
    """Args:
    run: ``train.Run``: config, workdir, method, jobs, data, eval_only.
    plan: the ``slots.SlotPlan``.
    host: the ``host.HostWork``.
    prefetcher: the ``batches.Prefetcher``.
    inputs: the ``inputs.JobInputs``.
    writers: the ``writers.JobWriters``.
    evaluate: the ``evaluator.Evaluator``.
    abstract_state: the shapes of one job's state (checkpoint restores).
    """
    self.run, self.plan, self.host = run, plan, host
    self.prefetcher, self.inputs, self.writers = prefetcher, inputs, writers
    self.evaluator = evaluate
    self._abstract_state = abstract_state
    self._init = jax.jit(run.method.init)
    self._fresh: dict[int, Any] = {}
    self._managers: dict[tuple[str, int], Any] = {}
    self.current: dict[int, schedule.Segment] = {}
    self._queues = {s: list(q) for s, q in enumerate(plan.segments)}
    fresh = self.fresh_state(int(run.config.seed))
    self.stacked = parallel.global_stacked({}, fresh, plan.num_slots, plan.mesh)

  # -- which segment runs where --------------------------------------------

  def leave_ended(self, it: int) -> None:
    """The segments that end at iteration ``it`` leave their slots."""
    for slot in sorted(self.current):
      if self.current[slot].end == it:
        self.leave(self.current.pop(slot), slot)

  def enter_due(self, it: int) -> None:
    """The segments that begin at iteration ``it`` enter their (free) slots."""
    for slot, queue in self._queues.items():
      while queue and queue[0].begin == it and slot not in self.current:
        seg = queue.pop(0)
        self.enter(seg, slot)
        if seg.length == 0:
          self.leave(seg, slot)
        else:
          self.current[slot] = seg

  def stepping(self) -> dict[int, jobs.Job]:
    """The jobs that take a step now, by slot (a failed job keeps its slot idle)."""
    all_jobs = self.run.jobs
    return {s: all_jobs[g.job] for s, g in self.current.items() if not all_jobs[g.job].failed}

  # -- entering and leaving -------------------------------------------------

  def enter(self, seg: schedule.Segment, slot: int) -> None:
    """Puts the segment's job into ``slot``: its checkpoint, or a fresh state."""
    job = self.run.jobs[seg.job]
    faults.point("job_start", path=os.path.join(self.run.workdir, job.name))  # [ckpt]
    if job.failed:
      return
    state = self.restore(job, slot) if job.has_checkpoint else None
    if state is None:
      if job.step:
        raise errors.UserError(f"[{job.name}] no checkpoint to continue from at step {job.step}.")
      state = self.fresh_state(job.seed)
    if slot in self.plan.local:
      self.stacked = parallel.set_local_slot(self.stacked, slot, state)
      if seg.length:
        job.input = self.inputs.job_input(job)
        job.last_logged = job.step
        for t in range(job.step, min(job.step + PREFETCH_STEPS, seg.stop)):
          self.prefetcher.ask(job.input, t)
      logging.info(
        "[%s] slot %d: steps %d-%d of %d", job.name, slot, seg.start, seg.stop, job.total_steps
      )

  def leave(self, seg: schedule.Segment, slot: int) -> None:
    """The job leaves ``slot``: finished (evaluated and saved) or paused (saved)."""
    job = self.run.jobs[seg.job]
    if job.failed:
      return
    self.prefetcher.forget(job.name)
    job.input = None
    if job.done:
      if job.total_steps == 0 and not (self.run.eval_only or job.kept_meta):
        logging.warning("[%s] evaluated without training (a zero step budget).", job.name)
      self.finish(job, slot)
    else:
      self.checkpoint(job, slot)
    job.has_checkpoint = True

  def preempt(self, signum: int) -> None:
    """Checkpoints every job in a slot at its current step; raises ``Preempted``."""
    self.host.wait()
    saved = []
    for slot, seg in sorted(self.current.items()):
      job = self.run.jobs[seg.job]
      if job.failed or job.done or job.step == seg.start:
        continue  # nothing new since its last checkpoint (or since step 0)
      self.checkpoint(job, slot)
      saved.append(f"{job.name}@{job.step}")
    self.host.wait()
    name = signal.Signals(signum).name
    message = (
      f"Stopped by {name}: checkpoints written at the current step of "
      f"{', '.join(saved) or 'no job'}. Rerun the same command to resume."
    )
    raise Preempted(signum, message)

  # -- evaluations and checkpoints -------------------------------------------

  def evaluate(self, job: jobs.Job, slot: int) -> None:
    """A periodic evaluation: predictions now, metrics and TensorBoard in the host work."""
    test, val = self.evaluator.predictions(job, slot, self.stacked)
    step = job.step
    self.host.submit(job.name, lambda: self._evaluate_host(job, step, test, val, final=False))

  def _evaluate_host(self, job: jobs.Job, step: int, test, val, final: bool):
    run, t0 = self.run, time.time()
    m, thr = evaluator.metrics(run.config, job, run.workdir, test, val)
    writer = self.writers(job)
    evaluator.write_summaries(run.config, writer, step, m, test, thr)
    if final:
      evaluator.write_final_files(run.config, job, run.workdir, test, thr)
    evaluator.log_metrics(writer, job, step, m, time.time() - t0)
    return m, thr

  def checkpoint(self, job: jobs.Job, slot: int) -> None:
    """Saves ``job`` (in ``slot``) at its current step (in the host work with one process)."""
    self._save(job, slot, None)

  def finish(self, job: jobs.Job, slot: int) -> None:
    """The job's last step: evaluates it, writes its files and results row, then saves it."""
    mine = self.plan.owner(slot) == jax.process_index()
    test = val = None
    if mine:
      test, val = self.evaluator.predictions(job, slot, self.stacked)
    step, train_seconds = job.step, job.train_seconds

    def results() -> dict[str, Any]:
      cfg = self.run.config
      m, thr = self._evaluate_host(job, step, test, val, final=True)
      metrics = dict(m)
      if cfg.eval.get("baseline", False):
        m.update(evaluator.baseline_metrics(cfg, self.run.data[job.category]))
      job.results.row = evaluator.result_row(cfg, job, step, train_seconds, m)
      return {"thresholds": thr, "metrics": metrics}

    self._save(job, slot, results)

  def _save(self, job: jobs.Job, slot: int, results) -> None:
    """One process: the state comes to the host now, the rest runs in the host work.

    Several processes: a collective write, the owner evaluating first.
    """
    run, owner = self.run, self.plan.owner(slot)
    step = job.step
    meta = jobs.checkpoint_meta(job, run.config, run.method)  # the loop's fields, now

    def full_meta() -> dict[str, Any]:
      extra = {"final": results is not None, **(results() if results else {})}
      return jobs.with_results(meta, job, extra)

    manager = self.manager(job, owner)
    if jax.process_count() == 1:
      state = jax.device_get(parallel.local_slot(self.stacked, slot))
      self.host.submit(job.name, lambda: checkpoints.save(manager, step, state, full_meta()))
      return
    mine = owner == jax.process_index()
    sharding = self.plan.sharding(slot)
    checkpoints.save(
      manager, step, parallel.slot_state(self.stacked, slot, sharding), full_meta() if mine else {}
    )

  def restore(self, job: jobs.Job, slot: int) -> Any | None:
    """The job's latest checkpointed state (this process's copy), or None (collective)."""
    self.host.wait(job.name)  # its last write, when it was paused in another slot
    sharding = self.plan.sharding(slot)
    target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), self._abstract_state
    )
    manager = self.manager(job, self.plan.owner(slot))
    restored = checkpoints.restore(manager, target, config=self.run.config)
    if restored is None:
      return None
    state, meta = restored
    if int(meta["step"]) != job.step:
      raise errors.UserError(
        f"[{job.name}] the latest checkpoint is at step {meta['step']}, the run expected "
        f"{job.step}: was the workdir changed during the run?"
      )
    return jax.tree.map(lambda x: x.addressable_data(0), state)

  def fresh_state(self, seed: int) -> Any:
    """The initial state of a job with this seed (host arrays, cached)."""
    if seed not in self._fresh:
      teacher_vars = self.run.teacher_vars
      self._fresh[seed] = jax.device_get(self._init(jax.random.PRNGKey(seed), teacher_vars))
    return self._fresh[seed]

  def manager(self, job: jobs.Job, owner: int = 0):
    key = (job.name, owner)
    if key not in self._managers:
      self._managers[key] = checkpoints.make_manager(self.run.workdir, job.name, owner=owner)
    return self._managers[key]
