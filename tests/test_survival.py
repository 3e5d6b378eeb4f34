"""Long runs survive: damaged checkpoints, kills at named points, failing disks, signals.

Everything runs ``python -m skrd4ad_jax.main`` on ``configs/tiny.py`` as a user
would. Faults come from ``SKRD4AD_FAULT`` (``skrd4ad_jax/faults.py``):
``point:count:action`` acts the count-th time the run reaches that point.
"""

import csv
import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

from conftest import PILLOW
import numpy as np
import pytest

from skrd4ad_jax import faults
from skrd4ad_jax.training import checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = (
  "image_auroc",
  "pixel_auroc",
  "pixel_aupro",
  "pixel_aupro_rd4ad",
  "image_f1max",
  "pixel_ap",
  "image_f1_at_threshold",
  "image_precision",
  "image_recall",
)
# What the console may never show, whatever is damaged.
NOISE = ("Traceback", "tensorstore", "TensorStore", "asyncio", "Event loop is closed", "coroutine")


def env(**extra):
  return dict(
    os.environ,
    PYTHONPATH=REPO,
    TF_CPP_MIN_LOG_LEVEL="3",
    JAX_PLATFORMS="cpu",
    PYTHONUNBUFFERED="1",
    # What survives does not depend on the decoder.
    **PILLOW,
    **extra,
  )


def main(workdir, data_root, *extra, fault=None, categories="brick", timeout=600):
  """``python -m skrd4ad_jax.main`` on the tiny config; (exit status, console output)."""
  args = [
    f"--config=configs/tiny.py:{categories}",
    f"--config.data.root={data_root}",
    f"--workdir={workdir}",
    "--config.eval.tensorboard_pictures=0",
    # What survives does not depend on TensorBoard; its writer imports TensorFlow (~3 s a run).
    "--config.train.tensorboard=False",
    *extra,
  ]
  extra_env = {faults.ENV: fault} if fault else {}
  return run_module("skrd4ad_jax.main", *args, timeout=timeout, **extra_env)


def run_module(module, *args, timeout=600, **extra_env):
  """``python -m module args`` from the repository; (exit status, console output)."""
  proc = subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=REPO,
    env=env(**extra_env),
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  return proc.returncode, proc.stdout + proc.stderr


def read_metrics(workdir):
  with open(os.path.join(workdir, "results.csv"), newline="") as f:
    return {r["category"]: {m: r[m] for m in METRICS} for r in csv.DictReader(f)}


def steps_of(workdir, job="brick"):
  directory = checkpoints.checkpoint_dir(str(workdir), job)
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def state_digest(workdir, job):
  """sha256 of the newest checkpoint's arrays and of its metrics (the same bytes = the same)."""
  import jax

  from skrd4ad_jax import methods
  from skrd4ad_jax.config import load_config

  method = methods.build_method(load_config(os.path.join(REPO, "configs", "tiny.py")))
  abstract = jax.eval_shape(lambda: method.init(jax.random.PRNGKey(0), None))
  manager = checkpoints.make_manager(str(workdir), job, read_only=True)
  state, meta = checkpoints.restore(manager, abstract, report=pytest.fail)
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(state):
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  h.update(json.dumps([meta["step"], meta.get("metrics"), meta.get("thresholds")]).encode())
  return h.hexdigest()


def warning_lines(out):
  return [line for line in out.splitlines() if "cannot be read" in line]


def error_lines(out):
  return [line for line in out.splitlines() if line.startswith("error: ")]


def assert_quiet(out):
  for word in NOISE:
    assert word not in out, (word, out[-3000:])


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  from skrd4ad_jax.data import demo_data

  return demo_data.ensure_demo_dataset(
    str(tmp_path_factory.mktemp("survival_data")),
    seed=0,
    image_size=64,
    num_train=8,
    num_test_good=3,
    num_test_per_defect=1,
  )


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root):
  """A finished run of brick (2 epochs, 2 steps each, a checkpoint per epoch): steps 2, 4."""
  workdir = str(tmp_path_factory.mktemp("survival_trained") / "run")
  code, out = main(workdir, data_root)
  assert code == 0, out[-3000:]
  assert steps_of(workdir) == [2, 4]
  # train.tensorboard=False: the scalars are in the log, no TensorBoard run is written.
  assert "[brick] step 4: " in out and "eval/image_auroc=" in out, out[-3000:]
  assert not glob.glob(os.path.join(workdir, "brick", "events.out.tfevents.*"))
  return workdir


