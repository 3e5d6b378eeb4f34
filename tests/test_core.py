"""Model core: shapes and parameter counts from the spec, skips, losses, maps, steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from skrd4ad_jax import anomaly_map as amap
from skrd4ad_jax import losses, teachers
from skrd4ad_jax.config import defaults
from skrd4ad_jax.methods import build_method
from skrd4ad_jax.models import layers
from skrd4ad_jax.models.decoder import Decoder
from skrd4ad_jax.training import steps


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def make_config(name="sk_rd4ad", teacher="wide_resnet50_2", size=256):
  cfg = defaults.get_config()
  cfg.model.name = name
  cfg.model.teacher = teacher
  cfg.model.teacher_weights = "random"
  cfg.data.image_size = size
  return cfg


def abstract_model(cfg, batch=2):
  """Shapes of every intermediate, without computing anything."""
  m = build_method(cfg)
  size = cfg.data.image_size
  tv = jax.eval_shape(lambda: m.teacher.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))
  st = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), None))
  feats = jax.eval_shape(m.teacher.apply, tv, jnp.zeros((batch, size, size, 3)))
  variables = {"params": st.params, "batch_stats": st.batch_stats}
  z = jax.eval_shape(lambda v, f: m.student.apply(v, f, method=m.student.encode), variables, feats)
  outs = jax.eval_shape(lambda v, f: m.student.apply(v, f), variables, feats)
  return m, tv, st, feats, z, outs


def test_wide_resnet50_2_counts_and_shapes():
  _, tv, st, feats, z, outs = abstract_model(make_config())
  # rd_family.md §1.3-1.5.
  assert count(tv["params"]) == 24_862_528
  assert count(st.params["bottleneck"]) == 58_885_120
  assert count(st.params["decoder"]) == 24_917_504
  assert [f.shape for f in feats] == [(2, 64, 64, 256), (2, 32, 32, 512), (2, 16, 16, 1024)]
  assert z.shape == (2, 8, 8, 2048)
  # [D3, D2, D1] mirror [E1, E2, E3].
  assert [o.shape for o in outs] == [f.shape for f in feats]
  # Only bottleneck + decoder are optimised; the teacher is not in the state.
  assert set(st.params) == {"bottleneck", "decoder"}
  assert count(st.opt_state) == 2 * count(st.params) + 1  # Adam mu, nu (+ count)


def test_decoder_block_counts_follow_the_official_order():
  _, _, st, _, _, _ = abstract_model(make_config())
  blocks = {}
  for name in st.params["decoder"]:
    stage, _ = name.split("_")
    blocks[stage] = blocks.get(stage, 0) + 1
  assert blocks == {"layer1": 3, "layer2": 4, "layer3": 6}
  # Block 0 of each stage up-samples with a 2x2 transposed conv [2, 2, C_in, C_out].
  assert st.params["decoder"]["layer1_0"]["conv2"]["kernel"].shape == (2, 2, 512, 512)
  assert st.params["decoder"]["layer1_0"]["upsample_0"]["kernel"].shape == (2, 2, 2048, 1024)


def test_resnet18_basic_block_layout():
  _, _, st, feats, z, outs = abstract_model(make_config(teacher="resnet18", size=64))
  assert [f.shape for f in feats] == [(2, 16, 16, 64), (2, 8, 8, 128), (2, 4, 4, 256)]
  assert z.shape == (2, 2, 2, 512)
  assert [o.shape for o in outs] == [f.shape for f in feats]
  assert sorted(st.params["decoder"]) == [f"layer{s}_{i}" for s in (1, 2, 3) for i in (0, 1)]
  assert "conv3" not in st.params["decoder"]["layer1_0"]  # BasicBlock: two convs


@pytest.fixture(scope="module")
def small():
  """resnet18 SK-RD4AD and RD4AD at 64 px with one shared teacher."""
  cfg_sk, cfg_rd = (
    make_config(teacher="resnet18", size=64),
    make_config("rd4ad", teacher="resnet18", size=64),
  )
  sk, rd = build_method(cfg_sk), build_method(cfg_rd)
  tv = teachers.load_teacher_variables("resnet18", "random", image_size=64)
  return sk, rd, tv


@pytest.mark.slow
def test_skip_flag_changes_outputs_not_parameters(small):
  sk, rd, tv = small
  s_sk = sk.init(jax.random.PRNGKey(0), tv)
  s_rd = rd.init(jax.random.PRNGKey(0), tv)
  assert jax.tree.structure(s_sk.params) == jax.tree.structure(s_rd.params)
  assert jax.tree.all(
    jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), s_sk.params, s_rd.params)
  )
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 64, 3))
  _, out_sk = sk.features(s_sk, tv, x, None)
  _, out_rd = rd.features(s_rd, tv, x, None)
  # D1 comes before any skip; D2 and D3 see the injected teacher features.
  np.testing.assert_array_equal(out_sk[2], out_rd[2])
  assert not np.allclose(out_sk[1], out_rd[1])
  assert not np.allclose(out_sk[0], out_rd[0])


def test_skip_wiring_e3_to_stage2_e2_to_stage3():
  dec = Decoder(channels=(64, 128, 256), block="basic", blocks=(2, 2, 2), skip=True)
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.normal(size=(1, 2, 2, 512)), jnp.float32)
  feats = [
    jnp.asarray(np.abs(rng.normal(size=s)), jnp.float32)
    for s in [(1, 16, 16, 64), (1, 8, 8, 128), (1, 4, 4, 256)]
  ]
  v = dec.init(jax.random.PRNGKey(0), z, feats)
  base = dec.apply(v, z, feats)

  def changed(level):
    f = list(feats)
    f[level] = f[level] + 1.0
    out = dec.apply(v, z, f)
    return [not np.allclose(a, b) for a, b in zip(out, base)]  # [D3, D2, D1]

  assert changed(0) == [False, False, False]  # E1 is never injected
  assert changed(1) == [True, False, False]  # E2 feeds stage 3 only
  assert changed(2) == [True, True, False]  # E3 feeds stage 2 (and so stage 3)


def test_deconv_equals_transposed_convolution():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 5, 6, 7)), jnp.float32)
  mod = layers.Deconv2x2(3)
  v = mod.init(jax.random.PRNGKey(0), x)
  k = v["params"]["kernel"]  # [2, 2, C_in, C_out], k[a, b, c, o] = W_torch[c, o, a, b]
  ours = mod.apply(v, x)
  # XLA's transposed convolution (the slow-to-differentiate form) with the kernel
  # flipped, as a fractionally strided convolution expects.
  ref = jax.lax.conv_transpose(
    x, k[::-1, ::-1], strides=(2, 2), padding="VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  np.testing.assert_allclose(ours, ref, atol=1e-5)
  # And by definition: out[2i+a, 2j+b, o] = sum_c x[i, j, c] W[c, o, a, b].
  manual = np.zeros((2, 10, 12, 3), np.float32)
  for a in range(2):
    for b in range(2):
      manual[:, a::2, b::2, :] = np.einsum("nhwc,co->nhwo", np.asarray(x), np.asarray(k[a, b]))
  np.testing.assert_allclose(ours, manual, atol=1e-5)
  import torch_oracle

  torch, _, reason = torch_oracle.import_torch()
  if torch is None:
    print("torch oracle not checked:", reason)
    return
  deconv = torch.nn.ConvTranspose2d(7, 3, kernel_size=2, stride=2, bias=False)
  with torch.no_grad():
    deconv.weight.copy_(torch.from_numpy(np.asarray(k).transpose(2, 3, 0, 1).copy()))
    ref_t = deconv(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()))
  np.testing.assert_allclose(ours, ref_t.numpy().transpose(0, 2, 3, 1), atol=1e-5)


def _np_cos(a, b, axis):
  dot = (a * b).sum(axis)
  return dot / (
    np.maximum(np.linalg.norm(a, axis=axis), 1e-8) * np.maximum(np.linalg.norm(b, axis=axis), 1e-8)
  )


def _np_align_corners(x, out_h, out_w):
  """Loop-based bilinear interpolation with src = dst * (in - 1) / (out - 1)."""
  n, h, w = x.shape[:3]
  out = np.zeros((n, out_h, out_w) + x.shape[3:], np.float64)
  for i in range(out_h):
    sy = i * (h - 1) / (out_h - 1) if out_h > 1 else 0.0
    y0 = min(int(np.floor(sy)), h - 1)
    y1 = min(y0 + 1, h - 1)
    fy = sy - y0
    for j in range(out_w):
      sx = j * (w - 1) / (out_w - 1) if out_w > 1 else 0.0
      x0 = min(int(np.floor(sx)), w - 1)
      x1 = min(x0 + 1, w - 1)
      fx = sx - x0
      out[:, i, j] = (
        (1 - fy) * (1 - fx) * x[:, y0, x0]
        + (1 - fy) * fx * x[:, y0, x1]
        + fy * (1 - fx) * x[:, y1, x0]
        + fy * fx * x[:, y1, x1]
      )
  return out


@pytest.fixture
def feature_pairs():
  rng = np.random.default_rng(3)
  shapes = [(2, 16, 16, 8), (2, 8, 8, 16), (2, 4, 4, 32)]
  t = [np.abs(rng.normal(size=s)).astype(np.float32) for s in shapes]
  s = [np.abs(x + 0.5 * rng.normal(size=x.shape)).astype(np.float32) for x in t]
  return t, s


def test_losses_against_numpy(feature_pairs):
  t, s = feature_pairs
  flat = sum(np.mean(1 - _np_cos(a.reshape(2, -1), b.reshape(2, -1), 1)) for a, b in zip(t, s))
  pixel = sum(np.mean(1 - _np_cos(a, b, -1)) for a, b in zip(t, s))
  mse = sum(np.mean((a - b) ** 2) for a, b in zip(t, s))
  got = {k: float(losses.distillation_loss(t, s, k)[0]) for k in losses.LOSS_KINDS}
  np.testing.assert_allclose(got["flat_cosine"], flat, rtol=1e-5)
  np.testing.assert_allclose(got["pixel_cosine"], pixel, rtol=1e-5)
  np.testing.assert_allclose(got["mse"], mse, rtol=1e-5)
  np.testing.assert_allclose(got["mse_cosine"], 0.5 * mse + 0.5 * flat, rtol=1e-5)
  # SK-RD4AD consistency: |MSE(up(E3), up(D1)) - MSE(E2, D2)| + |MSE(up(E2), up(D2)) - MSE(E1, D3)|.
  up = lambda x, ref: _np_align_corners(x, ref.shape[1], ref.shape[2])
  m = lambda a, b: np.mean((a - b) ** 2)
  cons = abs(m(up(t[2], t[1]), up(s[2], t[1])) - m(t[1], s[1])) + abs(
    m(up(t[1], t[0]), up(s[1], t[0])) - m(t[0], s[0])
  )
  total, parts = losses.distillation_loss(t, s, "flat_cosine", consistency_rate=0.005)
  np.testing.assert_allclose(float(parts["consistency"]), cons, rtol=1e-5)
  np.testing.assert_allclose(float(total), flat + 0.005 * cons, rtol=1e-5)
  with pytest.raises(ValueError, match="config.loss.kind"):
    losses.distillation_loss(t, s, "l1")


@pytest.mark.parametrize("mode,scipy_mode", [("reflect", "reflect"), ("mirror", "mirror")])
def test_anomaly_map_against_scipy(feature_pairs, mode, scipy_mode):
  t, s = feature_pairs
  size = (48, 40)
  got = np.asarray(jax.jit(lambda a, b: amap.anomaly_map(a, b, size, blur_mode=mode))(t, s))
  levels = [
    _np_align_corners((1 - _np_cos(a.astype(np.float64), b.astype(np.float64), -1)), *size)
    for a, b in zip(t, s)
  ]
  ref = scipy.ndimage.gaussian_filter(sum(levels), sigma=(0, 4, 4), mode=scipy_mode, truncate=4.0)
  assert got.shape == (2, 48, 40)
  assert np.max(np.abs(got - ref)) <= 1e-5
  prod = np.asarray(amap.anomaly_map(t, s, size, mode="mul", sigma=0.0))
  np.testing.assert_allclose(prod, levels[0] * levels[1] * levels[2], atol=1e-5)
  np.testing.assert_allclose(
    np.asarray(amap.image_score(jnp.asarray(got))), ref.max(axis=(1, 2)), atol=1e-5
  )
  # config.anomaly_map.levels: a subset of the levels, in any order.
  np.testing.assert_allclose(
    np.asarray(amap.anomaly_map(t, s, size, sigma=0.0, levels=(2, 1))),
    levels[0] + levels[1],
    atol=1e-5,
  )
  np.testing.assert_allclose(
    np.asarray(amap.anomaly_map(t, s, size, mode="mul", sigma=0.0, levels=(3,))),
    levels[2],
    atol=1e-5,
  )
  for bad in ((), (0, 1), (4,)):
    with pytest.raises(ValueError, match="config.anomaly_map.levels"):
      amap.anomaly_map(t, s, size, levels=bad)


@pytest.mark.parametrize("field,value", [("levels", (4,)), ("mode", "max")])
def test_bad_map_settings_stop_the_method_before_training(field, value):
  cfg = defaults.get_config()
  cfg.model.teacher = "resnet18"
  cfg.anomaly_map[field] = value
  with pytest.raises(ValueError, match=f"config.anomaly_map.{field}"):
    build_method(cfg)
  cfg.anomaly_map[field] = defaults.get_config().anomaly_map[field]
  assert build_method(cfg).map_kwargs["levels"] == (1, 2, 3)


def stripe_images(n, rng, size=64):
  """A small synthetic texture: noisy vertical stripes with random phase (normalised)."""
  yy, xx = np.mgrid[:size, :size]
  del yy
  out = []
  for _ in range(n):
    img = 0.5 + 0.4 * np.sin(2 * np.pi * xx / 8 + rng.uniform(0, 2 * np.pi))
    img = img + 0.03 * rng.normal(size=(size, size))
    out.append(np.repeat(img[..., None], 3, axis=-1))
  return ((np.stack(out) - 0.45) / 0.225).astype(np.float32)


@pytest.fixture(scope="module")
def trained(small):
  """SK-RD4AD on resnet18 (random teacher) trained 40 steps on a synthetic texture."""
  sk, _, tv = small
  state = sk.init(jax.random.PRNGKey(0), tv)
  teacher_before = jax.tree.map(np.asarray, tv)
  step = steps.jitted_train_step(sk)
  stats_before = jax.tree.map(np.asarray, state.batch_stats)
  rng = np.random.default_rng(0)
  curve = []
  for _ in range(40):
    state, metrics = step(state, tv, {"image": stripe_images(8, rng)}, jax.random.PRNGKey(0))
    curve.append(float(metrics["loss"]))
  return sk, tv, state, curve, teacher_before, stats_before


def test_training_loss_falls(trained):
  _, tv, state, curve, teacher_before, stats_before = trained
  print("loss curve:", [round(c, 3) for c in curve])
  assert np.mean(curve[-5:]) < 0.5 * np.mean(curve[:3])
  assert int(state.step) == 40
  # The teacher never changes; the trainable BatchNorm statistics do.
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), teacher_before, tv)
  moved = jax.tree.map(
    lambda a, b: not np.allclose(a, np.asarray(b)), stats_before, state.batch_stats
  )
  assert all(jax.tree.leaves(moved))


def test_inactive_step_leaves_state_untouched(trained):
  sk, tv, state, *_ = trained
  batch = {"image": stripe_images(8, np.random.default_rng(5))}
  new, _ = jax.jit(lambda s: steps.train_step(sk, s, tv, batch, jax.random.PRNGKey(0), False))(
    state
  )
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(new), jax.device_get(state))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_anomaly_map_peaks_inside_a_foreign_patch(trained, seed):
  sk, tv, state, *_ = trained
  rng = np.random.default_rng(100 + seed)
  image = stripe_images(1, rng)
  y0, x0 = rng.integers(8, 40, size=2)
  red = np.stack([np.full((16, 16), 0.9), np.full((16, 16), 0.2), np.full((16, 16), 0.2)], -1)
  image[0, y0 : y0 + 16, x0 : x0 + 16] = (red - 0.45) / 0.225
  maps, scores = steps.jitted_eval_step(sk)(state, tv, jnp.asarray(image), jax.random.PRNGKey(0))
  m = np.asarray(maps[0])
  y, x = np.unravel_index(np.argmax(m), m.shape)
  assert y0 <= y < y0 + 16 and x0 <= x < x0 + 16, ((y, x), (y0, x0))
  assert m[y0 : y0 + 16, x0 : x0 + 16].mean() > 1.1 * m.mean()
  assert float(scores[0]) == pytest.approx(m.max())


@pytest.mark.parametrize(
  "kernel, stride, size",
  # 3x3 at stride 1: 8 takes the strided windows, 32 the contiguous rows; 1 (1 x 4,
  # fewer positions than taps) the im2col forward and the per-tap input gradient (layers.py).
  [
    (1, 1, 8),
    (1, 2, 8),
    (1, 2, 7),
    (3, 1, 8),
    (3, 1, 32),
    (3, 1, 1),
    (3, 2, 8),
    (3, 2, 7),
    (3, 2, 1),
    (7, 2, 9),
  ],
)
def test_gemm_convolution_equals_lax_forward_and_gradients(kernel, stride, size):
  """layers.conv2d's 'gemm' formulation (the CPU default) against lax.conv."""
  rng = np.random.default_rng(kernel * 10 + stride)
  # Not square: the stride-1 kernel gradient walks the padded rows of width W + 2p.
  x = jnp.asarray(rng.standard_normal((2, size, size + 3, 5)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((kernel, kernel, 5, 6)), jnp.float32)
  out = {impl: layers.conv2d(x, w, stride, impl) for impl in ("gemm", "xla")}
  # PyTorch's output size for padding k // 2.
  height, width = ((n + 2 * (kernel // 2) - kernel) // stride + 1 for n in (size, size + 3))
  assert out["gemm"].shape == out["xla"].shape == (2, height, width, 6)
  np.testing.assert_allclose(out["gemm"], out["xla"], rtol=1e-5, atol=1e-5)
  r = jnp.asarray(rng.standard_normal(out["xla"].shape), jnp.float32)

  def grads(impl):
    return jax.grad(lambda x, w: jnp.sum(layers.conv2d(x, w, stride, impl) * r), (0, 1))(x, w)

  for a, b in zip(grads("gemm"), grads("xla")):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="conv impl must be one of"):
    layers.conv2d(x, w, stride, "cudnn")


def test_conv_module_keeps_nn_conv_variables():
  """layers.Conv has nn.Conv's variables, initial values and outputs (parameter trees)."""
  import flax.linen as nn

  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 8, 8, 3)), jnp.float32)
  key = jax.random.PRNGKey(0)
  ours = layers.conv(4, 3, 2, name="c", use_bias=True)
  flax_conv = nn.Conv(
    4, (3, 3), (2, 2), ((1, 1), (1, 1)), use_bias=True, kernel_init=layers.kaiming_fan_out, name="c"
  )
  v_ours, v_flax = ours.init(key, x), flax_conv.init(key, x)
  assert jax.tree.map(jnp.shape, v_ours) == jax.tree.map(jnp.shape, v_flax)
  for a, b in zip(jax.tree.leaves(v_ours), jax.tree.leaves(v_flax)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(ours.apply(v_ours, x), flax_conv.apply(v_flax, x), atol=1e-5)
