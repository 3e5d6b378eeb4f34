"""Same numbers as the official code: BatchNorm, the training step, Adam.

The oracle is the official modules and losses restated in PyTorch
(``official_torch.py``), with resnet18 as the teacher, one block per stage and
64 px inputs. The official modules' random weights (and randomised BatchNorm
statistics) are carried into the project by the checkpoint importer, so both
sides start from identical weights on an identical batch.

- ``layers.BatchNorm`` against ``torch.nn.BatchNorm2d``: outputs and running
  statistics over three training steps (PyTorch folds the unbiased variance).
- RD4AD and SK-RD4AD (with the consistency term): the loss in float32; the
  gradients in float64 (JAX x64); three full training steps in float64 (loss,
  parameters and BatchNorm statistics after every step); Adam fed identical
  gradients for two steps in float32.

In float32, Adam's first step moves each parameter by about +-lr whatever the
gradient's size, so raw float32 parameters after a step are not compared.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import official_torch as ot
import pytest
from small_models import small_config

from skrd4ad_jax import import_checkpoint as ic
from skrd4ad_jax import methods, teachers
from skrd4ad_jax.models import layers
from skrd4ad_jax.teachers import porting
from skrd4ad_jax.teachers.recipe import student_layout

torch = ot.torch
pytestmark = pytest.mark.skipif(torch is None, reason=ot.TORCH_REASON)

SIZE = 64
TOL = 1e-5


def rel(a, b) -> float:
  """||a - b|| / ||b|| in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _nchw_to_nhwc(t):
  return t.detach().permute(0, 2, 3, 1).numpy()


# ----------------------------------------------------------------------------- BatchNorm


def _torch_bn(channels, seed=0):
  bn = torch.nn.BatchNorm2d(channels)
  ot.randomize_batch_norm(bn, torch.Generator().manual_seed(seed))
  return bn


def _variables_of(bn) -> dict:
  return {
    "params": {"scale": bn.weight.detach().numpy(), "bias": bn.bias.detach().numpy()},
    "batch_stats": {"mean": bn.running_mean.numpy(), "var": bn.running_var.numpy()},
  }


def test_batch_norm_matches_torch_over_three_steps():
  channels = 6
  reference = _torch_bn(channels).train()
  variables = _variables_of(reference)
  variables = jax.tree.map(np.copy, variables)
  train_bn = jax.jit(
    lambda v, x: layers.BatchNorm(use_running_average=False).apply(v, x, mutable=["batch_stats"])
  )
  rng = np.random.RandomState(0)
  errors = {"out": [], "mean": [], "var": []}
  for step in range(3):
    # n = 2 * 4 * 4 = 32 values per channel: PyTorch's unbiased factor is 32/31.
    x = (rng.randn(2, channels, 4, 4) * (1 + step) + step).astype(np.float32)
    expected = reference(torch.from_numpy(x))
    y, updates = train_bn(variables, x.transpose(0, 2, 3, 1))
    variables = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
    errors["out"].append(rel(y, _nchw_to_nhwc(expected)))
    errors["mean"].append(rel(variables["batch_stats"]["mean"], reference.running_mean))
    errors["var"].append(rel(variables["batch_stats"]["var"], reference.running_var))
  print(f"\nBatchNorm vs torch, 3 steps: max rel { ({k: max(v) for k, v in errors.items()}) }")
  assert max(max(v) for v in errors.values()) <= TOL, errors

  reference.eval()
  x = rng.randn(3, channels, 5, 5).astype(np.float32)
  y = layers.BatchNorm(use_running_average=True).apply(variables, x.transpose(0, 2, 3, 1))
  assert rel(y, _nchw_to_nhwc(reference(torch.from_numpy(x)))) <= TOL


def test_batch_norm_bfloat16_keeps_float32_statistics():
  channels = 4
  reference = _torch_bn(channels, seed=1).train()
  variables = _variables_of(reference)
  x = np.random.RandomState(1).randn(2, 3, 3, channels).astype(np.float32) * 3 + 1
  x16 = jnp.asarray(x, jnp.bfloat16)
  y, updates = layers.BatchNorm(dtype=jnp.bfloat16).apply(variables, x16, mutable=["batch_stats"])
  assert y.dtype == jnp.bfloat16
  assert updates["batch_stats"]["var"].dtype == jnp.float32
  # The statistics are those of the bfloat16 values, computed in float32.
  reference(torch.from_numpy(np.asarray(x16.astype(jnp.float32)).transpose(0, 3, 1, 2).copy()))
  assert rel(updates["batch_stats"]["var"], reference.running_var) <= TOL
  assert rel(updates["batch_stats"]["mean"], reference.running_mean) <= TOL


