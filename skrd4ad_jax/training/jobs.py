"""Jobs and their bookkeeping: one (category, seed) pair, where it stands, what it stores.

A *job* is one category trained with one seed (``config.train.seeds`` of them
per category; seed k uses ``config.seed + k`` for initialisation, shuffling and
augmentation). Its files live under ``<workdir>/<category>`` for seed 0 and
``<workdir>/<category>/seed_<k>`` for seed k (``schedule.job_name``).

Ownership between threads: a ``Job``'s fields belong to the training loop (the
main thread); its ``results`` (the test-selected figures and the final results
row) belong to the host work (``host.HostWork``), which writes and reads them
in submission order; the loop reads them only before any host work starts
(a resume) or after it has all finished (the results table). What a checkpoint
stores of the loop's fields is copied on the main thread (``checkpoint_meta``)
when the write is submitted.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from absl import logging
import ml_collections

from skrd4ad_jax.training import batches as batches_lib
from skrd4ad_jax.training import checkpoints, schedule


@dataclasses.dataclass
class JobResults:
  """What evaluations produce for a job; owned by the host work (see the module docstring)."""

  best: dict[str, float] = dataclasses.field(default_factory=dict)
  row: dict[str, Any] | None = None


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
  last_logged: int = 0
  has_checkpoint: bool = False
  kept_meta: dict[str, Any] = dataclasses.field(default_factory=dict)
  input: batches_lib.JobInput | None = None
  results: JobResults = dataclasses.field(default_factory=JobResults)

  @property
  def total_steps(self) -> int:
    return self.schedule.total_steps

  @property
  def done(self) -> bool:
    return self.step >= self.total_steps


def config_to_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as the JSON a checkpoint stores (``meta.config``)."""
  return json.loads(config.to_json_best_effort())


def make_jobs(config: ml_collections.ConfigDict, method, data: dict[str, Any]) -> dict[str, Job]:
  """Every (category, seed) job of ``config``, in category then seed order, at step 0.

  Args:
    config: the prepared config.
    method: the ``methods.Method`` (its default step count per category).
    data: ``CategoryData`` per category (their training-set sizes).
  """
  jobs: dict[str, Job] = {}
  for category, category_data in data.items():
    for k in range(int(config.train.get("seeds", 1))):
      name = schedule.job_name(category, k)
      sched = schedule.make_schedule(
        config.train, category, category_data.num_train, method.default_num_steps(category)
      )
      jobs[name] = Job(name, category, k, int(config.seed) + k, sched)
  return jobs


def read_checkpoint_steps(
  jobs: dict[str, Job],
  workdir: str,
  abstract_state: Any,
  config: ml_collections.ConfigDict,
  eval_only: bool,
) -> None:
  """Where each job stands in ``workdir``: its latest usable checkpoint's step.

  Raises:
    FileNotFoundError: ``eval_only`` and a job has no checkpoint.
  """
  for job in jobs.values():
    # [ckpt] The newest checkpoint that reads in full; unreadable ones are set aside.
    usable = checkpoints.latest_usable(workdir, job.name, abstract_state, config=config)
    meta = usable[1] if usable else None
    if meta is None:
      if eval_only:
        raise FileNotFoundError(
          f"No checkpoint of {job.name!r} in {workdir}: an evaluation-only run needs "
          "one per category. Train first (without --eval_only), import one "
          "(python -m skrd4ad_jax.import_checkpoint), or choose the categories that have "
          "one (--config=...:a,b)."
        )
      continue
    job.has_checkpoint = True
    job.step = int(meta["step"])
    job.train_seconds = float(meta.get("train_seconds", 0.0))
    job.kept_meta = {k: meta[k] for k in ("imported_from",) if k in meta}
    # [ckpt] test-selected figures survive a resume (no host work runs yet).
    job.results.best = dict(meta.get("best", {}))
    if eval_only or "imported_from" in meta:
      # Evaluate what the workdir holds, at its step: nothing is trained.
      job.schedule = dataclasses.replace(job.schedule, total_steps=job.step)
    logging.info("[%s] checkpoint at step %d of %d", job.name, job.step, job.total_steps)


def checkpoint_meta(job: Job, config: ml_collections.ConfigDict, method) -> dict[str, Any]:
  """The loop's part of a checkpoint's JSON item, copied now (main thread).

  The host work adds ``best`` and what the evaluation produced (``with_results``).
  """
  return {
    "category": job.category,
    "job": job.name,
    "seed_index": job.seed_index,
    "seed": job.seed,
    "step": job.step,
    "total_steps": job.total_steps,
    "epochs": job.schedule.epochs,
    "train_seconds": job.train_seconds,
    "image_size": int(config.data.image_size),
    "method": method.describe(),
    "config": config_to_json(config),
  }


def with_results(meta: dict[str, Any], job: Job, extra: dict[str, Any]) -> dict[str, Any]:
  """``meta`` with the job's test-selected figures, kept items and ``extra`` (host work)."""
  return {**meta, "best": dict(job.results.best), **job.kept_meta, **extra}  # [ckpt]
