"""Deployment export: ONNX / SavedModel parity with the checkpoint, the JAX-free runner.

Uses the session's ``tiny_run`` (SK-RD4AD, trained) and, for the three other
methods, freshly initialised small models written as finished checkpoints
(parity does not need a trained model). Every exported model is run in its own
runtime (onnxruntime, TensorFlow) on the tiny run's test images and compared
with ``predict.Predictor``.
"""

import csv
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
from small_models import small_config

from data_pipelines import input_pipeline
from skrd4ad_jax import methods, normalization, predict, teachers
from skrd4ad_jax.data import folder
from skrd4ad_jax.evaluation import prediction_output
from skrd4ad_jax.export import exporter, onnx_converter, spec
from skrd4ad_jax.export import run as runner
from skrd4ad_jax.training import checkpoints
from skrd4ad_jax.training.jobs import config_to_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATEGORY = "brick"
RTOL = 1e-4  # the parity bound: max |exported - JAX| / max |JAX|
FRESH_METHODS = {"rd4ad": "model", "mrkd": "mrkd", "rd_expert": "rd_expert"}


def _env(blocked_dir=None):
  paths = ([str(blocked_dir)] if blocked_dir else []) + [REPO, os.environ.get("PYTHONPATH", "")]
  return dict(
    os.environ,
    PYTHONPATH=os.pathsep.join(paths),
    JAX_PLATFORMS="cpu",
    TF_CPP_MIN_LOG_LEVEL="2",
  )


