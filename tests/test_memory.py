"""Slots that fit in device memory, and errors that help when memory runs out.

The estimate compiles the tiny config's steps on CPU (XLA:CPU has a memory
analysis too); a small limit is injected with ``config.parallel.device_memory_gb``.
"""

import dataclasses
import os
import subprocess
import sys
import textwrap

from conftest import PILLOW
import pytest

from skrd4ad_jax.config import load_config
from skrd4ad_jax.config.validation import ConfigError
from skrd4ad_jax.training import memory, preflight, schedule

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30


def tiny_config():
  from skrd4ad_jax.teachers import recipe

  return recipe.resolve(load_config(os.path.join(REPO, "configs", "tiny.py")))


@pytest.fixture(scope="module")
def tiny_estimate():
  """(config, SlotMemory without a limit) of configs/tiny.py: four small compiles."""
  import numpy as np

  from skrd4ad_jax import methods, teachers

  config = tiny_config()
  method = methods.build_method(config)
  teacher_vars = teachers.load_teacher_variables(config.model.teacher, "random", image_size=64)
  size, bs = int(config.data.image_size), int(config.train.batch_size)
  template = method.make_batch(
    np.zeros((bs, size, size, 3), np.float32), np.random.default_rng(0), ""
  )
  return config, memory.estimate(method, config, teacher_vars, template)


def limit_for(mem, slots):
  """A device limit (GiB) under which ``slots`` fit and ``slots + 1`` do not."""
  usable = (mem.train_bytes(slots) + mem.train_bytes(slots + 1)) / 2
  return usable / mem.margin / GIB


def test_estimate_of_the_tiny_step(tiny_estimate):
  _, mem = tiny_estimate
  # A slot holds at least its state (parameters, BatchNorm statistics, Adam's moments).
  assert mem.per_slot_bytes >= mem.state_bytes > 0
  assert mem.eval_bytes_per_image > 0 and mem.eval_fixed_bytes > 0
  assert mem.limit_bytes is None and mem.max_slots() is None and mem.max_eval_batch(4) is None
  assert mem.fits(1000)


def test_linear_model_slots_and_eval_batch():
  mem = memory.SlotMemory(
    per_slot_bytes=3 * GIB,
    fixed_bytes=1 * GIB,
    state_bytes=GIB // 2,
    eval_fixed_bytes=GIB,
    eval_bytes_per_image=GIB // 8,
    limit_bytes=10 * GIB,
    margin=1.0,
  )
  assert mem.train_bytes(3) == 10 * GIB and mem.fits(3) and not mem.fits(4)
  assert mem.max_slots() == 3
  # Beside 3 resident states (1.5 GiB) and the fixed 1 GiB: 7.5 GiB / 0.125 GiB = 60 images.
  assert mem.max_eval_batch(3) == 60
  assert "3.00 GiB per slot" in mem.summary(3) and "limit 10.0 GiB" in mem.summary(3)
  too_small = dataclasses.replace(mem, limit_bytes=3 * GIB)
  assert too_small.max_slots() == 0


def test_auto_slots_are_capped_by_memory():
  loads = schedule.mvtec_loads()
  free = schedule.auto_slots_per_device(loads, 1, "gpu")
  assert free > 2
  assert schedule.auto_slots_per_device(loads, 1, "gpu", max_slots=2) == 2
  assert schedule.auto_slots_per_device(loads, 1, "gpu", max_slots=1) == 1
  assert schedule.auto_slots_per_device(loads, 1, "gpu", max_slots=100) == free


class FakeAccelerator:
  """A device that reports no memory limit, on an accelerator platform (auto > 1 slot)."""

  platform = "gpu"
  device_kind = "fake"

  def memory_stats(self):
    return {}


