"""The training data on the host: decoded and checked once, cut into each job's batches.

``load_data`` decodes every split of this process's categories before the first
step (so a bad file stops the run at once) and checks that the splits the run
needs are not empty; the problems of every process stop every process.
``JobInputs`` makes a job's ``batches.JobInput`` (images, or the frozen
teacher's features computed once per category with
``config.train.cache_teacher_features``) and the zeros a slot's batch is shaped
like.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np

from skrd4ad_jax.training import batches as batches_lib
from skrd4ad_jax.training import parallel
from skrd4ad_jax.training.jobs import Job


def load_data(
  config: ml_collections.ConfigDict, data: dict[str, Any], categories: list[str], eval_only: bool
) -> None:
  """Decodes every split of ``categories``; problems stop every process (collective).

  Raises:
    DatasetError: a file cannot be read or a split the run needs is empty (the
      problems of every process, one per clause).
  """
  from skrd4ad_jax.data.folder import DatasetError

  problems = []
  for category in categories:
    category_data = data[category]
    try:
      category_data.load()
    except DatasetError as e:
      problems.append(str(e))
      continue
    problems += split_problems(config, category_data, eval_only)
  problems = [p for ps in parallel.allgather_json(problems) for p in ps]
  if problems:
    raise DatasetError(" | ".join(problems))


def split_problems(config: ml_collections.ConfigDict, data, eval_only: bool) -> list[str]:
  """The empty splits the run needs, each with its fix."""
  where = f"category {data.category!r} ({data.location})"
  problems = []
  if not eval_only and data.num_train == 0:
    problems.append(
      f"{where}: split 'train' is empty. Fix: add normal images to train/good (or lower "
      "config.data.val_fraction)."
    )
  if data.num_test == 0:
    problems.append(f"{where}: split 'test' is empty. Fix: add test/good and test/<defect> images.")
  if config.thresholds.source == "val" and data.num_val == 0:
    problems.append(
      f"{where}: split 'val' (held-out normal training images for the thresholds) is "
      f"empty with {data.num_train} training image(s). Fix: add training images, raise "
      "config.data.val_fraction, or set config.thresholds.source='test'."
    )
  return problems


def host_workers(config: ml_collections.ConfigDict) -> int:
  """Batch-making threads: ``config.data.host_workers``, or up to 4 by the CPU count."""
  workers = int(config.data.get("host_workers", 0))
  return workers if workers > 0 else min(4, os.cpu_count() or 1)


class JobInputs:
  """Each job's batch maker, and the teacher-feature cache they share."""

  def __init__(self, config: ml_collections.ConfigDict, method, data: dict[str, Any], teacher_vars):
    self._config = config
    self._method = method
    self._data = data
    self._teacher_vars = teacher_vars
    self._cache_features = bool(config.train.get("cache_teacher_features", False))
    self._features: dict[str, list[np.ndarray]] = {}

  def job_input(self, job: Job) -> batches_lib.JobInput:
    """The batch maker of ``job`` (its images, or its category's cached features)."""
    bs = int(self._config.train.batch_size)
    if self._cache_features:
      features = self._teacher_features(job.category)
      return batches_lib.JobInput(
        job.name, job.category, job.seed, bs, self._method, features=features
      )
    images = self._data[job.category].train_images
    return batches_lib.JobInput(job.name, job.category, job.seed, bs, self._method, images=images)

  def _teacher_features(self, category: str) -> list[np.ndarray]:
    """The frozen teacher's features of the training images, once per category.

    Without input augmentation they never change, so they are computed once
    instead of every epoch; a job's batches are the same images in the same
    order as without the cache (the features, computed in evaluation batches,
    agree to float round-off).
    """
    if category not in self._features:
      teacher_fn = jax.jit(self._method.teacher_features)
      feats = [[], [], []]
      bs = int(self._config.eval.batch_size)
      for batch in self._data[category].eval_batches("train", bs):
        valid = np.asarray(batch["valid"], bool)
        for level, f in enumerate(teacher_fn(self._teacher_vars, batch["image"])):
          feats[level].append(np.asarray(f)[valid])
      self._features[category] = [np.concatenate(f) for f in feats]
    return self._features[category]

  def release(self) -> None:
    """Drops the cached features (the run is over)."""
    self._features.clear()

  def batch_template(self) -> dict[str, np.ndarray]:
    """Zeros shaped like one slot's training batch (the same on every process)."""
    cfg = self._config
    bs, size = int(cfg.train.batch_size), int(cfg.data.image_size)
    images = np.zeros((bs, size, size, 3), np.float32)
    if self._cache_features:
      shapes = jax.eval_shape(self._method.teacher_features, self._teacher_vars, images)
      return {f"feature{level + 1}": np.zeros(s.shape, s.dtype) for level, s in enumerate(shapes)}
    batch = self._method.make_batch(images, np.random.default_rng(0), "")
    return {k: np.zeros_like(v) for k, v in batch.items()}