def copy_of(trained, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(trained, workdir)
  return workdir


# ---------------------------------------------------------------------------
# 1 and 2: a damaged checkpoint is set aside for good, in one quiet line.


def step_path(workdir, step):
  return os.path.join(checkpoints.checkpoint_dir(workdir, "brick"), str(step))


def largest_array_file(step):
  files = glob.glob(os.path.join(step, "state", "ocdbt.process_*", "d", "*"))
  return max(files, key=os.path.getsize)


def truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def garbage(path):
  with open(path, "wb") as f:
    f.write(os.urandom(64) + b"{not json")


DAMAGES = {
  "truncated array file": lambda d: truncate(largest_array_file(d)),
  "removed array file": lambda d: os.remove(largest_array_file(d)),
  "garbage array file": lambda d: garbage(largest_array_file(d)),
  "garbage OCDBT manifest": lambda d: garbage(os.path.join(d, "state", "manifest.ocdbt")),
  "garbage JSON item": lambda d: garbage(os.path.join(d, "meta", "metadata")),
  "garbage checkpoint metadata": lambda d: garbage(os.path.join(d, "_CHECKPOINT_METADATA")),
}


def check_damage_is_set_aside(trained, data_root, tmp_path, damage, extra=(), rerun=True):
  """The damaged step 4 is renamed aside in one quiet line and the run finishes.

  ``rerun``: one more run prints no warning (the renamed folder is never read
  again, whatever the damage was: checked on the issue's case).
  """
  workdir = copy_of(trained, tmp_path)
  DAMAGES[damage](step_path(workdir, 4))
  code, out = main(workdir, data_root, *extra)
  assert code == 0, out[-3000:]
  assert_quiet(out)
  (line,) = warning_lines(out)
  assert "[brick] checkpoint step 4 cannot be read" in line
  assert "renamed to 4.damaged" in line and "using step 2" in line, line
  assert "[brick] checkpoint at step 2 of" in out
  assert os.path.isdir(step_path(workdir, 4) + ".damaged")
  assert os.path.exists(os.path.join(workdir, "results.csv"))
  if rerun:  # the set-aside step never trips a later run
    code, out = main(workdir, data_root, *extra)
    assert code == 0 and not warning_lines(out), out[-3000:]
  return workdir


def test_truncated_latest_checkpoint_is_set_aside_and_the_longer_run_finishes(
  trained, data_root, tmp_path
):
  """The issue's case: step 4's largest file cut in half, then three epochs instead of two."""
  workdir = check_damage_is_set_aside(
    trained, data_root, tmp_path, "truncated array file", ["--config.train.epochs=3"]
  )
  assert steps_of(workdir)[-1] == 6
  with open(os.path.join(step_path(workdir, 6), "meta", "metadata")) as f:
    assert json.load(f)["final"]
  # The details are kept next to the checkpoints, not on the console.
  with open(os.path.join(workdir, "brick", checkpoints.DETAIL_LOG)) as f:
    assert "step 4" in f.read()


@pytest.mark.slow
@pytest.mark.parametrize("damage", sorted(set(DAMAGES) - {"truncated array file"}))
def test_each_damage_is_set_aside_and_the_run_finishes(trained, data_root, tmp_path, damage):
  check_damage_is_set_aside(trained, data_root, tmp_path, damage, rerun=False)


@pytest.mark.slow
def test_no_readable_checkpoint_means_a_fresh_start(trained, data_root, tmp_path):
  workdir = copy_of(trained, tmp_path)
  for step in (2, 4):
    garbage(os.path.join(step_path(workdir, step), "state", "manifest.ocdbt"))
  code, out = main(workdir, data_root)
  assert code == 0, out[-3000:]
  assert_quiet(out)
  lines = warning_lines(out)
  assert len(lines) == 2 and "no older step is left" in lines[1], lines
  assert steps_of(workdir) == [2, 4]
  assert os.path.isdir(step_path(workdir, 2) + ".damaged")


@pytest.mark.slow
def test_eval_only_uses_the_newest_readable_checkpoint(trained, data_root, tmp_path):
  workdir = copy_of(trained, tmp_path)
  truncate(largest_array_file(step_path(workdir, 4)))
  code, out = main(workdir, data_root, "--eval_only")
  assert code == 0, out[-3000:]
  assert_quiet(out)
  (line,) = warning_lines(out)
  assert "step 4" in line and "using step 2" in line
  assert steps_of(workdir) == [2]  # evaluated at step 2, nothing trained


@pytest.mark.slow
def test_predict_skips_a_damaged_checkpoint_quietly(trained, tmp_path):
  from skrd4ad_jax.data import demo_data

  workdir = copy_of(trained, tmp_path)
  truncate(largest_array_file(step_path(workdir, 4)))
  images = demo_data.ensure_demo_dataset(
    str(tmp_path / "images"), seed=1, image_size=64, num_train=1, num_test_good=1
  )
  code, out = run_module(
    "skrd4ad_jax.predict",
    f"--workdir={workdir}",
    "--category=brick",
    f"--input={os.path.join(images, 'brick', 'test')}",
    f"--output={tmp_path / 'out'}",
  )
  assert code == 0, out[-3000:]
  assert_quiet(out)
  assert "step 4" in out


@pytest.mark.slow
def test_export_judges_the_checkpoint_it_would_export(trained, tmp_path):
  """Step 4 (final) damaged: export falls back to step 2, which is not final, and says so."""
  workdir = copy_of(trained, tmp_path)
  truncate(largest_array_file(step_path(workdir, 4)))
  code, out = run_module(
    "skrd4ad_jax.export",
    f"--workdir={workdir}",
    "--category=brick",
    "--format=onnx",
    f"--output={tmp_path / 'out'}",
  )
  assert code == 1, out[-3000:]
  assert_quiet(out)
  (line,) = error_lines(out)
  assert "(step 2 of 4) is not a finished one" in line, line
  assert not os.path.exists(tmp_path / "out" / "brick")


# ---------------------------------------------------------------------------
# 4: a failing disk stops the run in one line; what was written stays; a rerun resumes.


@pytest.mark.parametrize(
  "fault, where",
  [
    pytest.param("checkpoint_write:2:oserror", "checkpoints/4", marks=pytest.mark.slow),
    pytest.param("picture_write:2:readonly", "images/test", marks=pytest.mark.slow),
    pytest.param("results_csv:1:oserror", "results.csv", marks=pytest.mark.slow),
    pytest.param("test_predictions_csv:1:oserror", "test_predictions.csv", marks=pytest.mark.slow),
  ],
)
def test_a_failing_disk_stops_in_one_line_and_the_rerun_resumes(data_root, tmp_path, fault, where):
  workdir = str(tmp_path / "run")
  code, out = main(workdir, data_root, fault=fault)
  assert code == 1, out[-3000:]
  assert_quiet(out)
  (line,) = error_lines(out)
  assert where in line and ("No space left" in line or "Read-only" in line), line
  before = steps_of(workdir)
  assert 2 in before  # written before the failure, intact:
  state_digest(workdir, "brick")
  code, out = main(workdir, data_root)
  assert code == 0, out[-3000:]
  assert steps_of(workdir) == [2, 4]


# ---------------------------------------------------------------------------
# 5: SIGTERM during an evaluation or a save.


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["host_eval:1:term", "checkpoint_write:1:term"])
def test_sigterm_during_evaluation_or_save_keeps_its_promise(data_root, tmp_path, fault):
  workdir = str(tmp_path / "run")
  code, out = main(workdir, data_root, "--config.train.eval_every_epochs=1", fault=fault)
  assert code == 128 + signal.SIGTERM, out[-3000:]
  assert "Stopped by SIGTERM" in out and "Traceback" not in out, out[-3000:]
  steps = steps_of(workdir)
  if fault.startswith("host_eval"):
    assert steps == [2]
  else:
    # The write is asynchronous: the loop goes on stepping until the signal arrives
    # from inside it, then stops at its next iteration (or after the job's end,
    # when the tiny job's last steps were faster than the write).
    assert steps in ([2], [2, 3], [2, 4]), steps
  state_digest(workdir, "brick")
  code, out = main(workdir, data_root, "--config.train.eval_every_epochs=1")
  assert code == 0, out[-3000:]
  if steps[-1] < 4:
    assert f"[brick] checkpoint at step {steps[-1]} of 4" in out
  assert steps_of(workdir)[-1] == 4


