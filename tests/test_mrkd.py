"""MRKD: FLM heads, masks, ILM batches, training and (non-)stochastic inference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from small_models import count, small_config

from skrd4ad_jax import teachers
from skrd4ad_jax.methods import build_method
from skrd4ad_jax.methods.mrkd import heads as mrkd_heads
from skrd4ad_jax.teachers.recipe import student_layout
from skrd4ad_jax.training import parallel, steps

SIZE = 64
WRN_CHANNELS = (256, 512, 1024)


def mrkd_config(**mrkd):
  return small_config("mrkd", "mrkd", **mrkd)


@pytest.fixture(scope="module")
def teacher_vars():
  return teachers.load_teacher_variables(mrkd_config().model.teacher, "random", SIZE)


@pytest.fixture(scope="module")
def method():
  return build_method(mrkd_config())


@pytest.fixture(scope="module")
def state(method, teacher_vars):
  return jax.jit(method.init)(jax.random.PRNGKey(0), teacher_vars)


def test_generation_heads_parameter_count_matches_spec():
  # wide_resnet50_2 decoder outputs [D3, D2, D1] (spatial size does not matter).
  decoded = [
    jax.ShapeDtypeStruct((1, 8 * 2 ** (2 - i), 8 * 2 ** (2 - i), c), jnp.float32)
    for i, c in enumerate(WRN_CHANNELS)
  ]
  heads = mrkd_heads.FLMHeads()
  shapes = jax.eval_shape(lambda d: heads.init(jax.random.PRNGKey(0), d, mask=False), decoded)
  assert count(shapes) == 24_776_192  # spec §6.1: 24.78 M
  assert shapes["params"]["generation1_0"]["kernel"].shape == (3, 3, 1024, 1024)
  assert shapes["params"]["generation3_2"]["bias"].shape == (256,)


def test_mrkd_student_is_rd4ad_plus_heads():
  cfg = mrkd_config()
  cfg.model.teacher = "wide_resnet50_2"
  cfg.model.oce_blocks, cfg.model.decoder_blocks = 0, ()
  student = mrkd_heads.MRKDStudent(layout=student_layout(cfg.model))
  feats = [
    jax.ShapeDtypeStruct((1, s, s, c), jnp.float32) for s, c in zip((64, 32, 16), WRN_CHANNELS)
  ]
  shapes = jax.eval_shape(lambda f: student.init(jax.random.PRNGKey(0), f), feats)
  params = shapes["params"]
  assert count(params["bottleneck"]) == 58_885_120  # spec §1.4
  assert count(params["decoder"]) == 24_917_504  # spec §1.5
  assert count(params["heads"]) == 24_776_192
  outs = jax.eval_shape(lambda v, f: student.apply(v, f), shapes, feats)
  assert [o.shape for o in outs] == [f.shape for f in feats]


def test_flm_mask_ratio():
  mask = mrkd_heads.flm_mask(jax.random.PRNGKey(0), (8, 64, 64, 32), 0.2)
  assert mask.shape == (8, 64, 64, 1)  # per sample and position, shared over channels
  assert set(np.unique(mask).tolist()) <= {0.0, 1.0}
  assert abs(float(1.0 - mask.mean()) - 0.2) < 0.01
  assert float(mrkd_heads.flm_mask(jax.random.PRNGKey(0), (2, 8, 8, 4), 0.0).min()) == 1.0


def test_flm_heads_mask_their_inputs():
  d = [jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 4))]
  rngs = {"flm": jax.random.PRNGKey(1)}
  variables = mrkd_heads.FLMHeads().init(jax.random.PRNGKey(0), d, mask=False)

  def apply(ratio, x, mask):
    return mrkd_heads.FLMHeads(mask_ratio=ratio).apply(variables, x, mask=mask, rngs=rngs)[0]

  # Ratio 1 zeroes every position, ratio 0 none; in between the output changes.
  np.testing.assert_allclose(apply(1.0, d, True), apply(1.0, [jnp.zeros_like(d[0])], False))
  np.testing.assert_allclose(apply(0.0, d, True), apply(0.0, d, False))
  assert not np.allclose(apply(0.2, d, True), apply(0.2, d, False))


def test_make_batch_ilm(method):
  images = np.random.default_rng(0).normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
  b1 = method.make_batch(images, np.random.default_rng(3), "carpet")
  b2 = method.make_batch(images, np.random.default_rng(3), "carpet")
  assert set(b1) == {"image", "augmented"}
  assert b1["augmented"].shape == images.shape and b1["augmented"].dtype == np.float32
  np.testing.assert_array_equal(b1["image"], images)
  np.testing.assert_array_equal(b1["augmented"], b2["augmented"])
  assert np.any(b1["augmented"] != images)


def test_mask_at_test_flag(teacher_vars, state):
  images = jnp.asarray(np.random.default_rng(1).normal(size=(2, SIZE, SIZE, 3)), jnp.float32)
  k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  det = build_method(mrkd_config())
  assert det.mask_at_test is False
  maps_fn = jax.jit(lambda s, x, k: det.anomaly_maps(s, teacher_vars, x, k))
  m1, s1 = maps_fn(state, images, k1)
  m2, _ = maps_fn(state, images, k2)
  assert m1.shape == (2, SIZE, SIZE) and s1.shape == (2,)
  np.testing.assert_array_equal(m1, m2)  # deterministic inference
  assert "mask_at_test=False" in " ".join(det.notes())

  sto = build_method(mrkd_config(mask_at_test=True))
  maps_fn = jax.jit(lambda s, x, k: sto.anomaly_maps(s, teacher_vars, x, k))
  a, _ = maps_fn(state, images, k1)
  b, _ = maps_fn(state, images, k1)
  c, _ = maps_fn(state, images, k2)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)  # the released behaviour: a random mask at test time
  assert "mask_at_test=True" in " ".join(sto.notes())
  assert sto.describe()["mask_at_test"] is True


@pytest.mark.slow
def test_vmapped_two_category_training_lowers_the_loss(method, teacher_vars, state):
  num_steps = 20
  categories = ("carpet", "bottle")
  stacked = parallel.stack([state, state])
  step = jax.jit(
    jax.vmap(functools.partial(steps.train_step, method), in_axes=(0, None, 0, None, 0))
  )
  images = np.random.default_rng(0).normal(size=(2, 2, SIZE, SIZE, 3)).astype(np.float32)
  losses = []
  for i in range(num_steps):
    batches = [
      method.make_batch(images[k], np.random.default_rng((k, i)), c)
      for k, c in enumerate(categories)
    ]
    batch = {key: np.stack([b[key] for b in batches]) for key in batches[0]}
    stacked, metrics = step(
      stacked, teacher_vars, batch, jax.random.PRNGKey(7), np.array([True, True])
    )
    losses.append(np.asarray(metrics["loss"]))
  losses = np.stack(losses)  # [steps, 2]
  assert np.isfinite(losses).all()
  assert (losses[-3:].mean(0) < 0.5 * losses[:3].mean(0)).all(), losses
  np.testing.assert_array_equal(np.asarray(stacked.step), [num_steps, num_steps])


def test_default_num_steps_and_describe(method):
  assert method.default_num_steps("cable") == 0
  d = method.describe()
  assert d["method"] == "mrkd" and d["mask_ratio"] == 0.2