def test_auto_picks_what_fits_and_explicit_slots_that_do_not_fit_stop(tiny_estimate, monkeypatch):
  _, mem = tiny_estimate
  config = tiny_config()
  monkeypatch.setattr(
    memory, "estimate", lambda *a, **k: dataclasses.replace(mem, limit_bytes=a[4])
  )
  loads = {f"job{i}": 100 for i in range(6)}
  args = (None, config, None, dict, loads, 1, FakeAccelerator())
  config.parallel.device_memory_gb = 0.0
  # No limit known: the schedule alone decides (several jobs: several slots).
  assert memory.choose_slots_per_device(*args) == (6, None)
  config.parallel.device_memory_gb = limit_for(mem, 1)
  slots, est = memory.choose_slots_per_device(*args)
  assert slots == 1 and est.max_slots() == 1
  config.parallel.device_memory_gb = limit_for(mem, 4)
  assert memory.choose_slots_per_device(*args)[0] == 4
  config.parallel.slots_per_device = 5
  with pytest.raises(ConfigError, match=r"slots_per_device=5 does not fit.*at most 4 fit"):
    memory.choose_slots_per_device(*args)
  config.parallel.device_memory_gb = mem.train_bytes(1) / 2 / GIB
  config.parallel.slots_per_device = 0
  with pytest.raises(ConfigError, match="Not even one slot fits"):
    memory.choose_slots_per_device(*args)


def test_eval_batch_is_capped_with_a_log_line(tiny_estimate, caplog):
  _, mem = tiny_estimate
  config = tiny_config()
  config.eval.batch_size = 8
  mem = dataclasses.replace(mem, limit_bytes=int(mem.eval_bytes(2, 3.5) / mem.margin))
  with caplog.at_level(
    "INFO", logger="absl"
  ):  # (an export in the same session sets absl to WARNING)
    assert memory.cap_eval_batch(config, mem, 2) == 3
  assert config.eval.batch_size == 3
  assert "config.eval.batch_size 8 lowered to 3" in caplog.text
  # Enough room: unchanged.
  assert memory.cap_eval_batch(config, dataclasses.replace(mem, limit_bytes=None), 2) == 3


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory):
  from skrd4ad_jax.data import demo_data

  return demo_data.ensure_demo_dataset(
    str(tmp_path_factory.mktemp("memory_data")),
    seed=0,
    image_size=64,
    num_train=4,
    num_test_good=2,
    num_test_per_defect=1,
  )


@pytest.mark.slow  # compiles the tiny step again inside the trainer (half a minute)
def test_trainer_stops_before_training_when_explicit_slots_cannot_fit(
  tiny_estimate, tiny_tree, tmp_path
):
  from skrd4ad_jax.training import train

  _, mem = tiny_estimate
  config = load_config(os.path.join(REPO, "configs", "tiny.py") + ":brick,grass")
  config.data.root = tiny_tree
  config.parallel.slots_per_device = 3
  config.parallel.device_memory_gb = limit_for(mem, 1)
  with pytest.raises(ConfigError) as e:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  (line,) = e.value.problems
  assert "slots_per_device=3 does not fit" in line and "at most 1 fit" in line
  assert f"{mem.per_slot_bytes / GIB:.2f} GiB per slot" in line
  assert f"limit {config.parallel.device_memory_gb:.2f} GiB" in line
  assert "batch size 4, image size 64 px, dtype float32" in line
  assert not os.path.exists(tmp_path / "run" / "brick" / "checkpoints")


def test_trainer_plan_line_names_the_estimate_and_the_limit(
  tiny_estimate, tiny_tree, tmp_path, monkeypatch, caplog
):
  from skrd4ad_jax.training import slots, train

  _, mem = tiny_estimate
  # The real estimate is compiled in the test above; reuse it here.
  monkeypatch.setattr(
    memory,
    "estimate",
    lambda *a, **k: dataclasses.replace(mem, limit_bytes=a[4], limit_source=a[5]),
  )
  plans = []
  make_plan = slots.make_plan

  def plan_only(*args, **kwargs):
    plans.append(make_plan(*args, **kwargs))
    raise PlanMade  # nothing is trained

  monkeypatch.setattr(slots, "make_plan", plan_only)
  config = load_config(os.path.join(REPO, "configs", "tiny.py") + ":brick,grass")
  config.data.root = tiny_tree
  config.parallel.device_memory_gb = limit_for(mem, 1)
  with caplog.at_level(
    "INFO", logger="absl"
  ):  # (an export in the same session sets absl to WARNING)
    with pytest.raises(PlanMade):
      train.train_and_evaluate(config, str(tmp_path / "run"))
  (plan,) = plans
  assert plan.slots_per_device == 1 and plan.memory is not None
  plan = next(r.getMessage() for r in caplog.records if "useful work" in r.getMessage())
  assert f"~{mem.per_slot_bytes / GIB:.2f} GiB per slot" in plan
  assert "config.parallel.device_memory_gb" in plan and "at most 1 slot(s) per device" in plan


