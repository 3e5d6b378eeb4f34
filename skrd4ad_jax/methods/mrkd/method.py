"""MRKD: Masked Reverse Knowledge Distillation (Jiang, Cao, Shen; KBS 2023).

Two masks on top of RD4AD (official ``yuxin-jiang/MRKD``):

- image-level masking (ILM, ``ilm.py``): every training image is
  corrupted by NSA-style self copy-paste on the host; the student, fed the
  teacher features of the corrupted image, must restore the teacher features of
  the clean one;
- feature-level masking (FLM, ``heads.py``): per level, 20 % of the
  decoder's spatial positions are zeroed and a two-convolution head generates
  the features.

Loss: sum over levels of the flattened cosine distance between E(x) and the
heads' outputs for OCBE(E(x~)); the teacher is frozen. Inference: clean image
-> teacher -> OCBE -> decoder -> heads, RD4AD's anomaly map.

The released code also draws the FLM mask at test time, which makes its maps
stochastic. ``config.mrkd.mask_at_test`` (default False: deterministic maps)
chooses; with it on, the masks come from the evaluation PRNG key, and
``notes()`` records the choice in the results table.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from skrd4ad_jax.config import defaults
from skrd4ad_jax.methods.distill import DistillationMethod
from skrd4ad_jax.methods.mrkd import ilm
from skrd4ad_jax.methods.mrkd.heads import FLM_RNG, MRKDStudent

# The one table of defaults is config/defaults.py.
DEFAULTS = defaults.get_config().mrkd


def mrkd_config(config) -> ml_collections.ConfigDict:
  """``config.mrkd`` with the defaults filled in (configs older than the field)."""
  out = ml_collections.ConfigDict(DEFAULTS.to_dict())
  if "mrkd" in config:
    out.update(config.mrkd.to_dict())
  return out


class MRKD(DistillationMethod):
  """Teacher (frozen) -> OCBE -> RD4AD decoder -> FLM heads, trained on ILM images."""

  name = "mrkd"

  def __init__(self, config):
    super().__init__(config)
    m = mrkd_config(config)
    self.mask_ratio = float(m.mask_ratio)
    if not 0.0 <= self.mask_ratio < 1.0:
      raise ValueError(f"config.mrkd.mask_ratio must be in [0, 1), got {self.mask_ratio}.")
    self.mask_at_test = bool(m.mask_at_test)
    self.student = MRKDStudent(layout=self.layout, mask_ratio=self.mask_ratio, dtype=self.dtype)

  def default_num_steps(self, category: str) -> int:
    """MRKD trains for epochs (200), not a fixed number of steps: 0."""
    del category
    return 0

  def make_batch(
    self, images: np.ndarray, np_rng: np.random.Generator, category: str
  ) -> dict[str, np.ndarray]:
    """{'image': clean, 'augmented': ILM self copy-paste}, both [B, H, W, 3]."""
    augmented, _ = ilm.ilm_batch(images, np_rng, category)
    return {"image": np.asarray(images, np.float32), "augmented": augmented}

  def student_kwargs(self, mode, rng):
    """FLM masks in training; at test time only with ``mask_at_test``."""
    mask = mode == "train" or (mode == "eval" and self.mask_at_test)
    return {"mask": mask, "rngs": {FLM_RNG: rng}} if mask else {"mask": False}

  def train_step(self, state, teacher_vars, batch, rng):
    clean = self.teacher_features(teacher_vars, batch["image"])
    corrupted = self.teacher_features(teacher_vars, batch["augmented"])
    return self.distill_step(state, clean, corrupted, rng)

  def notes(self) -> list[str]:
    if self.mask_at_test:
      fl = (
        f"MRKD inference: FLM mask (ratio {self.mask_ratio}) applied at test time as in "
        "the released code (config.mrkd.mask_at_test=True): maps are stochastic, drawn "
        "from the evaluation PRNG key."
      )
    else:
      fl = (
        "MRKD inference: no FLM mask at test time (config.mrkd.mask_at_test=False), "
        "deterministic maps; the released code masks at test time."
      )
    return [
      fl,
      f"MRKD training: ILM = NSA self copy-paste ('swap') with the per-category "
      f"table of the official main.py; FLM mask ratio {self.mask_ratio}.",
    ]

  def describe(self):
    return {
      **super().describe(),
      "mask_ratio": self.mask_ratio,
      "mask_at_test": self.mask_at_test,
      "ilm": "nsa_self_copy_paste_swap",
    }
