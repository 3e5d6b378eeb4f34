"""Whole runs of the main job: preemption and resume, evaluation-only, the demo end to end."""

import csv
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from conftest import PILLOW
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main_command(*args):
  return [sys.executable, "-m", "skrd4ad_jax.main", *args]


def env(**extra):
  return dict(
    os.environ,
    PYTHONPATH=REPO,
    TF_CPP_MIN_LOG_LEVEL="3",
    JAX_PLATFORMS="cpu",
    PYTHONUNBUFFERED="1",
    **extra,
  )


def run_main(*args, timeout=900, **extra_env):
  """``python -m skrd4ad_jax.main ARGS`` to completion; the CompletedProcess."""
  return subprocess.run(
    main_command(*args),
    cwd=REPO,
    env=env(**extra_env),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def read_csv(path):
  with open(path, newline="") as f:
    return {r["category"]: r for r in csv.DictReader(f)}


def final_meta(workdir, job):
  root = os.path.join(workdir, job, "checkpoints")
  step = max(int(d) for d in os.listdir(root) if d.isdigit())
  with open(os.path.join(root, str(step), "meta", "metadata")) as f:
    return step, json.load(f)


def state_digest(workdir, job):
  """sha256 of the latest checkpoint's state arrays (the same bytes = the same state)."""
  import jax

  from skrd4ad_jax import methods
  from skrd4ad_jax.config import load_config
  from skrd4ad_jax.training import checkpoints

  method = methods.build_method(load_config(os.path.join(REPO, "configs", "tiny.py")))
  abstract = jax.eval_shape(lambda: method.init(jax.random.PRNGKey(0), None))
  manager = checkpoints.make_manager(workdir, job, read_only=True)
  state, _ = checkpoints.restore(manager, abstract)
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(state):
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return h.hexdigest()


# What the SIGTERM and evaluation-only tests check depends neither on the decoder
# nor on TensorBoard; each costs a run a TensorFlow import (~3.5 s). The demo test
# keeps the user's defaults.

PREEMPT_STEPS = 300
PREEMPT_FLAGS = [
  "--config=configs/tiny.py:brick",
  # 300 steps at 2 per epoch: the tiny step takes ~15 ms, and the progress line
  # that shows step 6 or later comes about a second after the first.
  f"--config.train.epochs={PREEMPT_STEPS // 2}",
  "--config.train.log_every_steps=2",
  "--config.train.checkpoint_every_epochs=0",
  "--config.eval.save_pictures=False",
  "--config.eval.tensorboard_pictures=0",
  "--config.train.tensorboard=False",  # not what is checked; spares TensorFlow's import
]


@pytest.mark.slow
def test_sigterm_checkpoints_and_the_rerun_finishes_as_if_uninterrupted(tiny_run, tmp_path):
  _, _, data_root = tiny_run
  flags = [*PREEMPT_FLAGS, f"--config.data.root={data_root}"]
  interrupted = str(tmp_path / "interrupted")
  log = open(tmp_path / "log.txt", "w+")
  proc = subprocess.Popen(
    main_command(*flags, f"--workdir={interrupted}"),
    cwd=REPO,
    env=env(**PILLOW),
    stdout=log,
    stderr=subprocess.STDOUT,
    text=True,
  )
  # Wait until a few steps have run, then preempt it.
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    log.seek(0)
    done = [int(m) for m in re.findall(rf"brick:(\d+)/{PREEMPT_STEPS}", log.read())]
    if done and max(done) >= 6:
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the run ended before it could be preempted"
  proc.send_signal(signal.SIGTERM)
  code = proc.wait(timeout=300)
  log.seek(0)
  output = log.read()
  assert code == 128 + signal.SIGTERM, output[-3000:]
  stopped = [line for line in output.splitlines() if line.startswith("Stopped by SIGTERM")]
  assert len(stopped) == 1 and "Rerun the same command to resume" in stopped[0], output[-3000:]
  step, meta = final_meta(interrupted, "brick")
  assert 6 <= step < PREEMPT_STEPS and not meta["final"], (step, meta.get("final"))
  assert f"brick@{step}" in stopped[0]
  assert not os.path.exists(os.path.join(interrupted, "results.csv"))

  # The same command again: resumes at that step and finishes.
  rerun = run_main(*flags, f"--workdir={interrupted}", **PILLOW)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"[brick] checkpoint at step {step} of {PREEMPT_STEPS}" in rerun.stderr
  assert f"[brick] slot 0: steps {step}-{PREEMPT_STEPS} of {PREEMPT_STEPS}" in rerun.stderr

  # An uninterrupted run of the same command: the same state, bit for bit, and metrics.
  straight = str(tmp_path / "straight")
  once = run_main(*flags, f"--workdir={straight}", **PILLOW)
  assert once.returncode == 0, once.stderr[-3000:]
  assert state_digest(interrupted, "brick") == state_digest(straight, "brick")
  a, b = (
    read_csv(os.path.join(interrupted, "results.csv")),
    read_csv(os.path.join(straight, "results.csv")),
  )
  for metric in ("image_auroc", "pixel_auroc", "pixel_aupro", "pixel_aupro_rd4ad"):
    assert a["brick"][metric] == b["brick"][metric], metric
  log.close()


@pytest.mark.slow
def test_eval_only_reproduces_the_run_and_applies_the_official_conventions(tiny_run, tmp_path):
  config, workdir, data_root = tiny_run
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  categories = ",".join(config.data.categories)
  trained = read_csv(os.path.join(workdir, "results.csv"))
  steps = {c: final_meta(workdir, c)[0] for c in config.data.categories}
  proc = run_main(
    f"--config=configs/tiny.py:{categories}",
    f"--config.data.root={data_root}",
    f"--workdir={copy}",
    "--eval_only",
    "--config.train.tensorboard=False",
    timeout=600,
    **PILLOW,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  again = read_csv(copy / "results.csv")
  for c in config.data.categories:
    assert final_meta(copy, c)[0] == steps[c]  # nothing trained
    for metric in ("image_auroc", "pixel_auroc", "pixel_aupro"):
      assert float(again[c][metric]) == pytest.approx(float(trained[c][metric]), abs=1e-6)
  assert "Evaluation-only run" in (copy / "results.md").read_text()

  proc = run_main(
    f"--config=configs/tiny.py:{categories}",
    f"--config.data.root={data_root}",
    f"--workdir={copy}",
    "--eval_only",
    "--config.eval.protocol=official",
    "--config.train.tensorboard=False",
    timeout=600,
    **PILLOW,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  official = read_csv(copy / "results.csv")
  for c in config.data.categories:
    for metric in ("image_auroc", "pixel_auroc", "pixel_aupro_rd4ad"):
      value = float(official[c][metric])
      assert value == round(value, 3), (c, metric, value)
      assert value == pytest.approx(float(trained[c][metric]), abs=5e-4 + 1e-9)
  assert "conventions of the official test.py" in (copy / "results.md").read_text()

  # An empty workdir has nothing to evaluate: one line naming the job and the fixes.
  proc = run_main(
    f"--config=configs/tiny.py:{categories}",
    f"--config.data.root={data_root}",
    f"--workdir={tmp_path / 'empty'}",
    "--eval_only",
    timeout=600,
    **PILLOW,
  )
  assert proc.returncode == 1
  assert "No checkpoint of 'brick'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_demo_config_end_to_end_at_a_two_step_budget(tmp_path):
  """configs/demo.py as `make demo` runs it: demo data, HED teacher, feature cache, baseline.

  At 64 px instead of 128 (the wiring does not depend on the size; a quarter of
  the teacher's work: ~36 s instead of ~63 s on 2 cores).
  """
  workdir = tmp_path / "demo"
  proc = run_main(
    "--config=configs/demo.py",
    "--config.train.num_steps=2",
    "--config.data.image_size=64",
    "--config.eval.save_pictures=False",
    f"--workdir={workdir}",
    SKRD4AD_CACHE=str(tmp_path / "cache"),
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  rows = read_csv(workdir / "results.csv")
  assert list(rows) == ["brick", "grass", "gravel", "mean"]
  for c in ("brick", "grass", "gravel"):
    assert final_meta(workdir, c)[0] == 2
    for column in ("image_auroc", "pixel_auroc", "baseline_image_auroc", "baseline_pixel_auroc"):
      assert 0.0 <= float(rows[c][column]) <= 1.0, (c, column)
  md = (workdir / "results.md").read_text()
  # The teacher's recipe is stated where it differs from the official code.
  assert "loss.kind='pixel_cosine' (the teacher's default" in md
  assert "anomaly_map.levels=(1, 2) (the teacher's default" in md
