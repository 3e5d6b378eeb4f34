"""RD with Expert: fusion modules, trainable teacher, masks, the two-optimiser step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from small_models import count, small_config

from skrd4ad_jax import interpolation, losses, teachers
from skrd4ad_jax.methods import build_method
from skrd4ad_jax.methods.rd_expert import method as rd_expert
from skrd4ad_jax.methods.rd_expert import student as expert_student
from skrd4ad_jax.teachers.recipe import student_layout
from skrd4ad_jax.training import parallel, steps

SIZE = 64
WRN_CHANNELS = (256, 512, 1024)


def expert_config(**fields):
  return small_config("rd_expert", "rd_expert", **fields)


@pytest.fixture(scope="module")
def teacher_vars():
  return teachers.load_teacher_variables(expert_config().model.teacher, "random", SIZE)


@pytest.fixture(scope="module")
def method():
  return build_method(expert_config())


@pytest.fixture(scope="module")
def state(method, teacher_vars):
  return jax.jit(method.init)(jax.random.PRNGKey(0), teacher_vars)


def test_fusion_parameter_counts_match_spec():
  cfg = expert_config()
  cfg.model.teacher = "wide_resnet50_2"
  cfg.model.oce_blocks, cfg.model.decoder_blocks = 0, ()
  student = expert_student.ExpertStudent(layout=student_layout(cfg.model))
  feats = [
    jax.ShapeDtypeStruct((1, s, s, c), jnp.float32) for s, c in zip((64, 32, 16), WRN_CHANNELS)
  ]
  shapes = jax.eval_shape(lambda f: student.init(jax.random.PRNGKey(0), f), feats)
  counts = expert_student.fusion_parameter_counts(shapes["params"])
  # conv weights + BatchNorm scale/bias; spec §4.2: 23.6 M, 11.8 M, 0.66 M, 11.8 M.
  assert counts == {
    "fuse_skip": 23_596_032,
    "conv3x3_simattn": 11_799_552,
    "conv1x1_downsample_dim": 658_432,
    "fuse_encoder": 11_799_552,
  }
  spec = {
    "fuse_skip": 23.6,
    "conv3x3_simattn": 11.8,
    "conv1x1_downsample_dim": 0.66,
    "fuse_encoder": 11.8,
  }
  for name, millions in spec.items():
    assert round(counts[name] / 1e6, 2 if millions < 1 else 1) == millions
  assert count(shapes["params"]["bottleneck"]) == 58_885_120  # RD4AD's OCBE (spec §1.4)
  decoder_blocks = {k: v for k, v in shapes["params"]["decoder"].items() if k.startswith("layer")}
  assert count(decoder_blocks) == 24_917_504  # RD4AD's decoder (spec §1.5)
  outs = jax.eval_shape(lambda v, f: student.apply(v, f), shapes, feats)
  assert [o.shape for o in outs] == [f.shape for f in feats]


def test_trainable_teacher_copies_the_frozen_teacher(method, teacher_vars, state):
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, SIZE, SIZE, 3)), jnp.float32)

  @jax.jit
  def both(tv, s):
    copy, _ = method.teacher_apply(s.params["teacher"], s.batch_stats["teacher"], images, False)
    return method.teacher_features(tv, images), copy

  frozen, copy = both(teacher_vars, state)
  for a, b in zip(frozen, copy):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # A real copy (the state is donated to the step, the shared teacher is not).
  ours = state.params["teacher"]["conv1"]["kernel"]
  shared = teacher_vars["params"]["conv1"]["kernel"]
  assert ours.unsafe_buffer_pointer() != shared.unsafe_buffer_pointer()


def test_student_init_is_xavier_normal(state):
  params = state.params["student"]
  kernel = params["decoder"]["layer1_0"]["conv2"]["kernel"]  # 3x3 conv (a BasicBlock)
  fan_in, fan_out = 9 * kernel.shape[2], 9 * kernel.shape[3]
  assert abs(float(jnp.std(kernel)) / np.sqrt(2.0 / (fan_in + fan_out)) - 1) < 0.1
  oce = params["bottleneck"]["conv1"]["kernel"]  # 3x3 conv of the OCBE, overridden too
  fan_in, fan_out = 9 * oce.shape[2], 9 * oce.shape[3]
  assert abs(float(jnp.std(oce)) / np.sqrt(2.0 / (fan_in + fan_out)) - 1) < 0.1
  for deconv in (
    params["decoder"]["layer1_0"]["conv1"]["kernel"],  # keep PyTorch's default
    params["decoder"]["layer1_0"]["upsample_0"]["kernel"],
  ):
    assert deconv.shape[:2] == (2, 2)
    assert float(jnp.abs(deconv).max()) <= 1.0 / np.sqrt(4 * deconv.shape[3])


def test_cascaded_masks():
  rng = np.random.default_rng(0)
  mask = (rng.uniform(size=(2, SIZE, SIZE)) > 0.7).astype(np.float32)
  sizes = [(16, 16), (8, 8), (4, 4)]
  got = rd_expert.cascaded_masks(jnp.asarray(mask), sizes)
  m = mask
  for size, g in zip(sizes, got):
    mh = interpolation.align_corners_matrix(size[0], m.shape[1])
    mw = interpolation.align_corners_matrix(size[1], m.shape[2])
    m = (np.einsum("oh,bhw,pw->bop", mh, m, mw) >= 0.5).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(g), m)


def test_gated_and_plain_injection(method, teacher_vars, state):
  images = jnp.asarray(np.random.default_rng(1).normal(size=(2, SIZE, SIZE, 3)), jnp.float32)
  feats = method.teacher_features(teacher_vars, images)
  gated = build_method(expert_config(gated=True))
  params, stats = state.params["student"], state.batch_stats["student"]

  def run(m):
    def loss(p):
      outs, _ = m.student_apply(p, stats, feats, True)
      return sum(losses.flat_cosine_distance(t, s) for t, s in zip(feats, outs)), outs

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (_, plain_outs), plain_grads = run(method)
  (_, gated_outs), gated_grads = run(gated)
  # Same parameter tree, different outputs.
  assert not np.allclose(plain_outs[0], gated_outs[0])
  for i in (0, 1):
    name = f"conv3x3_simattn_{i}"
    assert count(plain_grads["decoder"][name]) > 0
    unused = jax.tree.leaves(plain_grads["decoder"][name])
    assert all(float(jnp.abs(g).max()) == 0.0 for g in unused)
    assert float(jnp.abs(gated_grads["decoder"][name]["conv"]["kernel"]).max()) > 0.0
  assert float(jnp.abs(plain_grads["decoder"]["fuse_skip_1"]["conv"]["kernel"]).max()) > 0.0


def test_make_batch_draem(method):
  images = np.random.default_rng(0).normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
  b1 = method.make_batch(images, np.random.default_rng(5), "bottle")
  b2 = method.make_batch(images, np.random.default_rng(5), "bottle")
  assert set(b1) == {"image", "augmented", "aug_mask"}
  assert b1["aug_mask"].shape == (2, SIZE, SIZE) and b1["aug_mask"].dtype == np.float32
  for key in b1:
    np.testing.assert_array_equal(b1[key], b2[key])
  np.testing.assert_array_equal(
    b1["aug_mask"].astype(bool), np.any(b1["augmented"] != images, axis=-1)
  )


@pytest.mark.slow
def test_vmapped_two_category_training(method, teacher_vars, state):
  num_steps = 20
  categories = ("carpet", "bottle")
  stacked = parallel.stack([state, state])
  step = jax.jit(
    jax.vmap(functools.partial(steps.train_step, method), in_axes=(0, None, 0, None, 0))
  )
  images = np.random.default_rng(0).normal(size=(2, 2, SIZE, SIZE, 3)).astype(np.float32)
  history = []
  for i in range(num_steps):
    batches = [
      method.make_batch(images[k], np.random.default_rng((k, i)), c)
      for k, c in enumerate(categories)
    ]
    batch = {key: np.stack([b[key] for b in batches]) for key in batches[0]}
    stacked, metrics = step(
      stacked, teacher_vars, batch, jax.random.PRNGKey(7), np.array([True, True])
    )
    history.append({k: np.asarray(v) for k, v in metrics.items()})
  loss = np.stack([h["loss"] for h in history])  # [steps, 2]
  student = np.stack([h["loss_student"] for h in history])
  assert np.isfinite(loss).all()
  assert (loss[-3:].mean(0) < 0.8 * loss[:3].mean(0)).all(), loss
  assert (student[-3:].mean(0) < 0.6 * student[:3].mean(0)).all(), student
  np.testing.assert_array_equal(np.asarray(stacked.step), [num_steps, num_steps])

  # Inference uses the trained teacher, which has moved away from the expert.
  trained = parallel.unstack(stacked, 0)
  moved = jax.tree.map(
    lambda a, b: float(jnp.abs(a - b).max()), trained.params["teacher"], teacher_vars["params"]
  )
  assert max(jax.tree.leaves(moved)) > 0
  x = jnp.asarray(images[0])
  maps, scores = jax.jit(lambda s: method.anomaly_maps(s, teacher_vars, x, None))(trained)
  assert maps.shape == (2, SIZE, SIZE) and scores.shape == (2,)
  assert np.isfinite(np.asarray(maps)).all()


def test_schedule_notes_and_describe(method):
  assert method.default_num_steps("carpet") == 5000
  assert method.default_num_steps("cable") == 10000
  assert method.default_num_steps("transistor") == 10000
  assert build_method(expert_config(num_steps=7)).default_num_steps("wood") == 7
  notes = " ".join(method.notes())
  assert "plain injection" in notes and "gated=False" in notes
  assert "gated=True" in " ".join(build_method(expert_config(gated=True)).notes())
  d = method.describe()
  assert d["method"] == "rd_expert" and d["gated"] is False
  assert d["teacher_learning_rate"] == 1e-4
  with pytest.raises(ValueError, match="config.rd_expert.foreground"):
    build_method(expert_config(foreground="grabcut"))
