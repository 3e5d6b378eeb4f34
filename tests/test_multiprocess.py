"""Several processes: 2 processes on localhost = one process.

The main job runs once as a single process with 2 simulated CPU devices, and
once as 2 processes (``jax.distributed`` on localhost, CPU collectives) with one
device each. Both have the same global mesh (2 devices, one slot each) and the
same plan: brick (12 steps) on slot 0, grass (9) cut in two, its first 7 steps on
slot 1 (process 1) and its last 2 on slot 0 (process 0) after a collective
pause checkpoint, gravel (6) on slot 1. Each job must end with the same
parameters and metrics as in the single process. About 2 minutes on 2 CPU cores.
"""

import csv
import glob
import os
import re
import socket
import subprocess
import sys

from conftest import PILLOW
import pytest
import test_parallel as tp

REPO = tp.REPO
CATEGORIES = tp.CATEGORIES
EPOCHS = 3
# Command-line form of test_parallel's overrides (configs/tiny.py made smaller).
FLAGS = [
  "--config.data.image_size=64",
  "--config.model.oce_blocks=1",
  "--config.model.decoder_blocks=(1,1,1)",
  "--config.train.batch_size=2",
  f"--config.train.epochs={EPOCHS}",
  "--config.train.log_every_steps=100",
  "--config.train.checkpoint_every_epochs=1",
  "--config.eval.save_pictures=False",
  "--config.eval.tensorboard_pictures=0",
]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  return tp.make_data_root(tmp_path_factory)


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _command(workdir, data_root, extra=()):
  return [
    sys.executable,
    "-m",
    "skrd4ad_jax.main",
    f"--config=configs/tiny.py:{','.join(CATEGORIES)}",
    f"--workdir={workdir}",
    f"--config.data.root={data_root}",
    *FLAGS,
    *extra,
  ]


def _run_two_processes(workdir, data_root, cache_dir, extra=()):
  """Runs the main job as 2 processes on localhost; returns their logs."""
  port = _free_port()
  procs = [
    subprocess.Popen(
      _command(
        workdir,
        data_root,
        [
          f"--coordinator_address=localhost:{port}",
          "--num_processes=2",
          f"--process_id={i}",
          *extra,
        ],
      ),
      cwd=REPO,
      env=tp.cpu_env(1, JAX_COMPILATION_CACHE_DIR=cache_dir, **PILLOW),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  logs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=400)
      logs.append(out + err)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, p in enumerate(procs):
    assert p.returncode == 0, f"process {i} failed:\n{logs[i][-6000:]}"
  return logs


def _results(workdir):
  with open(os.path.join(workdir, "results.csv"), newline="") as f:
    return {r["category"]: r for r in csv.DictReader(f) if r["category"] in CATEGORIES}


@pytest.mark.slow
def test_two_processes_equal_one_process(data_root, tmp_path):
  cache_dir = str(tmp_path / "xla_cache")
  single = tmp_path / "single"
  # The reference; the decoder and TensorBoard are not what is compared (each
  # costs a TensorFlow import: Pillow decodes the same arrays, test_data_sources).
  proc = subprocess.run(
    _command(single, data_root, ["--config.train.tensorboard=False"]),
    cwd=REPO,
    env=tp.cpu_env(2, JAX_COMPILATION_CACHE_DIR=cache_dir, **PILLOW),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-6000:]

  multi = tmp_path / "multi"
  logs = _run_two_processes(multi, data_root, cache_dir)
  # Two processes, one global mesh of 2 devices, one slot each; grass moves from
  # process 1's slot to process 0's half-way.
  for i, expected in enumerate(("brick, grass", "grass, gravel")):
    assert f"JAX process {i}/2" in logs[i]
    plan = re.search(
      r"process \d/2: 3 job\(s\) on 2 slot\(s\).*this process: slots \[(\d)\], "
      r"categories (.*)",
      logs[i],
    )
    assert plan, logs[i][-3000:]
    assert plan.group(1) == str(i) and plan.group(2) == expected, plan.group(0)
    others = set(CATEGORIES) - set(expected.split(", "))
    # Progress and evaluation lines only of the jobs its slot holds.
    assert not any(f"[{c}]" in logs[i] for c in others), logs[i][-3000:]
  assert "[grass] slot 1: steps 0-7 of 9" in logs[1] and "[grass] slot 0: steps 7-9 of 9" in logs[0]

  # The same numbers as the single process: parameters, batch statistics, metrics.
  from skrd4ad_jax.training import checkpoints

  config = tp.tiny_config(CATEGORIES, data_root, **{"train.epochs": EPOCHS})
  ref_rows, rows = _results(single), _results(multi)
  assert sorted(rows) == sorted(CATEGORIES)
  for c in CATEGORIES:
    ref_state, ref_meta = tp.restore_final(str(single), c, config)
    state, meta = tp.restore_final(str(multi), c, config)
    steps = tp.EXPECTED_STEPS[c] // tp.EPOCHS * EPOCHS  # steps per epoch x epochs
    assert int(state.step) == int(ref_state.step) == steps
    diff = tp.max_abs_diff(state.params, ref_state.params)
    print(f"{c}: max |params difference| = {diff:.3g}")
    assert diff <= tp.PARAM_ATOL, f"{c}: params differ by {diff:.3g}"
    assert tp.max_abs_diff(state.batch_stats, ref_state.batch_stats) <= tp.PARAM_ATOL
    for m in tp.METRICS:
      assert abs(meta["metrics"][m] - ref_meta["metrics"][m]) <= tp.METRIC_ATOL, (c, m)
      assert float(rows[c][m]) == pytest.approx(float(ref_rows[c][m]), abs=tp.METRIC_ATOL)
    # Everything a job leaves is written by the process that finishes it.
    assert os.path.isfile(multi / c / "test_predictions.csv")
    assert glob.glob(str(multi / c / "events.out.tfevents.*"))
    # Periodic (every epoch; the last two kept) and final checkpoints, written collectively.
    # (grass, paused at step 7 to move slots, keeps that checkpoint instead of 6's.)
    manager = checkpoints.make_manager(str(multi), c, read_only=True)
    previous = 7 if c == "grass" else steps - steps // EPOCHS
    assert sorted(manager.all_steps()) == [previous, steps]

  # Re-running the finished 2-process job restores every category (collectively) at
  # its final step and only evaluates again: same state, same metrics.
  # (Its TensorBoard runs were checked above; without them each process is spared
  # TensorFlow's import, which the other waits for at the next collective.)
  logs = _run_two_processes(multi, data_root, cache_dir, ["--config.train.tensorboard=False"])
  assert "[brick] checkpoint at step 12 of 12" in logs[0]
  assert "[gravel] checkpoint at step 6 of 6" in logs[1]
  again = _results(multi)
  for c in CATEGORIES:
    state, meta = tp.restore_final(str(multi), c, config)
    ref_state, _ = tp.restore_final(str(single), c, config)
    assert tp.max_abs_diff(state.params, ref_state.params) <= tp.PARAM_ATOL
    for m in tp.METRICS:
      assert float(again[c][m]) == pytest.approx(float(rows[c][m]), abs=1e-6)
