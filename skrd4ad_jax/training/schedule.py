"""Jobs, schedules and slots: which category (and seed) trains where, and when.

A run trains one *job* per category and seed. Jobs are independent: each has its
own schedule (its epochs over its own training set), its own PRNG seed and its
own checkpoints, and its numbers are a function of (seed, category, step) only.
The device mesh offers a fixed number of *slots* (devices x slots per device);
one jitted step advances every slot by one step of the job it holds.

``plan_slots`` lays the jobs out on the slots with McNaughton's wrap-around
rule: the jobs, longest first, fill slot 0 up to the length C = max(longest
job, total / slots), then slot 1, and so on; a job cut at the end of a slot
runs its first steps at the start of the next slot and its last steps at the
end of this one (never both at once, since no job is longer than C). Between
its two segments the job waits in its checkpoint, as a resumed run would. So
every slot is busy until C and the useful share of the slots' step-time is
total / (slots x C): 100 % whenever no single job is longer than the average
load. With MVTec AD's 15 categories at 200 epochs that holds for 1, 2, 4 and 8
slots (``python -m skrd4ad_jax.training.schedule``); without cutting a job the
best plan for 8 slots reaches 92.9 % (its longest queue cannot be shorter than
28 x 200 steps), and one slot per category 63 %.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import math

from skrd4ad_jax.categories import MVTEC_TRAIN_COUNTS
from skrd4ad_jax.config import validation
from skrd4ad_jax.config.validation import ConfigError

# The number of slots ``auto`` may give one accelerator.
MAX_AUTO_SLOTS_PER_DEVICE = 8
# ``auto`` takes the most slots whose plan keeps at least this share useful.
AUTO_MIN_USEFUL = 0.95


@dataclasses.dataclass
class Schedule:
  """One job's training schedule, in steps of ``batch_size`` images."""

  epochs: int
  steps_per_epoch: int
  total_steps: int
  eval_every: int  # steps; 0 = only the final evaluation
  checkpoint_every: int  # steps; 0 = only the final checkpoint


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
  per_category, problems = validation.parse_category_values(
    train_cfg.category_epochs, "train.category_epochs"
  )
  if problems:  # (the entry points' preflight reports this before any work)
    raise ConfigError(problems)
  epochs = per_category.get(category, int(train_cfg.epochs))
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


def job_name(category: str, seed_index: int) -> str:
  """A job's name, also its folder in the workdir: the category for seed 0."""
  return category if seed_index == 0 else f"{category}/seed_{seed_index}"


@dataclasses.dataclass(frozen=True)
class Segment:
  """A stretch of one job on one slot: the job's steps ``[start, stop)``.

  ``begin`` is the loop iteration at which it starts; it occupies iterations
  ``[begin, begin + stop - start)``. A segment with ``start == stop`` only
  evaluates (a job restored at its last step).
  """

  job: str
  start: int
  stop: int
  begin: int

  @property
  def length(self) -> int:
    return self.stop - self.start

  @property
  def end(self) -> int:
    return self.begin + self.length


def plan_slots(jobs: Mapping[str, tuple[int, int]], num_slots: int) -> list[list[Segment]]:
  """Lays the jobs out on ``num_slots`` slots (McNaughton's wrap-around rule).

  Args:
    jobs: {job name: (first step to run, total steps)}; a job restored at its
      total step gets an evaluation-only segment.
    num_slots: number of slots (>= 1).

  Returns:
    Per slot, its segments in time order. Deterministic: jobs are taken
    longest first, ties by name; evaluation-only jobs come first. When whole
    jobs (longest first onto the least loaded slot) already fit the
    wrap-around length, no job is cut.
  """
  if num_slots < 1:
    raise ValueError(f"num_slots must be >= 1, got {num_slots}.")
  left = {job: total - start for job, (start, total) in jobs.items()}
  if any(v < 0 for v in left.values()):
    raise ValueError(f"A job starts past its last step: {dict(jobs)}.")
  plan: list[list[Segment]] = [[] for _ in range(num_slots)]
  done = sorted(j for j, n in left.items() if n == 0)
  for i, job in enumerate(done):
    start = jobs[job][0]
    plan[i % num_slots].append(Segment(job, start, start, 0))
  todo = sorted((j for j, n in left.items() if n > 0), key=lambda j: (-left[j], j))
  if not todo:
    return plan
  length = max(max(left[j] for j in todo), math.ceil(sum(left[j] for j in todo) / num_slots))
  # Whole jobs, longest first onto the least loaded slot, when that is as short:
  # a cut costs a checkpoint write and read.
  whole: list[list[Segment]] = [list(q) for q in plan]
  ends = [0] * num_slots
  for job in todo:
    slot = min(range(num_slots), key=lambda k: (ends[k], k))
    whole[slot].append(Segment(job, jobs[job][0], jobs[job][0] + left[job], ends[slot]))
    ends[slot] += left[job]
  if max(ends) <= length:
    return whole
  slot, time = 0, 0
  for job in todo:
    start, n = jobs[job][0], left[job]
    if time + n <= length:
      plan[slot].append(Segment(job, start, start + n, time))
      time += n
    else:
      # Its last steps end this slot; its first steps open the next one.
      head = n - (length - time)
      plan[slot + 1].append(Segment(job, start, start + head, 0))
      plan[slot].append(Segment(job, start + head, start + n, time))
      slot, time = slot + 1, head
    if time == length and slot + 1 < num_slots:
      slot, time = slot + 1, 0
  for queue in plan:
    queue.sort(key=lambda seg: (seg.begin, seg.length))
  return plan