def test_batch_norm_under_vmap_is_per_category():
  bn = layers.BatchNorm(use_running_average=False)
  x = np.random.RandomState(2).randn(2, 4, 3, 3, 5).astype(np.float32)  # [K, B, H, W, C]
  variables = bn.init(jax.random.PRNGKey(0), x[0])
  stacked = jax.tree.map(lambda v: jnp.stack([v, v + 0.1]), variables)
  y, upd = jax.vmap(lambda v, xi: bn.apply(v, xi, mutable=["batch_stats"]))(stacked, x)
  for k in range(2):
    one = jax.tree.map(lambda v, k=k: v[k], stacked)
    yk, updk = bn.apply(one, x[k], mutable=["batch_stats"])
    assert rel(y[k], yk) <= 1e-6
    assert rel(upd["batch_stats"]["var"][k], updk["batch_stats"]["var"]) <= 1e-6


# ----------------------------------------------------------------------------- training step


class Setup:
  """Official modules and the project's method for one method, from identical weights."""

  def __init__(self, name: str, tmp_path, rate: float = 0.05):
    cfg = small_config(name, "loss", consistency_rate=rate)
    cfg.model.teacher = "resnet18"  # the official code's teacher
    self.encoder = ot.random_encoder("resnet18", seed=3)
    torch.save(self.encoder.model.state_dict(), tmp_path / "teacher.pth")
    cfg.model.teacher_weights = str(tmp_path / "teacher.pth")
    self.method = methods.build_method(cfg)
    self.name = name
    self.res = 3 if name == "sk_rd4ad" else 0
    self.rate = rate if name == "sk_rd4ad" else 0.0
    self.models = ot.official_models(name, student_layout(cfg.model), seed=4)
    self.teacher_vars = teachers.load_teacher_variables("resnet18", cfg.model.teacher_weights)
    abstract = jax.eval_shape(self.method.init, jax.random.PRNGKey(0), self.teacher_vars)
    self.abstract = abstract
    params, batch_stats = self.imported()
    self.state = jax.tree.map(jnp.zeros_like, abstract).replace(
      params=params, batch_stats=batch_stats
    )
    self.state = self.state.replace(opt_state=self.method.tx.init(self.state.params))
    rng = np.random.RandomState(5)
    self.images = rng.randn(2, 3, SIZE, SIZE).astype(np.float32)  # NCHW, ImageNet-normalised

  def imported(self, dtype=np.float32):
    """The official modules' current tensors in the project's trees."""
    flat = {
      f"{group}.{k}": v.detach().cpu().double().numpy()
      for group, m in self.models.items()
      for k, v in m.state_dict().items()
    }
    return ic.convert(self.name, flat, self.abstract, "official modules", dtype=dtype)

  def grads_in_flax_layout(self):
    names = ic.variable_names(self.name, self.abstract)
    flat = {}
    for group, module in self.models.items():
      for k, p in module.named_parameters():
        if p.grad is not None and f"{group}.{k}" in names:
          key, shape = names[f"{group}.{k}"]
          flat[key] = ic.to_flax_layout(p.grad.detach().double().numpy(), shape)
    return porting.unflatten(flat)["params"]

  def torch_loss(self, images):
    """The official training forward (teacher eval, OCBE and decoder train)."""
    inputs = self.encoder(images)
    bn, decoder = self.models["bn"].train(), self.models["decoder"].train()
    outputs = decoder(bn(inputs), inputs[0:3], self.res)
    if self.name == "rd4ad":
      return ot.loss_fucntion(inputs, outputs)
    main, consistency = ot.loss_function(inputs[0:3], outputs, 0)
    return main + self.rate * consistency

  def to_double(self):
    for m in (self.encoder, *self.models.values()):
      m.double()
    f64 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), t)
    self.teacher_vars = f64(self.teacher_vars)
    params, batch_stats = self.imported(np.float64)
    self.state = self.state.replace(
      params=f64(params),
      batch_stats=f64(batch_stats),
      opt_state=self.method.tx.init(f64(params)),
    )
    self.images = self.images.astype(np.float64)


def _tree_rel(a, b) -> dict[str, float]:
  flat_a = dict(porting.flatten(a))
  flat_b = dict(porting.flatten(b))
  assert flat_a.keys() == flat_b.keys()
  return {k: rel(flat_a[k], flat_b[k]) for k in flat_b}


def _worst(errors: dict[str, float]) -> tuple[str, float]:
  key = max(errors, key=errors.get)
  return key, errors[key]


@pytest.mark.parametrize("name", ["rd4ad", "sk_rd4ad"])
def test_loss_and_batch_statistics_float32(name, tmp_path):
  s = Setup(name, tmp_path)
  loss_t = s.torch_loss(torch.from_numpy(s.images))
  batch = {"image": s.images.transpose(0, 2, 3, 1)}
  state, metrics = jax.jit(s.method.train_step)(
    s.state, s.teacher_vars, batch, jax.random.PRNGKey(0)
  )
  print(f"\n{name} float32: loss rel {rel(metrics['loss'], loss_t.item()):.2e}")
  assert rel(metrics["loss"], loss_t.item()) <= TOL
  # The torch forward above updated the running statistics exactly once, as our step did.
  _, stats_t = s.imported()
  key, err = _worst(_tree_rel(state.batch_stats, stats_t))
  print(f"{name} float32: BatchNorm statistics after the step, worst rel {err:.2e} ({key})")
  assert err <= TOL, (key, err)


