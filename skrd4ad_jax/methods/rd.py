"""RD4AD (CVPR 2022) and SK-RD4AD (CVPRW 2025): one student, with or without skips."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from skrd4ad_jax import losses
from skrd4ad_jax.methods.base import Method
from skrd4ad_jax.models.student import RDStudent, student_layout
from skrd4ad_jax.train import TrainState, adam, apply_gradients, loss_metrics


class ReverseDistillation(Method):
  """Teacher -> OCBE -> decoder; SK-RD4AD adds the two teacher->decoder skips."""

  supports_feature_cache = True

  def __init__(self, config, skip: bool):
    super().__init__(config)
    self.name = "sk_rd4ad" if skip else "rd4ad"
    self.skip = skip
    self.layout = student_layout(config.model)
    self.student = RDStudent(layout=self.layout, skip=skip, dtype=self.dtype)
    t = config.train
    self.tx = adam(float(t.learning_rate), float(t.b1), float(t.b2))
    self.loss_kind = config.loss.kind
    self.consistency_rate = float(config.loss.consistency_rate) if skip else 0.0

  def init(self, rng: jax.Array, teacher_vars: Any) -> TrainState:
    del teacher_vars
    feats = [jnp.zeros(s, jnp.float32) for s in self.feature_shapes()]
    variables = self.student.init(rng, feats, train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables["batch_stats"], opt_state=self.tx.init(params))

  def train_step(self, state, teacher_vars, batch, rng):
    del rng
    feats = self.batch_features(teacher_vars, batch)

    def loss_fn(params):
      outs, mutated = self.student.apply(
          {"params": params, "batch_stats": state.batch_stats}, feats, train=True,
          mutable=["batch_stats"])
      loss, parts = losses.distillation_loss(feats, outs, self.loss_kind,
                                             self.consistency_rate)
      return loss, (parts, mutated["batch_stats"])

    (loss, (parts, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return apply_gradients(self.tx, state, grads, batch_stats), loss_metrics(loss, parts)

  def features(self, state, teacher_vars, images, rng):
    del rng
    feats = self.teacher_features(teacher_vars, images)
    outs = self.student.apply({"params": state.params, "batch_stats": state.batch_stats},
                              feats, train=False)
    return feats, [o.astype(jnp.float32) for o in outs]

  def describe(self):
    return {**super().describe(), "skip_connections": self.skip, "loss": self.loss_kind,
            "consistency_rate": self.consistency_rate}