def _block(tmp_path, names):
  """A folder of stub packages whose import fails (prepended to PYTHONPATH)."""
  blocker = tmp_path / "blocked"
  for name in names:
    (blocker / name).mkdir(parents=True, exist_ok=True)
    (blocker / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked here')\n")
  return blocker


def _read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _relative(a, b):
  return exporter.relative_error(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------
# Runs of every method.


def _write_fresh_run(workdir, model_name, section, data_root, category=CATEGORY, final=True):
  """A freshly initialised small model saved as a finished checkpoint (step 1 of 1).

  Its thresholds are placeholders (``exports`` sets them from the model's own
  scores). ``final=False``: a periodic checkpoint (step 2 of 10, no
  thresholds), as an interrupted run leaves it.
  """
  cfg = small_config(model_name, section)
  cfg.data.root = data_root
  cfg.data.categories = (CATEGORY,)
  method = methods.build_method(cfg)
  tv = teachers.load_teacher_variables(
    cfg.model.teacher, cfg.model.teacher_weights, image_size=64, seed=0
  )
  state = jax.jit(method.init)(jax.random.PRNGKey(int(cfg.seed)), tv)
  meta = {
    "category": category,
    "step": 1 if final else 2,
    "total_steps": 1 if final else 10,
    "image_size": 64,
    "method": method.describe(),
    "config": config_to_json(cfg),
    "final": final,
  }
  if final:
    thresholds = {k: 0.0 for k in spec.THRESHOLD_INPUTS}
    meta["thresholds"] = {**thresholds, "rule": "placeholder", "source": "test"}
  checkpoints.save(checkpoints.make_manager(workdir, category), meta["step"], state, meta)
  return workdir


def _own_thresholds(predictor, paths):
  """``predictor`` with thresholds amid its own scores (both labels occur)."""
  results = list(predictor.predict(paths))
  scores = np.sort([r.pred_score_raw for r in results]).astype(np.float64)
  maps = np.stack([r.anomaly_map for r in results]).astype(np.float64)
  middle = len(scores) // 2  # between two scores: no score sits at the threshold
  return predictor.with_thresholds(
    {
      "image_threshold": float(scores[middle - 1] + scores[middle]) / 2,
      "image_min": float(scores.min()),
      "image_max": float(scores.max()),
      "pixel_threshold": float(np.quantile(maps, 0.9)),
      "pixel_min": float(maps.min()),
      "pixel_max": float(maps.max()),
    }
  )


@pytest.fixture(scope="module")
def runs(tiny_run, tmp_path_factory):
  """{method: (workdir, data_root)}: the trained tiny run and three fresh ones."""
  _, workdir, data_root = tiny_run
  out = {"sk_rd4ad": workdir}
  base = tmp_path_factory.mktemp("export_runs")
  for name, section in FRESH_METHODS.items():
    out[name] = _write_fresh_run(str(base / name), name, section, data_root)
  return out, data_root


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory):
  """Every method in both formats: {(method, format): (export dir, predictor)}."""
  workdirs, data_root = runs
  paths = [s.image_path for s in folder.scan_category(data_root, CATEGORY).test]
  base = tmp_path_factory.mktemp("exports")
  out = {}
  for name, workdir in workdirs.items():
    predictor = exporter.load_finished(workdir, CATEGORY)
    if name in FRESH_METHODS:
      predictor = _own_thresholds(predictor, paths)
    for fmt in spec.FORMATS:
      directory = str(base / f"{name}_{fmt}")
      exporter.export_predictor(
        predictor, fmt, directory, platforms=("cpu",), check=False, log=lambda s: None
      )
      out[name, fmt] = (directory, predictor)
  return out


@pytest.fixture(scope="module")
def test_paths(runs):
  _, data_root = runs
  return [s.image_path for s in folder.scan_category(data_root, CATEGORY).test]


@pytest.fixture(scope="module")
def references(exports, test_paths):
  """{method: predict's results on the test images}, from the JAX checkpoint."""
  return {
    method: list(predictor.predict(test_paths))
    for (method, fmt), (_, predictor) in exports.items()
    if fmt == "onnx"
  }


def _boundary_threshold_of(scores):
  """A threshold just above the second-largest score in float64, equal to it in float32."""
  second = sorted(float(s) for s in scores)[-2]
  threshold = float(np.nextafter(np.float64(second), np.inf))
  assert threshold > second and np.float32(threshold) == np.float32(second)
  return threshold


def _midway_threshold(results):
  """Halfway between the second- and third-largest scores: two NG, whatever the last ulp."""
  scores = sorted(r.pred_score_raw for r in results)
  assert scores[-3] < scores[-2]
  return (scores[-3] + scores[-2]) / 2


# ---------------------------------------------------------------------------
# Parity.


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sk_rd4ad", "rd4ad", "mrkd", "rd_expert"])
def test_exported_models_reproduce_predict(exports, references, test_paths, method):
  reference = references[method]
  for fmt in spec.FORMATS:
    directory, predictor = exports[method, fmt]
    assert predictor.method.name == method
    exported = runner.ExportedPredictor(directory)
    assert exported.model.format == fmt
    results = list(exported.predict(test_paths, batch_size=4))
    assert [r.image_path for r in results] == test_paths
    for ours, ref in zip(results, reference):
      np.testing.assert_array_equal(ours.image, ref.image)  # the same preprocessing
    maps = np.stack([r.anomaly_map for r in results])
    ref_maps = np.stack([r.anomaly_map for r in reference])
    scores = np.array([r.pred_score_raw for r in results])
    ref_scores = np.array([r.pred_score_raw for r in reference])
    map_err, score_err = _relative(maps, ref_maps), _relative(scores, ref_scores)
    print(f"\n{method} {fmt}: maps rel {map_err:.1e}, scores rel {score_err:.1e}")  # with -s
    assert map_err <= RTOL and score_err <= RTOL, (method, fmt, map_err, score_err)
    assert [r.pred_label for r in results] == [r.pred_label for r in reference], (method, fmt)
    assert {r.pred_label for r in reference} == {"OK", "NG"}
    np.testing.assert_allclose(
      [r.pred_score for r in results], [r.pred_score for r in reference], atol=1e-4
    )
    written = json.load(open(os.path.join(directory, spec.SPEC_FILE)))
    assert written["method"] == method and written["format"] == fmt
    assert written["image_size"] == 64 and written["project_version"]
    assert written["thresholds"]["image_threshold"] == predictor.thresholds["image_threshold"]
    assert written["thresholds"]["pixel_max"] == predictor.thresholds["pixel_max"]
    assert list(written["outputs"]) == list(spec.RAW_OUTPUTS)


@pytest.mark.slow
@pytest.mark.parametrize("fmt,thresholds_as", [("onnx", "inputs"), ("saved_model", "constants")])
def test_postprocessing_outputs(exports, references, test_paths, tmp_path, fmt, thresholds_as):
  _, predictor = exports["sk_rd4ad", fmt]
  written = exporter.export_predictor(
    predictor,
    fmt,
    str(tmp_path),
    with_postprocessing=True,
    thresholds_as=thresholds_as,
    platforms=("cpu",),
    check=fmt == "onnx",
    log=lambda s: None,
  )
  if fmt == "onnx":  # The export's own check ran the written model against JAX.
    assert written["verification"]["map_max_relative_error"] <= RTOL
  model = runner.load_model(str(tmp_path))
  images = np.stack([runner.load_image(p, 64) for p in test_paths])
  out = model.run(images)
  assert set(out) == set(spec.RAW_OUTPUTS + spec.POSTPROCESSING_OUTPUTS)
  reference = references["sk_rd4ad"]
  assert [("NG" if x else "OK") for x in out["pred_label"]] == [r.pred_label for r in reference]
  np.testing.assert_allclose(out["pred_score"], [r.pred_score for r in reference], atol=1e-5)
  ref_norm = np.stack([r.anomaly_map_normalized for r in reference])
  np.testing.assert_allclose(out["anomaly_map_normalized"], ref_norm, atol=1e-5)
  ref_mask = np.stack([r.pred_mask for r in reference])
  assert np.mean(out["pred_mask"] != ref_mask) < 1e-3  # pixels at the threshold may differ
  if thresholds_as == "inputs":
    # Thresholds are data: other values, other decisions, the same model. At a
    # float32 boundary of the model's own scores (one run: ONNX Runtime's may
    # differ from JAX's, and between runs, by an ulp) the graph decides as
    # prediction_output.decision does: the boundary score is NG.
    threshold = _boundary_threshold_of(out["pred_score_raw"])
    model.set_thresholds({**predictor.thresholds, "image_threshold": threshold})
    moved = model.run(images)
    labels = [("NG" if x else "OK") for x in moved["pred_label"]]
    assert labels == [prediction_output.decision(s, threshold) for s in moved["pred_score_raw"]]
    assert labels.count("NG") == 2
    assert set(model.spec["inputs"]) == {spec.INPUT_NAME, *spec.THRESHOLD_INPUTS}
  else:
    assert set(model.spec["inputs"]) == {spec.INPUT_NAME}


@pytest.mark.slow
def test_thresholds_are_data(exports, test_paths, tmp_path):
  directory, _ = exports["sk_rd4ad", "onnx"]
  stored = list(runner.ExportedPredictor(directory).predict(test_paths))
  threshold = _midway_threshold(stored)
  expected = [
    r.pred_label
    for r in runner.ExportedPredictor(directory)
    .with_thresholds({"image_threshold": threshold})
    .predict(test_paths)
  ]
  assert expected != [r.pred_label for r in stored]
  assert expected.count("NG") == 2
  # Override (as --image_threshold does), and by editing the JSON beside a copy.
  moved = runner.ExportedPredictor(directory, {"image_threshold": threshold})
  assert [r.pred_label for r in moved.predict(test_paths)] == expected
  copy = tmp_path / "copy"
  shutil.copytree(directory, copy)
  written = json.load(open(copy / spec.SPEC_FILE))
  written["thresholds"]["image_threshold"] = threshold
  json.dump(written, open(copy / spec.SPEC_FILE, "w"))
  edited = runner.ExportedPredictor(str(copy)).predict(test_paths)
  assert [r.pred_label for r in edited] == expected


# ---------------------------------------------------------------------------
# The command lines, and the runner without JAX.


@pytest.mark.slow
def test_cli_export_and_runner_without_jax(runs, exports, test_paths, tmp_path):
  workdirs, _ = runs
  model_dir = tmp_path / "model"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "skrd4ad_jax.export",
      f"--workdir={workdirs['rd4ad']}",
      f"--category={CATEGORY}",
      "--format=onnx",
      f"--output={model_dir}",
      "--nocheck",  # the in-process tests run the export's own check
    ],
    cwd=REPO,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "exported in" in proc.stdout
  assert sorted(os.listdir(model_dir)) == [spec.ONNX_FILE, spec.SPEC_FILE]

  images = tmp_path / "images"
  images.mkdir()
  for p in test_paths[:4]:
    shutil.copy(p, images / f"{os.path.basename(os.path.dirname(p))}_{os.path.basename(p)}")
  (images / "broken.png").write_bytes(b"not an image" * 10)
  # One interpreter with JAX and Flax made unimportable runs the ONNX model
  # (which must not import TensorFlow either), then a SavedModel.
  probe = tmp_path / "probe.py"
  probe.write_text(
    "import sys\n"
    "from skrd4ad_jax.export import run\n"
    "def imported():\n"
    "  return sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'flax', 'tensorflow'})\n"
    "for argv in (sys.argv[1:7], sys.argv[7:]):\n"
    "  code = run.main(argv)\n"
    "  print('EXIT', code, 'IMPORTED', imported(), flush=True)\n"
  )
  _, predictor = exports["rd4ad", "onnx"]
  thr = predictor.thresholds
  out, sm_out = tmp_path / "out", tmp_path / "sm_out"
  blocked = _block(tmp_path, ["jax", "jaxlib", "flax"])
  proc = subprocess.run(
    [
      sys.executable,
      str(probe),
      f"--model={model_dir}",
      f"--input={images}",
      f"--output={out}",
      f"--image_threshold={thr['image_threshold']!r}",
      f"--pixel_threshold={thr['pixel_threshold']!r}",
      "--save_masks",
      f"--model={exports['rd4ad', 'saved_model'][0]}",
      f"--input={test_paths[0]}",
      f"--output={sm_out}",
    ],
    cwd=REPO,
    env=_env(blocked),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "EXIT 0 IMPORTED []" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "EXIT 0 IMPORTED ['tensorflow']" in proc.stdout
  assert "broken.png" in proc.stdout and "4 predicted" in proc.stdout
  assert len(_read_csv(sm_out / "predictions.csv")) == 1

  # predict's files for the same images and thresholds, from the checkpoint.
  reference = tmp_path / "reference"
  predictor = predictor.with_thresholds(
    {
      **predictor.meta["thresholds"],
      "image_threshold": thr["image_threshold"],
      "pixel_threshold": thr["pixel_threshold"],
    }
  )
  paths = folder.list_images(str(images))
  predict.write_predictions(predictor, paths, str(reference), save_masks=True, log=lambda s: None)
  ours, ref = _read_csv(out / "predictions.csv"), _read_csv(reference / "predictions.csv")
  assert list(ours[0]) == list(predict.CSV_COLUMNS)
  assert [r["image_path"] for r in ours] == [r["image_path"] for r in ref]
  assert [r["pred_label"] for r in ours] == [r["pred_label"] for r in ref]
  for key in ("pred_score", "pred_score_raw"):
    np.testing.assert_allclose(
      [float(r[key]) for r in ours], [float(r[key]) for r in ref], rtol=RTOL, atol=1e-6
    )
  assert sorted(os.listdir(out)) == sorted(os.listdir(reference))
  assert sorted(os.listdir(out / "masks")) == sorted(os.listdir(reference / "masks"))
  for name in os.listdir(reference):
    if name.endswith(".png"):
      a = np.asarray(Image.open(out / name), np.int16)
      b = np.asarray(Image.open(reference / name), np.int16)
      assert a.shape == b.shape
      # Equal up to pixels whose map value lies at a colour step or at the
      # pixel threshold (contour), and the score's last printed digit.
      assert np.mean(a != b) < 1e-2, name


# ---------------------------------------------------------------------------
# Bad input: one line naming the fix.


@pytest.mark.slow
def test_unknown_format_is_one_line(runs, tmp_path):
  workdirs, _ = runs
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "skrd4ad_jax.export",
      f"--workdir={workdirs['rd4ad']}",
      "--format=tflite",
      f"--output={tmp_path}",
    ],
    cwd=REPO,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert lines == ["error: Unknown --format='tflite'; choose one of onnx, saved_model."]


