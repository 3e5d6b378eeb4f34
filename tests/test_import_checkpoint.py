"""Official checkpoints in: names, map parity with the official forward, and bad files.

Official-format checkpoints are built with the torch oracle (``official_torch.py``:
random weights, randomised BatchNorm statistics, resnet18 teacher, 64 px),
saved the way each official script saves them, imported, restored by
``predict.Predictor`` and compared with the official forward and map (per
level 1 - cos, bilinear align_corners=True, sum, scipy gaussian_filter sigma 4,
max). MRKD is compared with its FLM mask off (our deterministic evaluation);
RD with Expert with its trained teacher, in both injection variants.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import official_torch as ot
import pytest
from small_models import small_config

from skrd4ad_jax import import_checkpoint as ic
from skrd4ad_jax import methods, predict, teachers
from skrd4ad_jax.config import load_config
from skrd4ad_jax.teachers import porting
from skrd4ad_jax.teachers.recipe import student_layout
from skrd4ad_jax.training import checkpoints

torch = ot.torch
pytestmark = pytest.mark.skipif(torch is None, reason=ot.TORCH_REASON)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64
CATEGORY = "widget"
SECTIONS = {"rd4ad": "loss", "sk_rd4ad": "loss", "mrkd": "mrkd", "rd_expert": "rd_expert"}


def _config(method, **fields):
  cfg = small_config(method, SECTIONS[method], **fields)
  cfg.model.teacher = "resnet18"  # the official code's teacher (tests/official_torch.py)
  return cfg


def _save_teacher(tmp_path):
  encoder = ot.random_encoder("resnet18", seed=11)
  torch.save(encoder.model.state_dict(), tmp_path / "teacher.pth")
  return encoder, str(tmp_path / "teacher.pth")


def _save_official(models, path):
  """What the official script writes: ``torch.save({group: module.state_dict()})``."""
  torch.save({group: m.state_dict() for group, m in models.items()}, path)
  return path


def _official_forward(method, models, encoder, images, gated=False):
  """(teacher features, student features) of the official code in eval mode."""
  for m in (encoder, *models.values()):
    m.eval()
  x = torch.from_numpy(images)
  with torch.no_grad():
    if method == "rd_expert":  # URD train.py:test
      t = models["teacher"](x)
      return t, models["student"](t, skip=True, attn=not gated)
    inputs = encoder(x)
    z = models["bn"](inputs)
    if method == "mrkd":
      return inputs, models["decoder"](z, mask=False)
    return inputs, models["decoder"](z, inputs[0:3], 3 if method == "sk_rd4ad" else 0)


def _ours(workdir, images):
  predictor = predict.Predictor(workdir, CATEGORY)
  maps, scores = jax.jit(predictor.method.anomaly_maps)(
    predictor.state, predictor.teacher_vars, images.transpose(0, 2, 3, 1), predictor.rng
  )
  return predictor, np.asarray(maps), np.asarray(scores)


def _rel(a, b) -> float:
  """max |a - b| / max |b| (maps are >= 0; a per-pixel ratio would divide by ~0)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


# ----------------------------------------------------------------------------- names


@pytest.mark.parametrize("method", ic.METHODS)
def test_names_and_shapes_of_the_full_size_official_models(method):
  """wide_resnet50_2, official layout: every official tensor has its place, and no other."""
  cfg = _config(method)
  cfg.model.teacher = "wide_resnet50_2"
  cfg.model.oce_blocks, cfg.model.decoder_blocks = 0, ()
  method_obj = methods.build_method(cfg)
  teacher = jax.eval_shape(
    teachers.build_teacher("wide_resnet50_2").init,
    jax.random.PRNGKey(0),
    jax.ShapeDtypeStruct((1, 64, 64, 3), "float32"),
  )
  abstract = jax.eval_shape(method_obj.init, jax.random.PRNGKey(0), teacher)
  names = ic.variable_names(method, abstract)
  with torch.device("meta"):  # shapes only, no memory
    models = ot.official_models(
      method, student_layout(cfg.model), arch="wide_resnet50_2", randomize=False
    )
  official = {
    f"{group}.{k}": tuple(v.shape) for group, m in models.items() for k, v in m.state_dict().items()
  }
  skipped = {k for k in official if ic.FORMATS[method].unused.search(k) or "num_batches" in k}
  assert sorted(set(official) - skipped - set(names)) == []
  assert sorted(set(names) - set(official)) == []
  assert {
    k: (official[k], ic.official_shape(s))
    for k, (_, s) in names.items()
    if official[k] != ic.official_shape(s)
  } == {}
  # What is skipped is what the official forward never reads.
  expected_skips = {
    "rd4ad": {"bn.conv4.weight", "bn.bn4.weight"},
    "mrkd": {"bn.conv4.weight", "decoder.conv1.weight"},
    "rd_expert": {"student.bn.conv4.weight", "teacher.encoder.fc.weight"},
  }.get(method, set())
  assert expected_skips <= skipped


