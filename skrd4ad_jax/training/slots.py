"""The slot plan: how many slots fit, the mesh, and which job each slot runs when.

The mesh offers a fixed number of *slots*; ``schedule.plan_slots`` lays the
jobs out on them so that no slot idles while others still train, and one jitted
step advances every slot by one step of the job it holds (``parallel.py``).
``make_plan`` chooses the slots per device from the step's estimated memory
(``memory.py``), caps the evaluation batch to fit beside them, plans every job
from where its checkpoint stands, and logs the plan (the "useful work" line).
Every process makes the same plan.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from typing import Any

from absl import logging
import jax
import ml_collections

from skrd4ad_jax.training import memory, parallel, schedule
from skrd4ad_jax.training.jobs import Job


@dataclasses.dataclass(frozen=True)
class SlotPlan:
  """The run's slots and what each of them runs.

  Attributes:
    slots_per_device: slots on each device (chosen or checked against memory).
    memory: the step's memory estimate; None where no device limit is known.
    mesh: the device mesh.
    num_slots: slots in all.
    segments: per slot, the job segments it runs in order.
    local: the slots this process feeds.
    local_categories: the categories of the jobs in those slots.
  """

  slots_per_device: int
  memory: memory.SlotMemory | None
  mesh: Any
  num_slots: int
  segments: list[list[schedule.Segment]]
  local: frozenset[int]
  local_categories: list[str]

  @property
  def horizon(self) -> int:
    """Loop iterations until every slot has run its segments."""
    return max(schedule.slot_loads(self.segments), default=0)

  def owner(self, slot: int) -> int:
    """The process that evaluates the job in ``slot`` and writes its files."""
    return parallel.slot_owner(self.num_slots, self.mesh, slot)

  def sharding(self, slot: int):
    return parallel.slot_sharding(self.num_slots, self.mesh, slot)

  def finished_here(self, jobs: dict[str, Job]) -> list[Job]:
    """The jobs whose last segment ran in one of this process's slots."""
    return [
      jobs[seg.job]
      for slot in self.local
      for seg in self.segments[slot]
      if seg.stop == jobs[seg.job].total_steps
    ]


def make_plan(
  config: ml_collections.ConfigDict,
  method,
  teacher_vars: Any,
  batch_template: Callable[[], dict[str, Any]],
  jobs: dict[str, Job],
  categories: list[str],
) -> SlotPlan:
  """The slot plan of ``jobs`` from their current steps; logs it.

  Lowers ``config.eval.batch_size`` in place when it does not fit beside the slots.

  Raises:
    ConfigError: the requested slots (or a single slot) do not fit in memory.
  """
  devices = jax.devices()
  data_axis = int(config.parallel.data_axis_size)
  loads = {j.name: max(0, j.total_steps - j.step) for j in jobs.values()}
  per_device, mem = memory.choose_slots_per_device(
    method,
    config,
    teacher_vars,
    batch_template,
    loads,
    max(1, len(devices) // data_axis),
    devices[0],
  )
  memory.cap_eval_batch(config, mem, per_device)
  mesh = parallel.make_mesh(len(jobs), data_axis)
  num_slots = parallel.num_slots(mesh, per_device)
  starts = {j.name: (min(j.step, j.total_steps), j.total_steps) for j in jobs.values()}
  segments = schedule.plan_slots(starts, num_slots)
  local = frozenset(parallel.local_slots(num_slots, mesh))
  local_jobs = {seg.job for s in local for seg in segments[s]}
  local_categories = [c for c in categories if any(jobs[j].category == c for j in local_jobs)]
  logging.info(
    "process %d/%d: %d job(s) on %d slot(s) (%d per device), useful work %.1f %%; %s; "
    "this process: slots %s, categories %s",
    jax.process_index(),
    jax.process_count(),
    len(jobs),
    num_slots,
    per_device,
    100 * schedule.useful_fraction(segments),
    mem.summary(per_device) if mem else "no device memory limit known",
    sorted(local),
    ", ".join(local_categories) or "none",
  )
  return SlotPlan(per_device, mem, mesh, num_slots, segments, local, local_categories)