@pytest.mark.slow
def test_unfinished_checkpoint_and_seeds(runs, tmp_path):
  workdirs, data_root = runs
  # A periodic (not final) checkpoint, as an interrupted run leaves it.
  unfinished = str(tmp_path / "unfinished")
  _write_fresh_run(unfinished, "rd4ad", "model", data_root, final=False)
  with pytest.raises(spec.ExportError) as e:
    exporter.export(unfinished, CATEGORY, "onnx", str(tmp_path / "out"))
  message = str(e.value)
  assert "\n" not in message
  assert "step 2 of 10" in message and "not a finished one" in message
  assert "rerun python -m skrd4ad_jax.main with the same --workdir" in message
  (tmp_path / "empty").mkdir()
  with pytest.raises(spec.ExportError, match="No checkpoint found"):
    exporter.export(str(tmp_path / "empty"), CATEGORY, "onnx", str(tmp_path / "out"))
  with pytest.raises(spec.ExportError, match="Run directory not found"):
    exporter.export(str(tmp_path / "nothing"), CATEGORY, "onnx", str(tmp_path / "out"))

  # A multi-seed run stores seed k > 0 as "<category>/seed_<k>".
  _write_fresh_run(unfinished, "rd4ad", "model", data_root, category=f"{CATEGORY}/seed_1")
  assert exporter.load_finished(unfinished, CATEGORY, seed=1).category == f"{CATEGORY}/seed_1"
  with pytest.raises(spec.ExportError, match="Seed 3 of 'brick' was not trained"):
    exporter.load_finished(unfinished, CATEGORY, seed=3)