# ----------------------------------------------------------------------------- map parity


@pytest.mark.parametrize(
  "method, gated",
  [
    ("rd4ad", False),
    ("sk_rd4ad", False),
    ("mrkd", False),
    ("rd_expert", False),
    ("rd_expert", True),
  ],
)
def test_imported_maps_match_the_official_forward(method, gated, tmp_path):
  encoder, teacher_path = _save_teacher(tmp_path)
  cfg = _config(method, gated=gated) if method == "rd_expert" else _config(method)
  models = ot.official_models(method, student_layout(cfg.model), seed=12)
  ckpt = _save_official(models, tmp_path / "official.pth")
  ckpt_dir = ic.import_checkpoint(
    method, ckpt, CATEGORY, tmp_path / "run", config=cfg, teacher_weights=teacher_path
  )
  assert os.path.isdir(os.path.join(ckpt_dir, "0"))

  images = np.random.RandomState(13).randn(3, 3, SIZE, SIZE).astype(np.float32)
  t, s = _official_forward(method, models, encoder, images, gated)
  maps_expected, scores_expected = ot.official_maps(t, s, SIZE)
  predictor, maps, scores = _ours(tmp_path / "run", images)
  map_err, score_err = _rel(maps, maps_expected), _rel(scores, scores_expected)
  print(f"\n{method}{' (gated)' if gated else ''}: maps rel {map_err:.2e}, scores {score_err:.2e}")
  assert map_err <= 1e-4 and score_err <= 1e-4

  meta = predictor.meta
  assert meta["final"] is True and meta["step"] == 0 and meta["category"] == CATEGORY
  assert meta["imported_from"]["method"] == method
  assert meta["imported_from"]["format"] == "pth"
  assert meta["imported_from"]["sha256"] == porting.sha256(ckpt)
  assert meta["config"]["model"]["name"] == method
  assert meta["config"]["model"]["teacher_weights"] == teacher_path
  assert meta["config"]["data"]["categories"] == [CATEGORY]


def test_safetensors_import_equals_pth_import(tmp_path):
  from safetensors.torch import save_file

  _, teacher_path = _save_teacher(tmp_path)
  cfg = _config("sk_rd4ad")
  models = ot.official_models("sk_rd4ad", student_layout(cfg.model), seed=14)
  pth = _save_official(models, tmp_path / "official.pth")
  # The same dict as a .safetensors file: group and key joined by '.'.
  flat = {f"{g}.{k}": v.contiguous() for g, m in models.items() for k, v in m.state_dict().items()}
  save_file(flat, str(tmp_path / "official.safetensors"))
  for name, path in (("a", pth), ("b", tmp_path / "official.safetensors")):
    ic.import_checkpoint(
      "sk_rd4ad", path, CATEGORY, tmp_path / name, config=cfg, teacher_weights=teacher_path
    )
  a, b = predict.Predictor(tmp_path / "a", CATEGORY), predict.Predictor(tmp_path / "b", CATEGORY)
  for x, y in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state)):
    np.testing.assert_array_equal(x, y)
  assert b.meta["imported_from"]["format"] == "safetensors"


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module", name="official_files")
def fixture_official_files(tmp_path_factory):
  """An RD4AD and an MRKD checkpoint, the teacher, and a small config per method."""
  root = tmp_path_factory.mktemp("official")
  _, teacher_path = _save_teacher(root)
  files = {"teacher": teacher_path}
  for method in ("rd4ad", "mrkd", "rd_expert"):
    models = ot.official_models(method, student_layout(_config(method).model), seed=15)
    files[method] = _save_official(models, root / f"{method}.pth")
  return files


def _import(method, path, workdir, teacher, **kwargs):
  return ic.import_checkpoint(
    method, path, CATEGORY, workdir, config=_config(method), teacher_weights=teacher, **kwargs
  )


def test_wrong_method_for_the_file(official_files, tmp_path):
  teacher = official_files["teacher"]
  with pytest.raises(
    ic.CheckpointImportError,
    match=r"rd4ad\.pth: expected the groups "
    r"\['teacher', 'student'\].*found \['bn', 'decoder'\].*--method=rd4ad",
  ):
    _import("rd_expert", official_files["rd4ad"], tmp_path / "a", teacher)
  with pytest.raises(
    ic.CheckpointImportError,
    match=r"found \['student', 'teacher'\].*"
    r"--method=rd_expert",
  ):
    _import("sk_rd4ad", official_files["rd_expert"], tmp_path / "b", teacher)
  with pytest.raises(
    ic.CheckpointImportError,
    match=r"mrkd\.pth: .*Unexpected \(13\): \[.*'decoder\.generation1\.0\.bias'.*--method=mrkd",
  ):
    _import("rd4ad", official_files["mrkd"], tmp_path / "c", teacher)
  with pytest.raises(
    ic.CheckpointImportError,
    match=r"Missing \(\d+\): 'decoder\.generation1\."
    r"0\.bias'.*no MRKD generation heads",
  ):
    _import("mrkd", official_files["rd4ad"], tmp_path / "d", teacher)
  assert not os.path.exists(tmp_path / "a") or not os.listdir(tmp_path / "a")


