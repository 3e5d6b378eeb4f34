"""`skrd4ad_jax.predict`: OK/NG, pictures and masks for new images from a run.

Uses the session's ``tiny_run`` (tests/conftest.py): ~1 min to train once,
then ~1 min for these tests on 2 CPU cores.
"""

import csv
import math
import os
import shutil
import struct
import subprocess
import sys
import zlib

from conftest import PILLOW
import numpy as np
import pytest

import data_pipelines
from data_pipelines import input_pipeline
from skrd4ad_jax import predict
from skrd4ad_jax.data import folder
from skrd4ad_jax.evaluation import evaluate
from skrd4ad_jax.training import steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATEGORY = "brick"


@pytest.fixture(scope="module")
def predictor(tiny_run):
  _, workdir, _ = tiny_run
  return predict.Predictor(workdir, CATEGORY)


def _read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _test_paths(data_root, category=CATEGORY):
  return [s.image_path for s in folder.scan_category(data_root, category).test]


def _run_cli(*args, **extra_env):
  env = dict(
    os.environ,
    PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
    JAX_PLATFORMS="cpu",
    TF_CPP_MIN_LOG_LEVEL="2",
    **extra_env,
  )
  return subprocess.run(
    [sys.executable, "-m", "skrd4ad_jax.predict", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


def _corrupt_pixel_data(png: bytes) -> bytes:
  """A PNG whose chunks and checksums are valid but whose pixel stream is not.

  PIL's ``verify`` accepts it; only decoding fails (in TensorFlow).
  """
  pos = png.index(b"IDAT") - 4
  length = struct.unpack(">I", png[pos : pos + 4])[0]
  data = bytes(b ^ 0x5A for b in png[pos + 8 : pos + 8 + length])
  chunk = b"IDAT" + data
  return png[: pos + 4] + chunk + struct.pack(">I", zlib.crc32(chunk)) + png[pos + 12 + length :]


def _make_folder(tmp_path, data_root, good=2):
  """``good`` readable test images, a garbage file, a truncated PNG, a bad pixel stream."""
  src = _test_paths(data_root)[:good]
  out = tmp_path / "new_images"
  out.mkdir()
  for i, p in enumerate(src):
    shutil.copy(p, out / f"img{i}.png")
  (out / "broken.png").write_bytes(b"this is not a png" * 10)
  whole = open(src[0], "rb").read()
  (out / "truncated.png").write_bytes(whole[: len(whole) // 2])
  (out / "img0_bad_pixels.png").write_bytes(_corrupt_pixel_data(whole))
  return out


# ---------------------------------------------------------------------------
# Scores: the same numbers as the evaluation.


def test_predict_reproduces_evaluation_scores(tiny_run, predictor):
  config, workdir, data_root = tiny_run
  data = input_pipeline.make_category_data(config.data, CATEGORY)
  eval_step = steps.jitted_eval_step(predictor.method)
  ev = evaluate.predict(
    lambda im: eval_step(predictor.state, predictor.teacher_vars, im, predictor.rng),
    data.eval_batches("test", int(config.eval.batch_size)),
    data.has_masks,
  )

  # The evaluation's data came through tf.data; predict decodes with Pillow, or tf.data.
  for source in (None, data_pipelines.TFDataSource()):
    results = list(predict.predict_images(workdir, CATEGORY, ev.paths, source=source))
    assert [r.image_path for r in results] == ev.paths
    assert all(r.ok for r in results)
    raw = np.array([r.pred_score_raw for r in results], np.float32)
    np.testing.assert_array_equal(raw, ev.scores)
    np.testing.assert_array_equal(np.stack([r.anomaly_map for r in results]), ev.maps)

  # The trainer's own in-memory evaluation, stored in the checkpoint, is
  # reproduced from the predicted maps and scores: every metric, exactly.
  stored = predictor.meta["metrics"]
  pred = evaluate.Predictions(
    maps=ev.maps,
    scores=raw,
    labels=ev.labels,
    masks=ev.masks,
    paths=ev.paths,
    defect_types=ev.defect_types,
  )
  ours = evaluate.compute_metrics(pred, float(config.eval.fpr_limit))
  ours.update(evaluate.threshold_metrics(pred, predictor.thresholds))
  for name, value in stored.items():
    assert ours[name] == pytest.approx(value, rel=0, abs=1e-12, nan_ok=True), name

  # The trainer's per-image file (its pred_label is 1/0 where ours is NG/OK).
  written = os.path.join(workdir, CATEGORY, "test_predictions.csv")
  if os.path.exists(written):
    rows = {r["image_path"]: r for r in _read_csv(written)}
    assert sorted(rows) == sorted(ev.paths)
    for r in results:
      row = rows[r.image_path]
      assert np.float32(float(row["pred_score_raw"])) == np.float32(r.pred_score_raw)
      assert float(row["pred_score"]) == r.pred_score
      assert {"1": "NG", "0": "OK", "NG": "NG", "OK": "OK", "": ""}[row["pred_label"]] == (
        r.pred_label
      )

  thr = predictor.thresholds
  for r in results:
    assert r.pred_label == ("NG" if r.pred_score_raw >= thr["image_threshold"] else "OK")
    assert (r.pred_score >= 0.5) == (r.pred_label == "NG")
    assert 0.0 <= r.pred_score <= 1.0
    np.testing.assert_array_equal(r.pred_mask, r.anomaly_map >= thr["pixel_threshold"])


def test_normal_only_threshold_never_flags_every_normal_val_image(tiny_run, predictor):
  config, _, data_root = tiny_run
  assert predictor.thresholds["source"] == "val"
  assert predictor.thresholds["rule"].startswith("normal_quantile")
  val = folder.scan_category(
    data_root, CATEGORY, val_fraction=config.data.val_fraction, seed=config.data.shuffle_seed
  ).val
  assert len(val) >= 2
  results = list(predictor.predict([s.image_path for s in val]))
  labels = [r.pred_label for r in results]
  assert "OK" in labels, labels
  # No validation pixel map is flagged in full either.
  assert all(not r.pred_mask.all() for r in results)


# ---------------------------------------------------------------------------
# Outputs and bad inputs.


def test_folder_with_corrupt_files_skips_them_and_predicts_the_rest(tiny_run, predictor, tmp_path):
  _, _, data_root = tiny_run
  images = _make_folder(tmp_path, data_root, good=2)
  folder.check_image(str(images / "img0_bad_pixels.png"))  # Passes PIL's check.
  paths = folder.list_images(str(images))
  assert len(paths) == 5
  out = tmp_path / "out"
  logged = []
  summary = predict.write_predictions(
    predictor, paths, str(out), batch_size=2, save_masks=True, log=logged.append
  )
  skipped = dict(summary["skipped"])
  assert sorted(os.path.basename(p) for p in skipped) == [
    "broken.png",
    "img0_bad_pixels.png",
    "truncated.png",
  ]
  for path, message in skipped.items():
    assert path in message
    assert any(path in line and "skipped" in line for line in logged)
  rows = _read_csv(out / "predictions.csv")
  assert [os.path.basename(r["image_path"]) for r in rows] == ["img0.png", "img1.png"]
  assert list(rows[0]) == list(predict.CSV_COLUMNS)
  for r in rows:
    assert r["pred_label"] in ("OK", "NG")
    assert 0.0 <= float(r["pred_score"]) <= 1.0 and math.isfinite(float(r["pred_score_raw"]))
  assert sorted(os.listdir(out)) == ["img0.png", "img1.png", "masks", "predictions.csv"]
  assert sorted(os.listdir(out / "masks")) == ["img0.png", "img1.png"]
  from PIL import Image

  mask = np.asarray(Image.open(out / "masks" / "img0.png"))
  with Image.open(images / "img0.png") as im:
    assert mask.shape == im.size[::-1]
  assert set(np.unique(mask)) <= {0, 255}


@pytest.mark.slow
def test_cli_predicts_folder_and_reports_bad_file(tiny_run, tmp_path):
  _, workdir, data_root = tiny_run
  images = _make_folder(tmp_path, data_root, good=1)
  out = tmp_path / "out"
  proc = _run_cli(
    f"--workdir={workdir}",
    f"--category={CATEGORY}",
    f"--input={images}",
    f"--output={out}",
    "--save_masks",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "skipped" in proc.stdout and "broken.png" in proc.stdout
  assert "1 predicted" in proc.stdout
  assert "Traceback" not in proc.stderr
  assert len(_read_csv(out / "predictions.csv")) == 1
  assert (out / "img0.png").is_file() and (out / "masks" / "img0.png").is_file()


def test_same_stems_get_folder_names(tiny_run, predictor, tmp_path):
  _, _, data_root = tiny_run
  paths = [p for p in _test_paths(data_root) if os.path.basename(p) == "000.png"][:3]
  assert len(paths) == 3
  predict.write_predictions(predictor, paths, str(tmp_path), log=lambda s: None)
  expected = {f"{os.path.basename(os.path.dirname(p))}_000.png" for p in paths}
  assert expected <= set(os.listdir(tmp_path))
  with pytest.raises(predict.PredictError, match="overwrite an input image"):
    predict.write_predictions(predictor, paths[:1], os.path.dirname(paths[0]))
  assert predict.output_names(["a/x.png", "b/y.png"]) == ["x", "y"]
  assert predict.output_names(["a/x.png", "b/x.png", "a/x.jpg"]) == ["a_x", "b_x", "a_x_1"]


def test_nan_thresholds_leave_labels_empty_with_a_warning(tiny_run, predictor, tmp_path):
  _, _, data_root = tiny_run
  with pytest.warns(RuntimeWarning) as record:
    no_thr = predictor.with_thresholds(
      {"image_threshold": float("nan"), "pixel_threshold": float("nan")}
    )
  messages = " ".join(str(w.message) for w in record)
  assert "no image threshold" in messages and "no pixel threshold" in messages
  logged = []
  paths = _test_paths(data_root)[:2]
  summary = predict.write_predictions(
    no_thr, paths, str(tmp_path), save_masks=True, log=logged.append
  )
  assert summary["predicted"] == 2
  assert any("no pixel threshold" in line for line in logged)
  rows = _read_csv(tmp_path / "predictions.csv")
  assert [r["pred_label"] for r in rows] == ["", ""]
  assert [r["pred_score"] for r in rows] == ["", ""]
  assert all(float(r["pred_score_raw"]) > 0 for r in rows)
  assert not (tmp_path / "masks").exists()
  assert len([f for f in os.listdir(tmp_path) if f.endswith(".png")]) == 2


def test_run_resolves_the_category(tiny_run, tmp_path):
  _, workdir, _ = tiny_run
  assert predict.trained_categories(workdir) == ["brick", "grass"]
  with pytest.raises(predict.PredictError, match="several categories.*brick, grass"):
    predict.resolve_category(workdir, None)
  single = tmp_path / "single"
  single.mkdir()
  os.symlink(os.path.join(workdir, CATEGORY), single / CATEGORY)
  assert predict.resolve_category(str(single), None) == CATEGORY
  with pytest.raises(predict.PredictError, match="--category=brick"):
    predict.resolve_category(os.path.join(workdir, CATEGORY), None)


@pytest.mark.parametrize("case", ["no_run", "no_checkpoint", "unknown_category", "empty_folder"])
def test_cli_errors_are_one_clear_line(tiny_run, tmp_path, case):
  _, workdir, _ = tiny_run
  empty = tmp_path / "empty"
  empty.mkdir()
  args = {"workdir": workdir, "category": CATEGORY, "input": str(empty)}
  expected = {
    "no_run": "Run directory not found",
    "no_checkpoint": "No checkpoint found in the run directory",
    "unknown_category": "was not trained in .*trained categories: brick, grass",
    "empty_folder": "No image found at",
  }[case]
  if case == "no_run":
    args["workdir"] = str(tmp_path / "nowhere")
  elif case == "no_checkpoint":
    args["workdir"] = str(empty)
  elif case == "unknown_category":
    args["category"] = "carpet"
  # Each error comes before any image is decoded. The folder run above uses the
  # default decoder, tf.data.
  proc = _run_cli(
    *(f"--{k}={v}" for k, v in args.items()), f"--output={tmp_path / 'out'}", **PILLOW
  )
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
  error_lines = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert len(error_lines) == 1, proc.stderr[-2000:]
  import re

  assert re.search(expected, error_lines[0]), error_lines[0]