def slot_loads(plan: Sequence[Sequence[Segment]]) -> list[int]:
  """The iteration at which each slot's last segment ends."""
  return [max((seg.end for seg in queue), default=0) for queue in plan]


def useful_fraction(plan: Sequence[Sequence[Segment]]) -> float:
  """Share of the slots' step-time spent on jobs: steps / (slots x longest slot)."""
  longest = max(slot_loads(plan), default=0)
  if longest == 0:
    return 1.0
  steps = sum(seg.length for queue in plan for seg in queue)
  return steps / (len(plan) * longest)


def auto_slots_per_device(
  loads: Mapping[str, int], num_devices: int, platform: str, max_slots: int | None = None
) -> int:
  """The default number of slots per device (``parallel.slots_per_device=0``).

  On CPU one slot per device: several slots on one CPU device compute one
  after another anyway, and each costs a state's memory. On accelerators the
  most slots (up to ``MAX_AUTO_SLOTS_PER_DEVICE``, no more than there are
  jobs, and no more than ``max_slots``: what fits in the device's memory,
  ``memory.SlotMemory.max_slots``) whose plan keeps ``AUTO_MIN_USEFUL`` of the
  step-time useful: more slots fill a large device better, until some would
  idle.
  """
  if platform == "cpu" or not loads:
    return 1
  most = min(MAX_AUTO_SLOTS_PER_DEVICE, math.ceil(len(loads) / num_devices))
  if max_slots is not None:
    most = max(1, min(most, max_slots))
  jobs = {job: (0, n) for job, n in loads.items()}
  for per_device in range(most, 0, -1):
    if useful_fraction(plan_slots(jobs, per_device * num_devices)) >= AUTO_MIN_USEFUL:
      return per_device
  return 1


def mvtec_loads(
  epochs: int = 200, batch_size: int = 16, val_fraction: float = 0.1
) -> dict[str, int]:
  """Step budgets of MVTec AD's 15 categories under the official recipe."""
  out = {}
  for category, n in MVTEC_TRAIN_COUNTS.items():
    held_out = validation_count(n, val_fraction)
    out[category] = epochs * max(1, math.ceil((n - held_out) / batch_size))
  return out


def validation_count(num_images: int, fraction: float) -> int:
  """How many images ``data.folder.validation_indices`` holds out (without the data)."""
  if fraction <= 0 or num_images < 2:
    return 0
  return min(num_images - 1, max(1, int(round(num_images * fraction))))


def plan_table(loads: Mapping[str, int], slot_counts: Sequence[int] = (1, 2, 4, 8)) -> list[dict]:
  """Useful-work fraction of the plan for each slot count (and one slot per job)."""
  rows = []
  jobs = {job: (0, n) for job, n in loads.items()}
  for slots in list(slot_counts) + [len(loads)]:
    plan = plan_slots(jobs, slots)
    rows.append(
      {
        "slots": slots,
        "useful_fraction": useful_fraction(plan),
        "longest_slot_steps": max(slot_loads(plan)),
        "total_steps": sum(loads.values()),
        "jobs_cut": sum(len(q) for q in plan) - len(loads),
        "plan": [[dataclasses.asdict(seg) for seg in q] for q in plan],
      }
    )
  return rows


def main() -> None:
  loads = mvtec_loads()
  print("MVTec AD, 200 epochs, batch 16, 10 % held out: steps per category")
  print(", ".join(f"{c} {n}" for c, n in sorted(loads.items())))
  for row in plan_table(loads):
    print(
      f"{row['slots']:>3} slot(s): useful work {100 * row['useful_fraction']:5.1f} %, longest "
      f"slot {row['longest_slot_steps']} of {row['total_steps']} steps, "
      f"{row['jobs_cut']} job(s) cut in two"
    )


if __name__ == "__main__":
  main()