@pytest.mark.slow
def test_a_second_sigterm_stops_at_once_and_the_rerun_finishes(trained, data_root, tmp_path):
  """SIGTERM once step 2 is written asks for a checkpoint; a second, at that save, stops now."""
  workdir = str(tmp_path / "run")
  code, out = main(workdir, data_root, fault="checkpoint_saved:1:term,checkpoint_save:2:term")
  assert code == 128 + signal.SIGTERM, out[-3000:]
  assert "Stopped at once by a second SIGTERM" in out, out[-3000:]
  assert "Traceback" not in out, out[-3000:]
  assert_quiet(out)
  directory = checkpoints.checkpoint_dir(workdir, "brick")
  for step in steps_of(workdir):  # only complete steps are listed
    assert os.path.isfile(os.path.join(directory, str(step), "meta", "metadata")), step
  assert steps_of(workdir) == [2]
  state_digest(workdir, "brick")  # the newest complete checkpoint reads
  code, out = main(workdir, data_root)
  assert code == 0, out[-3000:]
  assert steps_of(workdir)[-1] == 4
  assert read_metrics(workdir) == read_metrics(trained)


# ---------------------------------------------------------------------------
# 3: killed at any moment, the same command finishes with an uninterrupted run's results.

# (point:count) in the order a chain of reruns meets them: each rerun is killed at the
# next one; two categories, one slot (brick, then grass), an evaluation every epoch.
KILL_CHAIN = [
  "checkpoint_write:1",  # inside brick's first checkpoint write (a tmp folder is left)
  "host_eval:1",  # in brick's background evaluation at step 2
  "checkpoint_saved:1",  # just after brick's step 2 is complete
  "test_predictions_csv:1",  # brick's final evaluation, its csv
  "picture_write:3",  # brick's final evaluation, amid its pictures
  "checkpoint_save:1",  # before brick's final checkpoint write
  "job_start:2",  # between brick's end and grass's start
  "host_eval:1",  # grass's background evaluation at step 2
  "checkpoint_write:1",  # inside grass's first checkpoint write
  "results_write:1",  # every job finished, before the results
  "results_csv:1",  # writing results.csv
]
# (A rewrite of a finished step, ``checkpoint_replace``, happens only with --eval_only;
# test_robustness.py kills it there by hand.)
CHAIN_FLAGS = ("--config.train.eval_every_epochs=1", "--config.parallel.slots_per_device=1")