def _edited(official_files, tmp_path, edit):
  state = {g: dict(sd) for g, sd in torch.load(official_files["rd4ad"]).items()}
  edit(state)
  torch.save(state, tmp_path / "edited.pth")
  return tmp_path / "edited.pth"


def test_missing_tensor_is_named(official_files, tmp_path):
  path = _edited(official_files, tmp_path, lambda s: s["decoder"].pop("layer2.0.bn1.running_var"))
  with pytest.raises(
    ic.CheckpointImportError,
    match=r"edited\.pth: .*Missing \(1\): "
    r"'decoder\.layer2\.0\.bn1\.running_var' \(expected shape \(128,\)\)",
  ):
    _import("rd4ad", path, tmp_path / "run", official_files["teacher"])


def test_wrong_shape_is_named(official_files, tmp_path):
  def edit(state):
    state["bn"]["conv1.weight"] = torch.zeros(128, 64, 5, 5)

  path = _edited(official_files, tmp_path, edit)
  with pytest.raises(
    ic.CheckpointImportError,
    match=r"'bn\.conv1\.weight' has shape "
    r"\(128, 64, 5, 5\), expected \(128, 64, 3, 3\)",
  ):
    _import("rd4ad", path, tmp_path / "run", official_files["teacher"])


def test_unexpected_tensor_is_named(official_files, tmp_path):
  def edit(state):
    state["decoder"]["layer1.0.extra.weight"] = torch.zeros(3)

  path = _edited(official_files, tmp_path, edit)
  with pytest.raises(
    ic.CheckpointImportError,
    match=r"Unexpected \(1\): "
    r"\['decoder\.layer1\.0\.extra\.weight'\]",
  ):
    _import("rd4ad", path, tmp_path / "run", official_files["teacher"])


def test_decoder_only_checkpoint_says_what_is_missing(official_files, tmp_path):
  torch.save(torch.load(official_files["rd4ad"])["decoder"], tmp_path / "decoder_only.pth")
  with pytest.raises(
    ic.CheckpointImportError,
    match=r"decoder_only\.pth: holds a decoder state "
    r"dict alone \(SK-RD4AD main\.py --seg 1",
  ):
    _import("sk_rd4ad", tmp_path / "decoder_only.pth", tmp_path / "run", official_files["teacher"])


def test_existing_checkpoints_are_kept_unless_overwrite(official_files, tmp_path):
  teacher = official_files["teacher"]
  _import("rd4ad", official_files["rd4ad"], tmp_path / "run", teacher)
  with pytest.raises(ic.CheckpointImportError, match=r"already holds checkpoints.*--overwrite"):
    _import("rd4ad", official_files["rd4ad"], tmp_path / "run", teacher)
  _import("sk_rd4ad", official_files["rd4ad"], tmp_path / "run", teacher, overwrite=True)
  manager = checkpoints.make_manager(str(tmp_path / "run"), CATEGORY, read_only=True)
  assert manager.all_steps() == [0]
  assert checkpoints.restore_meta(manager)["imported_from"]["method"] == "sk_rd4ad"


def test_command_line(official_files, tmp_path):
  """The absl entry point, with a dataset config: success, then a one-line error."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  # configs/tiny.py with the official code's teacher and its student (one OCE
  # block, a (1, 1, 1) decoder).
  config = load_config(os.path.join(REPO, "configs", "tiny.py"))
  config.model.teacher = "resnet18"
  layout = student_layout(config.model)
  models = ot.official_models("rd4ad", layout, seed=16)
  ckpt = _save_official(models, tmp_path / "wres50_widget.pth")
  base = [
    sys.executable,
    "-m",
    "skrd4ad_jax.import_checkpoint",
    f"--checkpoint={ckpt}",
    f"--category={CATEGORY}",
    f"--workdir={tmp_path / 'run'}",
    f"--config={os.path.join(REPO, 'configs', 'tiny.py')}",
    "--config.model.teacher=resnet18",
    f"--teacher_weights={official_files['teacher']}",
  ]
  done = subprocess.run(
    [*base, "--method=rd4ad"], env=env, capture_output=True, text=True, cwd=REPO, timeout=600
  )
  assert done.returncode == 0, done.stderr
  assert "imported into" in done.stdout
  manager = checkpoints.make_manager(str(tmp_path / "run"), CATEGORY, read_only=True)
  meta = checkpoints.restore_meta(manager)
  assert meta["config"]["name"] == "tiny" and meta["config"]["model"]["name"] == "rd4ad"
  assert json.dumps(meta)  # plain JSON

  failed = subprocess.run(
    [*base, "--method=rd_expert", "--overwrite"],
    env=env,
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=600,
  )
  assert failed.returncode == 1
  errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "wres50_widget.pth: expected the groups" in errors[0]
