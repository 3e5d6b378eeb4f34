"""The main job: what a run leaves in the workdir, and clear errors for bad input."""

import csv
import glob
import json
import os
import shutil
import subprocess
import sys

from conftest import PILLOW
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# What these runs check (an error named in one line, a NaN stop) does not depend on
# the decoder. The default decoder (tf.data) runs in the corrupt-image test below,
# test_runs and test_predict's folder run.
def run_main(*args, timeout=600, env=PILLOW):
  """Runs ``python -m skrd4ad_jax.main`` in a subprocess; returns (code, output)."""
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3", **(env or {}))
  proc = subprocess.run(
    [sys.executable, "-m", "skrd4ad_jax.main", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )
  return proc.returncode, proc.stdout + proc.stderr


def read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def event_tags(logdir):
  """Scalar/image tags written by clu's TensorBoard writer."""
  import tensorflow as tf

  tags = set()
  for path in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      tags.update(v.tag for v in event.summary.value)
  return tags


def test_run_leaves_everything_per_category(tiny_run):
  config, workdir, data_root = tiny_run
  for category in config.data.categories:
    tags = event_tags(os.path.join(workdir, category))
    for tag in (
      "train/loss",
      "train/loss_main",
      "train/images_per_second",
      "eval/image_auroc",
      "eval/pixel_auroc",
      "eval/pixel_aupro",
      "eval/pixel_aupro_rd4ad",
      "eval/image_f1max",
      "eval/pixel_ap",
      "eval/heatmaps",
    ):
      assert tag in tags, (category, tag, sorted(tags))
    # Every test image gets a picture under images/test/<defect>/<stem>.png.
    test_images = sorted(glob.glob(os.path.join(data_root, category, "test", "*", "*.png")))
    pictures = sorted(glob.glob(os.path.join(workdir, category, "images", "test", "*", "*.png")))
    expected = [os.path.relpath(p, os.path.join(data_root, category, "test")) for p in test_images]
    got = [os.path.relpath(p, os.path.join(workdir, category, "images", "test")) for p in pictures]
    assert got == expected
    rows = read_csv(os.path.join(workdir, category, "test_predictions.csv"))
    assert len(rows) == len(test_images)
    assert {r["pred_label"] for r in rows} <= {"OK", "NG"}
    # Final checkpoint with thresholds and the config in its JSON item.
    steps = sorted(
      int(d) for d in os.listdir(os.path.join(workdir, category, "checkpoints")) if d.isdigit()
    )
    assert steps, "no checkpoint"
    with open(
      os.path.join(workdir, category, "checkpoints", str(steps[-1]), "meta", "metadata")
    ) as f:
      meta = json.load(f)
    assert meta["final"] and meta["category"] == category
    assert meta["thresholds"]["source"] == "val"
    assert meta["config"]["model"]["name"] == config.model.name
  results = read_csv(os.path.join(workdir, "results.csv"))
  assert [r["category"] for r in results] == list(config.data.categories) + ["mean"]
  for column in (
    "image_auroc",
    "pixel_auroc",
    "pixel_aupro",
    "pixel_aupro_rd4ad",
    "image_f1max",
    "pixel_ap",
    "train_seconds",
    "train_images_per_second",
  ):
    assert column in results[0], column
  mean = sum(float(r["image_auroc"]) for r in results[:-1]) / (len(results) - 1)
  assert float(results[-1]["image_auroc"]) == pytest.approx(mean)
  with open(os.path.join(workdir, "results.md")) as f:
    md = f.read()
  assert "last" in md and "test set" in md
  assert "Loss: flat_cosine" in md and "levels (1, 2, 3)" in md  # The recipe is stated.


@pytest.fixture
def tiny_data(tiny_run, tmp_path):
  """A private copy of the tiny data tree (tests may damage it)."""
  _, _, data_root = tiny_run
  root = tmp_path / "data"
  shutil.copytree(data_root, root)
  return root


def test_unknown_category_is_named(tiny_data, tmp_path):
  code, out = run_main(
    "--config=configs/tiny.py:nope",
    f"--config.data.root={tiny_data}",
    f"--workdir={tmp_path / 'run'}",
  )
  assert code == 1
  assert "nope" in out and "brick" in out  # lists the available categories
  assert "Traceback" not in out


def test_unwritable_workdir_is_named(tiny_data, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  code, out = run_main(
    "--config=configs/tiny.py:brick",
    f"--config.data.root={tiny_data}",
    f"--workdir={blocker / 'run'}",
  )
  assert code == 1
  assert str(blocker / "run") in out and "--workdir" in out
  assert "Traceback" not in out


def test_corrupt_training_image_is_named_before_training(tiny_data, tmp_path):
  bad = tiny_data / "brick" / "train" / "good" / "003.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
  code, out = run_main(
    "--config=configs/tiny.py:brick",
    f"--config.data.root={tiny_data}",
    f"--workdir={tmp_path / 'run'}",
    env={},  # the default decoder: tf.data names the file
  )
  assert code == 1
  assert "003.png" in out
  assert "Traceback" not in out
  assert not os.path.exists(tmp_path / "run" / "brick" / "checkpoints" / "4")


def test_missing_train_good_is_named(tiny_data, tmp_path):
  shutil.rmtree(tiny_data / "grass" / "train")
  code, out = run_main(
    "--config=configs/tiny.py:grass",
    f"--config.data.root={tiny_data}",
    f"--workdir={tmp_path / 'run'}",
  )
  assert code == 1
  assert "train" in out and "grass" in out
  assert "Traceback" not in out


@pytest.mark.slow
def test_nan_loss_stops_with_the_step_range_and_keeps_results(tiny_run, tmp_path):
  config, workdir, _ = tiny_run
  run = tmp_path / "run"
  shutil.copytree(workdir, run)
  before = read_csv(run / "results.csv")
  # Resume the finished run for more epochs with a learning rate that diverges.
  code, out = run_main(
    "--config=configs/tiny.py:brick",
    f"--config.data.root={config.data.root}",
    f"--workdir={run}",
    "--config.train.epochs=6",
    "--config.train.learning_rate=1e30",
  )
  assert code == 1
  assert "non-finite between steps" in out and "brick" in out
  assert "Traceback" not in out
  # Nothing already written is lost.
  assert read_csv(run / "results.csv") == before
  assert os.path.isdir(run / "brick" / "checkpoints")


@pytest.mark.parametrize(
  "name, value, message",
  [
    (
      "SKRD4AD_HOST_MALLOC",
      "lots",
      "SKRD4AD_HOST_MALLOC='lots': expected one of auto, keep, system.",
    ),
    ("SKRD4AD_DECODER", "tfd", "SKRD4AD_DECODER='tfd': expected one of auto, tf.data, pillow."),
  ],
)
def test_misspelt_environment_setting_is_one_error_line(tmp_path, name, value, message):
  code, out = run_main(
    f"--config={os.path.join(REPO, 'configs', 'tiny.py')}",
    f"--workdir={tmp_path / 'run'}",
    env={name: value},
  )
  assert code == 1, out[-3000:]
  assert f"error: {message}" in out and "Traceback" not in out, out[-3000:]