@pytest.mark.slow
def test_missing_dependency_is_one_line(runs, tmp_path, monkeypatch):
  workdirs, _ = runs
  for module, fmt in (("onnx", "onnx"), ("tensorflow", "saved_model")):
    monkeypatch.setitem(sys.modules, module, None)  # import fails
    with pytest.raises(spec.ExportError) as e:
      exporter.export(workdirs["rd4ad"], CATEGORY, fmt, str(tmp_path))
    message = str(e.value)
    assert "\n" not in message and f"--format={fmt}" in message and repr(module) in message
    if module == "onnx":
      assert message.endswith('Fix: pip install -e ".[export]".')
    monkeypatch.delitem(sys.modules, module)
  monkeypatch.setitem(sys.modules, "onnxruntime", None)
  directory = tmp_path / "model"
  with pytest.raises(spec.ExportError, match=r'onnxruntime.*pip install -e "\.\[export\]"'):
    exporter.export(workdirs["rd4ad"], CATEGORY, "onnx", str(directory))


def test_runner_bad_model_dir(tmp_path):
  with pytest.raises(spec.ExportError, match="Model directory not found"):
    runner.ExportedPredictor(str(tmp_path / "missing"))
  with pytest.raises(spec.ExportError, match="holds no skrd4ad_export.json"):
    runner.ExportedPredictor(str(tmp_path))


