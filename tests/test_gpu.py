"""Checks for an accelerator (``scripts/gpu_check.sh``): deselected in the default CPU run.

``python -m pytest -m gpu`` runs these and the other ``gpu``-marked checks (the
bf16 ones of ``tests/test_bf16.py``, which also run by default on CPU). They use
the default JAX backend in-process, need no TensorFlow, and take the tiny model.
On CPU the same equivalence is checked by ``tests/test_parallel.py``.
"""

import os

import jax
import numpy as np
import pytest

from skrd4ad_jax import methods, teachers
from skrd4ad_jax.config import load_config
from skrd4ad_jax.training import parallel, steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.gpu, pytest.mark.accelerator]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_vmapped_slots_equal_single_steps_on_the_default_backend(dtype):
  cfg = load_config(os.path.join(REPO, "configs", "tiny.py"))
  cfg.model.dtype = dtype
  cfg.model.oce_blocks = 1
  cfg.model.decoder_blocks = (1, 1, 1)
  cfg.train.batch_size = 4
  method = methods.build_method(cfg)
  teacher_vars = teachers.load_teacher_variables(cfg.model.teacher, "random", image_size=64, seed=0)
  k, num_steps = 3, 3
  init = jax.jit(method.init)
  states = [jax.device_get(init(jax.random.PRNGKey(i), teacher_vars)) for i in range(k)]
  keys = [np.asarray(jax.random.PRNGKey(10 + i)) for i in range(k)]
  images = np.random.default_rng(0).normal(size=(num_steps, k, 4, 64, 64, 3)).astype(np.float32)
  single = steps.jitted_train_step(method)
  ref_losses = np.zeros((num_steps, k))
  for c in range(k):
    state = states[c]
    for t in range(num_steps):
      state, m = single(state, teacher_vars, {"image": images[t, c]}, keys[c], True)
      ref_losses[t, c] = float(m["loss"])
  mesh = parallel.make_mesh(k)
  slots = parallel.num_slots(mesh, -(-k // mesh.shape[parallel.CATEGORY_AXIS]))
  stacked = parallel.put_stacked(parallel.stack(states + [states[0]] * (slots - k)), mesh)
  step = parallel.make_parallel_train_step(method, mesh, "vmap")
  tv = parallel.put_replicated(teacher_vars, mesh)
  rngs = np.stack(keys + [keys[0]] * (slots - k))
  active = np.arange(slots) < k
  for t in range(num_steps):
    batch = np.concatenate([images[t], np.zeros((slots - k, 4, 64, 64, 3), np.float32)])
    stacked, m = step(stacked, tv, parallel.put_batch({"image": batch}, mesh), rngs, active)
    losses = np.asarray(m["loss"])[:k]
    tol = 1e-4 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(losses, ref_losses[t], rtol=tol)
