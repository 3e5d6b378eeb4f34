"""The distillation step shared by RD4AD, SK-RD4AD and MRKD.

These methods have one trainable student (OCBE + decoder, plus MRKD's heads)
fed frozen teacher features and trained with one Adam against teacher
features; they differ only in what the student sees (the clean image's
features, or MRKD's corrupted ones), in the student's keyword arguments and in
the loss's consistency term. ``DistillationMethod`` holds that common part:
``init``, the optimisation step and the inference features.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from skrd4ad_jax import losses
from skrd4ad_jax.methods.base import Method
from skrd4ad_jax.methods.state import TrainState, adam, apply_gradients, loss_metrics
from skrd4ad_jax.teachers.recipe import student_layout


class DistillationMethod(Method):
  """Frozen teacher -> trainable ``student`` -> distillation loss against the teacher.

  Subclasses build ``self.student`` (a module called as ``student(features,
  train=..., **student_kwargs(...))`` returning features paired with the
  teacher's) and say what the student is fed in ``train_step``.
  """

  consistency_rate = 0.0

  def __init__(self, config):
    super().__init__(config)
    self.layout = student_layout(config.model)
    t = config.train
    self.tx = adam(float(t.learning_rate), float(t.b1), float(t.b2))
    self.loss_kind = config.loss.kind
    self.student: nn.Module | None = None

  def student_kwargs(self, mode: str, rng: jax.Array | None) -> dict[str, Any]:
    """Extra keyword arguments of the student for ``mode`` ('init', 'train', 'eval')."""
    del mode, rng
    return {}

  def init(self, rng: jax.Array, teacher_vars: Any) -> TrainState:
    del teacher_vars
    feats = [jnp.zeros(s, jnp.float32) for s in self.feature_shapes()]
    variables = self.student.init(rng, feats, train=False, **self.student_kwargs("init", None))
    params = variables["params"]
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables["batch_stats"],
      opt_state=self.tx.init(params),
    )

  def loss_and_grads(
    self,
    params: Any,
    batch_stats: Any,
    targets: Sequence[jax.Array],
    inputs: Sequence[jax.Array],
    rng: jax.Array,
  ) -> tuple[jax.Array, dict[str, jax.Array], Any, Any]:
    """The training forward and backward pass of the student, without the update.

    Args:
      params: the student's parameters.
      batch_stats: its BatchNorm statistics before the step.
      targets: teacher features [E1, E2, E3] the student must reproduce.
      inputs: teacher features the student is fed (the same, or corrupted ones).
      rng: the step's PRNG key (MRKD's masks).

    Returns:
      (loss, loss parts, BatchNorm statistics after the forward, gradients).
    """

    def loss_fn(params):
      outs, mutated = self.student.apply(
        {"params": params, "batch_stats": batch_stats},
        inputs,
        train=True,
        mutable=["batch_stats"],
        **self.student_kwargs("train", rng),
      )
      loss, parts = losses.distillation_loss(targets, outs, self.loss_kind, self.consistency_rate)
      return loss, (parts, mutated["batch_stats"])

    (loss, (parts, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, parts, new_stats, grads

  def distill_step(
    self,
    state: TrainState,
    targets: Sequence[jax.Array],
    inputs: Sequence[jax.Array],
    rng: jax.Array,
  ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One Adam step of the student fed ``inputs``, distilled towards ``targets``.

    Args:
      state: the category's state.
      targets: teacher features [E1, E2, E3] the student must reproduce.
      inputs: teacher features the student is fed (the same, or corrupted ones).
      rng: the step's PRNG key (MRKD's masks).
    """
    loss, parts, batch_stats, grads = self.loss_and_grads(
      state.params, state.batch_stats, targets, inputs, rng
    )
    return apply_gradients(self.tx, state, grads, batch_stats), loss_metrics(loss, parts)

  def features(self, state, teacher_vars, images, rng):
    feats = self.teacher_features(teacher_vars, images)
    outs = self.student.apply(
      {"params": state.params, "batch_stats": state.batch_stats},
      feats,
      train=False,
      **self.student_kwargs("eval", rng),
    )
    return feats, [o.astype(jnp.promote_types(o.dtype, jnp.float32)) for o in outs]

  def describe(self):
    return {**super().describe(), "loss": self.loss_kind}
