"""Jobs on slots: the plan keeps every slot busy, never runs a job twice at once."""

import itertools

import numpy as np
import pytest

from skrd4ad_jax.training import batches, schedule


def check_plan(plan, jobs):
  """Every job's steps run exactly once, in order, never on two slots at the same time."""
  by_job = {}
  for queue in plan:
    for a, b in itertools.pairwise(queue):
      assert a.end <= b.begin, (a, b)  # a slot holds one segment at a time
    for seg in queue:
      by_job.setdefault(seg.job, []).append(seg)
  assert set(by_job) == set(jobs)
  for job, segs in by_job.items():
    segs.sort(key=lambda g: g.start)
    start, total = jobs[job]
    assert segs[0].start == start and segs[-1].stop == total, (job, segs)
    for a, b in itertools.pairwise(segs):
      assert a.stop == b.start and a.end <= b.begin, (job, segs)  # in order, never overlapping


def test_mvtec_plan_is_at_least_95_percent_useful_on_1_2_4_8_slots():
  loads = schedule.mvtec_loads()
  assert sum(loads.values()) == 41600 and loads["hazelnut"] == 4400 and loads["toothbrush"] == 800
  jobs = {j: (0, n) for j, n in loads.items()}
  for slots in (1, 2, 4, 8):
    plan = schedule.plan_slots(jobs, slots)
    check_plan(plan, jobs)
    assert schedule.useful_fraction(plan) >= 0.95, slots
  # One slot per category, as when all train in lock-step: the 63 % of before.
  lockstep = schedule.plan_slots(jobs, 15)
  assert schedule.useful_fraction(lockstep) == pytest.approx(41600 / (15 * 4400))


@pytest.mark.parametrize("seed", range(20))
def test_random_plans_are_valid_and_as_short_as_the_bound(seed):
  rng = np.random.default_rng(seed)
  n_jobs, slots = int(rng.integers(1, 12)), int(rng.integers(1, 6))
  jobs = {}
  for i in range(n_jobs):
    total = int(rng.integers(0, 50))
    jobs[f"j{i}"] = (int(rng.integers(0, total + 1)), total)
  plan = schedule.plan_slots(jobs, slots)
  check_plan(plan, jobs)
  left = [total - start for start, total in jobs.values()]
  bound = max([max(left, default=0), -(-sum(left) // slots)])
  assert max(schedule.slot_loads(plan), default=0) == bound


def test_whole_jobs_are_not_cut_when_they_fit():
  jobs = {"a": (0, 10), "b": (0, 6), "c": (0, 4)}
  plan = schedule.plan_slots(jobs, 2)
  assert sorted(len(q) for q in plan) == [1, 2]  # a | b + c
  assert max(schedule.slot_loads(plan)) == 10


def test_finished_jobs_only_evaluate_first():
  plan = schedule.plan_slots({"done": (7, 7), "a": (0, 3)}, 1)
  assert [(g.job, g.length, g.begin) for g in plan[0]] == [("done", 0, 0), ("a", 3, 0)]


def test_auto_slots_on_accelerators_keep_the_plan_useful():
  loads = schedule.mvtec_loads()
  assert schedule.auto_slots_per_device(loads, 1, "cpu") == 1
  per_device = schedule.auto_slots_per_device(loads, 1, "gpu")
  assert per_device == schedule.MAX_AUTO_SLOTS_PER_DEVICE
  jobs = {j: (0, n) for j, n in loads.items()}
  assert schedule.useful_fraction(schedule.plan_slots(jobs, per_device)) >= 0.95


def test_batches_are_a_pure_function_of_seed_and_step():
  n, b = 7, 3
  seq = [batches.batch_indices(5, t, n, b) for t in range(14)]  # 6 epochs
  flat = np.concatenate(seq)
  for e in range(6):
    assert sorted(flat[e * n : (e + 1) * n].tolist()) == list(range(n))
  # Step 9 alone (a resumed run) sees what the run from step 0 saw.
  np.testing.assert_array_equal(batches.batch_indices(5, 9, n, b), seq[9])
  assert not np.array_equal(batches.batch_indices(6, 0, n, b), seq[0])
  # A batch larger than the training set wraps over epochs.
  assert len(batches.batch_indices(0, 0, 2, 5)) == 5