@pytest.mark.parametrize("name", ["rd4ad", "sk_rd4ad"])
def test_gradients_float64(name, tmp_path):
  s = Setup(name, tmp_path)
  with jax.enable_x64(True):
    s.to_double()
    loss_t = s.torch_loss(torch.from_numpy(s.images))
    loss_t.backward()
    feats = s.method.teacher_features(s.teacher_vars, s.images.transpose(0, 2, 3, 1))
    assert feats[0].dtype == jnp.float64
    loss, parts, _, grads = jax.jit(s.method.loss_and_grads)(
      s.state.params, s.state.batch_stats, feats, feats, jax.random.PRNGKey(0)
    )
    assert grads["decoder"]["layer1_0"]["conv1"]["kernel"].dtype == jnp.float64
    assert rel(loss, loss_t.item()) <= 1e-10
    if name == "sk_rd4ad":
      assert float(parts["consistency"]) > 0
    errors = _tree_rel(grads, s.grads_in_flax_layout())
  key, err = _worst(errors)
  print(f"\n{name} float64: loss rel {rel(loss, loss_t.item()):.2e}, gradients worst rel {err:.2e}")
  assert err <= TOL, (key, err)


@pytest.mark.parametrize("name", ["rd4ad", "sk_rd4ad"])
def test_three_training_steps_float64(name, tmp_path):
  s = Setup(name, tmp_path)
  params_t = [p for m in (s.models["decoder"], s.models["bn"]) for p in m.parameters()]
  with jax.enable_x64(True):
    s.to_double()
    optimizer = torch.optim.Adam(params_t, lr=0.005, betas=(0.5, 0.999))
    step = jax.jit(s.method.train_step)
    state, rng, losses = s.state, np.random.RandomState(6), []
    for i in range(3):
      images = rng.randn(2, 3, SIZE, SIZE)  # a new batch every step
      loss_t = s.torch_loss(torch.from_numpy(images))
      optimizer.zero_grad()
      loss_t.backward()
      optimizer.step()
      state, metrics = step(
        state, s.teacher_vars, {"image": images.transpose(0, 2, 3, 1)}, jax.random.PRNGKey(i)
      )
      losses.append(rel(metrics["loss"], loss_t.item()))
      assert losses[-1] <= TOL, i
    params_expected, stats_expected = s.imported(np.float64)
    param_err = _worst(_tree_rel(state.params, params_expected))
    stats_err = _worst(_tree_rel(state.batch_stats, stats_expected))
  print(
    f"\n{name} float64, 3 steps: loss rel {max(losses):.2e}, parameters {param_err[1]:.2e}, "
    f"BatchNorm statistics {stats_err[1]:.2e}"
  )
  assert int(state.step) == 3
  assert param_err[1] <= TOL, param_err
  assert stats_err[1] <= TOL, stats_err


def test_adam_update_fed_identical_gradients():
  """optax Adam (the method's ``tx``, float32) against torch.optim.Adam, two steps.

  torch runs in float64, so that its update (new minus old parameter) is not
  rounded to float32's resolution at the parameter's scale.
  """
  method = methods.build_method(small_config("sk_rd4ad", "loss"))
  rng = np.random.RandomState(7)
  shapes = {"a": (3, 3, 4, 5), "b": (5,), "c": (7, 2)}
  params = {k: rng.randn(*s).astype(np.float32) for k, s in shapes.items()}
  torch_params = {
    k: torch.nn.Parameter(torch.from_numpy(v.astype(np.float64))) for k, v in params.items()
  }
  optimizer = torch.optim.Adam(torch_params.values(), lr=0.005, betas=(0.5, 0.999))
  opt_state = method.tx.init(params)
  update = jax.jit(method.tx.update)
  errors = []
  for _ in range(2):
    # Gradients spanning 6 orders of magnitude, where Adam's normalisation matters.
    grads = {
      k: (rng.randn(*s) * 10.0 ** rng.uniform(-6, 0, s)).astype(np.float32)
      for k, s in shapes.items()
    }
    for k, p in torch_params.items():
      p.grad = torch.from_numpy(grads[k].astype(np.float64))
    before = {k: p.detach().numpy().copy() for k, p in torch_params.items()}
    optimizer.step()
    updates, opt_state = update(grads, opt_state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    for k, p in torch_params.items():
      errors.append(rel(updates[k], p.detach().numpy() - before[k]))
  print(f"\nAdam fed identical gradients, 2 steps: updates worst rel {max(errors):.2e}")
  assert max(errors) <= TOL, errors
