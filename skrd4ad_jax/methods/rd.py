"""RD4AD (CVPR 2022) and SK-RD4AD (CVPRW 2025): one student, with or without skips."""

from __future__ import annotations

from skrd4ad_jax.methods.distill import DistillationMethod
from skrd4ad_jax.models.student import RDStudent


class ReverseDistillation(DistillationMethod):
  """Teacher -> OCBE -> decoder; SK-RD4AD adds the two teacher->decoder skips."""

  supports_feature_cache = True

  def __init__(self, config, skip: bool):
    super().__init__(config)
    self.name = "sk_rd4ad" if skip else "rd4ad"
    self.skip = skip
    self.student = RDStudent(layout=self.layout, skip=skip, dtype=self.dtype)
    self.consistency_rate = float(config.loss.consistency_rate) if skip else 0.0

  def train_step(self, state, teacher_vars, batch, rng):
    feats = self.batch_features(teacher_vars, batch)
    return self.distill_step(state, feats, feats, rng)

  def describe(self):
    return {
      **super().describe(),
      "skip_connections": self.skip,
      "consistency_rate": self.consistency_rate,
    }