# ---------------------------------------------------------------------------
# Pieces.


@pytest.mark.slow
def test_runner_preprocessing_is_the_pipelines(tmp_path, test_paths):
  rng = np.random.default_rng(0)
  files = list(test_paths[:2])
  gray16 = (rng.random((37, 53)) * 65535).astype(np.uint16)
  Image.fromarray(gray16).save(tmp_path / "gray16.png")
  rgba = rng.integers(0, 256, (41, 29, 4), dtype=np.uint8)
  Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
  Image.fromarray(rgba[..., :3]).convert("P").save(tmp_path / "palette.png")
  Image.fromarray(rgba[..., :3]).save(tmp_path / "photo.jpg", quality=90)
  files += [str(tmp_path / n) for n in ("gray16.png", "rgba.png", "palette.png", "photo.jpg")]
  for path in files:
    for size in (64, 48):
      ours = runner.load_image(path, size)
      pipeline = input_pipeline.decode_and_resize(path, size).numpy()
      expected = np.asarray(np.round(normalization.to_uint8_range(pipeline)), np.uint8)
      np.testing.assert_array_equal(ours, expected, err_msg=f"{path} at {size}")


def test_converter_primitives_match_jax():
  """Primitives the models do not all use yet, each against JAX, with a dynamic batch."""
  (b,) = jax.export.symbolic_shape("batch")
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(3, 3, 2, 4)).astype(np.float32)
  matrix = rng.normal(size=(5, 6)).astype(np.float32)

  def fn(x):  # [B, 6, 6, 4]
    y = jax.lax.conv_general_dilated(
      x,
      kernel,
      (1, 1),
      ((2, 2), (2, 2)),
      rhs_dilation=(2, 2),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=2,
    )
    y = jnp.pad(y, ((0, 0), (1, 0), (0, 1), (0, 0)), constant_values=0.5)[:, 1:, :-1]
    y = jnp.where(y > 0, jnp.tanh(y), jax.nn.sigmoid(y) ** 3)[..., ::-1]
    pooled = jax.lax.reduce_window(y, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    z = jnp.einsum("bhwc,kw->bhkc", y, matrix[:, :6]) + jnp.exp(-jnp.abs(y)).sum()
    mixed = jnp.concatenate([z.mean(axis=(1, 2)), pooled.max(axis=(1, 2))], axis=-1)
    return jnp.clip(z, -1.0, 1.0), jnp.sqrt(jnp.square(mixed) + 1.0)

  model = onnx_converter.convert(
    fn, [("x", jax.ShapeDtypeStruct((b, 6, 6, 4), jnp.float32))], ["z", "m"], batch_dim=b
  )
  import onnxruntime as ort

  session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
  for batch in (1, 3):
    x = rng.normal(size=(batch, 6, 6, 4)).astype(np.float32)
    for got, want in zip(session.run(None, {"x": x}), jax.jit(fn)(x)):
      assert got.shape == want.shape
      np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-5)

  with pytest.raises(onnx_converter.UnsupportedError, match="'cumsum'"):
    onnx_converter.convert(
      lambda x: jnp.cumsum(x, axis=1),
      [("x", jax.ShapeDtypeStruct((b, 3), jnp.float32))],
      ["y"],
      batch_dim=b,
    )
