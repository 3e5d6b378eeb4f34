"""Mixed precision: config.model.dtype='bfloat16' computes in bf16, keeps float32 state.

No TensorFlow: images are read with Pillow from a small demo tree, so the same
checks run on an accelerator machine without it (``scripts/gpu_check.sh`` runs
this file there too).
"""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from skrd4ad_jax import methods, normalization, teachers
from skrd4ad_jax.config import load_config
from skrd4ad_jax.evaluation import metrics
from skrd4ad_jax.training import steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64


# bfloat16's rounding accumulates over channels: the ranking check keeps a real
# teacher's widths; the dtype wiring of every method is checked on the tiny config's.
RANKING_TEACHER = "resnet18"


def config(name="sk_rd4ad", dtype="float32", teacher=None):
  cfg = load_config(os.path.join(REPO, "configs", "tiny.py"))
  cfg.model.teacher = teacher or cfg.model.teacher
  cfg.model.name = name
  cfg.model.dtype = dtype
  cfg.model.oce_blocks = 1
  cfg.model.decoder_blocks = (1, 1, 1)
  cfg.train.batch_size = 4
  return cfg


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  """(train uint8 [N,S,S,3], test uint8, test masks {0,1}) of the demo's brick at 64 px."""
  from skrd4ad_jax.data import demo_data

  root = demo_data.ensure_demo_dataset(
    str(tmp_path_factory.mktemp("bf16") / "demo"),
    seed=0,
    image_size=SIZE,
    num_train=16,
    num_test_good=4,
    num_test_per_defect=2,
  )

  def read(pattern):
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(glob.glob(pattern))])

  base = os.path.join(root, "brick")
  train_images = read(os.path.join(base, "train", "good", "*.png"))
  test_paths = sorted(glob.glob(os.path.join(base, "test", "*", "*.png")))
  test_images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in test_paths])
  masks = []
  for p in test_paths:
    defect, stem = p.split(os.sep)[-2], os.path.splitext(os.path.basename(p))[0]
    mask_path = os.path.join(base, "ground_truth", defect, f"{stem}_mask.png")
    masks.append(
      np.asarray(Image.open(mask_path).convert("L")) > 127
      if os.path.exists(mask_path)
      else np.zeros((SIZE, SIZE), bool)
    )
  return train_images, test_images, np.stack(masks).astype(np.uint8)


def train_steps(method, teacher_vars, images, num_steps, seed=0):
  state = jax.jit(method.init)(jax.random.PRNGKey(seed), teacher_vars)
  step = steps.jitted_train_step(method)
  rng = np.random.default_rng(seed)
  losses = []
  for t in range(num_steps):
    idx = rng.choice(len(images), 4, replace=False)
    batch = method.make_batch(normalization.normalize_uint8(images[idx]), rng, "brick")
    state, m = step(state, teacher_vars, batch, jax.random.PRNGKey(t), True)
    losses.append(float(m["loss"]))
  return state, losses


def pixel_auroc(method, state, teacher_vars, images, masks):
  maps, _ = jax.jit(method.anomaly_maps)(
    state, teacher_vars, normalization.normalize_uint8(images), jax.random.PRNGKey(0)
  )
  maps = np.asarray(maps)
  assert maps.dtype == np.float32 and np.isfinite(maps).all()
  return metrics.pixel_auroc(masks, maps)


@pytest.mark.slow
@pytest.mark.gpu
def test_bf16_maps_rank_pixels_like_float32_and_bf16_training_lowers_the_loss(demo):
  train_images, test_images, masks = demo
  f32 = methods.build_method(config(teacher=RANKING_TEACHER))
  bf16 = methods.build_method(config(dtype="bfloat16", teacher=RANKING_TEACHER))
  teacher_vars = teachers.load_teacher_variables(RANKING_TEACHER, "random", image_size=SIZE, seed=0)
  state, _ = train_steps(f32, teacher_vars, train_images, 30)
  # The same trained state, maps computed in float32 and in bfloat16.
  a32 = pixel_auroc(f32, state, teacher_vars, test_images, masks)
  a16 = pixel_auroc(bf16, state, teacher_vars, test_images, masks)
  assert abs(a32 - a16) <= 0.005, (a32, a16)
  # Training in bfloat16 lowers the loss, with float32 state throughout.
  state16, losses = train_steps(bf16, teacher_vars, train_images, 30)
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:3]), losses
  for leaf in jax.tree.leaves((state16.params, state16.batch_stats, state16.opt_state)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sk_rd4ad", "rd4ad", "mrkd", "rd_expert"])
def test_every_method_trains_and_maps_in_bf16_with_float32_state(name, demo):
  train_images, test_images, _ = demo
  cfg = config(name, "bfloat16")
  method = methods.build_method(cfg)
  teacher_vars = teachers.load_teacher_variables(
    cfg.model.teacher, "random", image_size=SIZE, seed=0
  )
  state, losses = train_steps(method, teacher_vars, train_images, 2)
  assert all(np.isfinite(losses)), losses
  dtypes = {
    leaf.dtype for leaf in jax.tree.leaves((state.params, state.batch_stats, state.opt_state))
  }
  assert dtypes <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}, dtypes
  maps, scores = jax.jit(method.anomaly_maps)(
    state, teacher_vars, normalization.normalize_uint8(test_images[:2]), jax.random.PRNGKey(0)
  )
  assert maps.dtype == jnp.float32 and scores.dtype == jnp.float32
  assert np.isfinite(np.asarray(maps)).all()
