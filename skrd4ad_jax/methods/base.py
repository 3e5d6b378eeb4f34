"""What every RD-family method provides to the training loop, evaluator and predictor.

A method is static configuration (hashable by identity) plus pure functions of a
``TrainState``. The training loop (``skrd4ad_jax/training/``) only ever calls:

- ``init(rng, teacher_vars) -> TrainState``
- ``make_batch(images, np_rng, category) -> dict`` on the host (synthetic
  anomalies and other per-sample augmentation live here, in numpy)
- ``train_step(state, teacher_vars, batch, rng) -> (state, metrics)``
- ``anomaly_maps(state, teacher_vars, images, rng) -> (maps [B,H,W], scores [B])``
- ``teacher_features(teacher_vars, images) -> [E1, E2, E3]`` (the feature cache)
- ``feature_shapes(batch) -> [shape]`` (benchmark batches of cached features)
- ``default_num_steps(category) -> int`` (the method's own step budget; 0 = epochs)
- ``describe() -> dict`` (the checkpoint's JSON item) and ``notes() -> [str]``
  (lines of the results table)

and reads the attributes ``name``, ``map_kwargs`` and ``supports_feature_cache``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from skrd4ad_jax import anomaly_map as amap
from skrd4ad_jax import teachers
from skrd4ad_jax.methods.state import TrainState

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(model_cfg):
  name = model_cfg.get("dtype", "float32")
  if name not in DTYPES:
    raise ValueError(f"Unknown config.model.dtype {name!r}; choose one of {sorted(DTYPES)}.")
  return None if name == "float32" else DTYPES[name]


class Method:
  """Base class: the frozen teacher and the anomaly-map settings."""

  name = "base"
  # True when the training input is the clean image itself, so the frozen
  # teacher's features of the training set can be computed once.
  supports_feature_cache = False

  def __init__(self, config):
    self.config = config
    self.image_size = int(config.data.image_size)
    self.dtype = compute_dtype(config.model)
    self.teacher = teachers.build_teacher(config.model.teacher, dtype=self.dtype)
    m = config.anomaly_map
    # Checked here, so that a bad setting stops the run before training, not at
    # its first evaluation. (A stored config without `levels` maps every level.)
    levels = amap.map_levels(
      m.mode, m.get("levels"), len(teachers.get(config.model.teacher).channels)
    )
    self.map_kwargs = dict(
      mode=m.mode,
      sigma=float(m.sigma),
      truncate=float(m.truncate),
      blur_mode=m.blur_mode,
      levels=levels,
    )

  def teacher_features(self, teacher_vars: Any, images: jax.Array) -> list[jax.Array]:
    """[E1, E2, E3] of the frozen teacher (already under stop_gradient), float32 or wider."""
    feats = self.teacher.apply(teacher_vars, images)
    return [f.astype(jnp.promote_types(f.dtype, jnp.float32)) for f in feats]

  def feature_shapes(self, batch: int = 1) -> list[tuple[int, ...]]:
    s = self.image_size
    spec = teachers.get(self.config.model.teacher)
    return [(batch, s // st, s // st, c) for st, c in zip(teachers.STRIDES, spec.channels)]

  def make_batch(
    self, images: np.ndarray, np_rng: np.random.Generator, category: str
  ) -> dict[str, np.ndarray]:
    del np_rng, category
    return {"image": images}

  def default_num_steps(self, category: str) -> int:
    """The method's own step budget for ``category``; 0 = count epochs."""
    del category
    return 0

  def batch_features(self, teacher_vars: Any, batch: dict) -> list[jax.Array]:
    """Teacher features of ``batch['image']``, or the cached ``feature1..3``."""
    if "feature1" in batch:
      return [batch[f"feature{level}"] for level in (1, 2, 3)]
    return self.teacher_features(teacher_vars, batch["image"])

  def init(self, rng: jax.Array, teacher_vars: Any) -> TrainState:
    raise NotImplementedError

  def train_step(
    self, state: TrainState, teacher_vars: Any, batch: dict, rng: jax.Array
  ) -> tuple[TrainState, dict[str, jax.Array]]:
    raise NotImplementedError

  def features(
    self, state: TrainState, teacher_vars: Any, images: jax.Array, rng: jax.Array
  ) -> tuple[Sequence[jax.Array], Sequence[jax.Array]]:
    """(reference features, reconstructed features) compared by the anomaly map."""
    raise NotImplementedError

  def anomaly_maps(
    self, state: TrainState, teacher_vars: Any, images: jax.Array, rng: jax.Array
  ) -> tuple[jax.Array, jax.Array]:
    t, s = self.features(state, teacher_vars, images, rng)
    maps = amap.anomaly_map(t, s, images.shape[1:3], **self.map_kwargs)
    return maps, amap.image_score(maps)

  def notes(self) -> list[str]:
    """Lines for the results table (e.g. which inference variant was used)."""
    return []

  def describe(self) -> dict[str, Any]:
    """Facts about the method for the results table and the checkpoint JSON."""
    return {"method": self.name, "teacher": self.config.model.teacher}