class PlanMade(Exception):
  """Stops a run once its slot plan is made."""


FAKE_MAIN = textwrap.dedent(
  """
  import runpy, sys
  from skrd4ad_jax.training import memory, train

  def fake_train_and_evaluate(config, workdir, eval_only=False, source=None, prepared=False):
    error = {error}
    if memory.is_out_of_memory(error):
      # What train_and_evaluate raises on a device out-of-memory once 3 slots are planned.
      raise memory.OutOfMemory(config, 3) from error
    raise error

  train.train_and_evaluate = fake_train_and_evaluate
  sys.argv = ["main"] + sys.argv[1:]
  runpy.run_module("skrd4ad_jax.main", run_name="__main__")
  """
)


def run_fake_main(error, tmp_path, *flags):
  # The fake training reads no image.
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3", **PILLOW)
  workdir = tmp_path / "run"
  proc = subprocess.run(
    [
      sys.executable,
      "-c",
      FAKE_MAIN.format(error=error),
      f"--config={os.path.join(REPO, 'configs', 'tiny.py')}",
      f"--config.data.root={tmp_path}",
      f"--workdir={workdir}",
      *flags,
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  return proc.returncode, proc.stdout + proc.stderr, workdir


OOM = (
  "__import__('jax').errors.JaxRuntimeError('RESOURCE_EXHAUSTED: Out of memory while trying "
  "to allocate 12884901888 bytes.')"
)


def test_out_of_memory_names_the_setting_and_keeps_the_traceback_in_the_workdir(tmp_path):
  code, out, workdir = run_fake_main(OOM, tmp_path)
  assert code == 1
  lines = [x for x in out.splitlines() if x.startswith("error: ")]
  assert len(lines) == 1 and "Traceback (most recent call last)" not in out
  (line,) = lines
  for part in (
    "3 slot(s) per device",
    "batch size 4",
    "image size 64 px",
    "dtype float32",
    "slots_per_device",
    "bfloat16",
    str(workdir / "error.log"),
  ):
    assert part in line, part
  log = (workdir / "error.log").read_text()
  assert "Traceback" in log and "RESOURCE_EXHAUSTED" in log
  assert "fake_train_and_evaluate" not in line


def test_out_of_memory_with_verbosity_prints_the_traceback(tmp_path):
  code, out, _ = run_fake_main(OOM, tmp_path, "--verbosity=1")
  assert code == 1
  assert "Traceback (most recent call last)" in out
  assert "error: Out of device memory with 3 slot(s)" in out


def test_a_generic_runtime_error_keeps_its_traceback(tmp_path):
  code, out, workdir = run_fake_main("RuntimeError('an internal invariant broke')", tmp_path)
  assert code != 0
  assert "Traceback" in out and "an internal invariant broke" in out
  assert not [x for x in out.splitlines() if x.startswith("error: ")]
  assert "an internal invariant broke" in (workdir / "error.log").read_text()


def test_training_failed_is_one_line(tmp_path):
  error = "__import__('skrd4ad_jax.errors').errors.TrainingFailed('Training failed for brick: x')"
  code, out, _ = run_fake_main(error, tmp_path)
  assert code == 1 and "error: Training failed for brick: x" in out and "Traceback" not in out


def test_device_memory_gb_is_checked():

  config = load_config(os.path.join(REPO, "configs", "tiny.py"))
  config.parallel.device_memory_gb = -1.0
  (problem,) = [p for p in preflight.problems(config) if "device_memory_gb" in p]
  assert "must be in [0, inf]" in problem and "0 = what the device reports" in problem