@pytest.mark.slow
def test_a_chain_of_kills_ends_with_the_uninterrupted_results(data_root, tmp_path):
  reference = str(tmp_path / "reference")
  code, out = main(reference, data_root, *CHAIN_FLAGS, categories="brick,grass")
  assert code == 0, out[-3000:]
  workdir = str(tmp_path / "killed")
  outcomes = []
  for point in KILL_CHAIN:
    code, out = main(
      workdir, data_root, *CHAIN_FLAGS, fault=f"{point}:kill", categories="brick,grass"
    )
    outcomes.append((point, code))
    assert code == -signal.SIGKILL, (point, out[-3000:])
    assert_quiet(out)
    for job in ("brick", "grass"):
      directory = checkpoints.checkpoint_dir(workdir, job)
      for step in steps_of(workdir, job) if os.path.isdir(directory) else []:
        assert os.path.isfile(os.path.join(directory, str(step), "meta", "metadata"))
  code, out = main(workdir, data_root, *CHAIN_FLAGS, categories="brick,grass")
  assert code == 0, out[-3000:]
  assert_quiet(out)
  assert read_metrics(workdir) == read_metrics(reference)
  for job in ("brick", "grass"):
    assert steps_of(workdir, job) == steps_of(reference, job)
    assert state_digest(workdir, job) == state_digest(reference, job)
