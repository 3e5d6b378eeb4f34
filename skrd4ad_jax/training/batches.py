"""Training batches on the host: a pure function of (job seed, step), made ahead in workers.

The batch of step ``t`` of a job takes positions ``[t B, (t + 1) B)`` of the
concatenation of the job's epoch permutations ``perm_e =
default_rng((seed, e)).permutation(n)`` of its ``n`` training images, so batches
are always full (they run across epoch boundaries), every epoch is a fresh
order, and the batch of any step can be made without the ones before it: a run
resumed at step ``t``, or a job continued in another slot, sees exactly the
batches it would have seen. The method's host-side augmentation (MRKD's ILM,
RD with Expert's DRAEM) draws from ``default_rng((seed, crc32(category), t))``.

Images come from host memory (``CategoryData.load``: uint8 at the configured
size) or, with ``config.train.cache_teacher_features``, from the frozen
teacher's features of the training images computed once. ``Prefetcher`` builds
the next steps' batches in worker threads while the device computes (numpy and
the augmentations release the GIL for their array work).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent import futures
import zlib

import numpy as np

from skrd4ad_jax import normalization


def batch_indices(seed: int, step: int, n: int, batch_size: int) -> np.ndarray:
  """Indices of the images of step ``step``: [batch_size] int64.

  Args:
    seed: the job's seed.
    step: the job's step (0-based).
    n: number of training images (>= 1).
    batch_size: images per batch.
  """
  start = step * batch_size
  epoch, offset = divmod(start, n)
  out = []
  while len(out) < batch_size:
    order = np.random.default_rng((seed, epoch)).permutation(n)
    take = order[offset : offset + batch_size - len(out)]
    out.extend(take.tolist())
    epoch, offset = epoch + 1, 0
  return np.asarray(out, np.int64)


def augmentation_rng(seed: int, category: str, step: int) -> np.random.Generator:
  """The host generator of step ``step``'s synthetic anomalies."""
  return np.random.default_rng((seed, zlib.crc32(category.encode()), step))


class JobInput:
  """Cuts one job's training batches from images (uint8) or cached teacher features.

  Attributes:
    name: the job's name (a key for the prefetcher).
  """

  def __init__(
    self,
    name: str,
    category: str,
    seed: int,
    batch_size: int,
    method,
    images: np.ndarray | None = None,
    features: Sequence[np.ndarray] | None = None,
  ):
    """Args:
    name: the job's name.
    category: its category (ILM's per-category table, the augmentation seed).
    seed: the job's seed (order and augmentation).
    batch_size: images per batch.
    method: the ``methods.Method`` (its ``make_batch``).
    images: uint8 [N, S, S, 3] training images, or
    features: [E1, E2, E3] float32 [N, ...] cached teacher features.
    """
    if (images is None) == (features is None):
      raise ValueError("JobInput needs images or features, not both.")
    self.name = name
    self.category = category
    self.seed = int(seed)
    self.batch_size = int(batch_size)
    self.method = method
    self.images = images
    self.features = features
    self.n = len(images) if images is not None else len(features[0])
    if self.n < 1:
      raise ValueError(f"Job {name!r} has no training image.")

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """The host batch of ``step`` (what the method's train step takes)."""
    idx = batch_indices(self.seed, step, self.n, self.batch_size)
    if self.features is not None:
      return {f"feature{level + 1}": f[idx] for level, f in enumerate(self.features)}
    images = normalization.normalize_uint8(self.images[idx])
    return self.method.make_batch(
      images, augmentation_rng(self.seed, self.category, step), self.category
    )


class Prefetcher:
  """Makes batches ahead of the step in worker threads.

  ``get(job, step)`` returns the batch (made now if nobody asked for it
  before); ``ask(job, step)`` starts making one. Results are a pure function of
  (job, step), so the order in which workers finish does not matter.
  """

  def __init__(self, workers: int):
    self.pool = futures.ThreadPoolExecutor(workers, "batches") if workers > 0 else None
    self.pending: dict[tuple[str, int], futures.Future] = {}

  def ask(self, job: JobInput, step: int) -> None:
    key = (job.name, step)
    if self.pool is not None and key not in self.pending:
      self.pending[key] = self.pool.submit(job.batch, step)

  def get(self, job: JobInput, step: int) -> dict[str, np.ndarray]:
    future = self.pending.pop((job.name, step), None)
    return future.result() if future is not None else job.batch(step)

  def forget(self, name: str) -> None:
    """Drops the batches asked for job ``name`` (it stopped, or left its slot)."""
    for key in [k for k in self.pending if k[0] == name]:
      self.pending.pop(key).cancel()

  def close(self, wait: bool = True) -> None:
    """Cancels the batches not started; ``wait=False`` leaves those being made running."""
    for future in self.pending.values():
      future.cancel()
    self.pending.clear()
    if self.pool is not None:
      self.pool.shutdown(wait=wait, cancel_futures=True)
      self.pool = None  # closed: a second close waits for nothing


def synthetic_batch(method, config, num_slots, np_rng):
  """Random data shaped like the trainer's device batch: [num_slots, B, ...] (benchmarks)."""
  b, s = int(config.train.batch_size), int(config.data.image_size)
  if config.train.get("cache_teacher_features", False):
    if not method.supports_feature_cache:
      raise ValueError(
        "config.train.cache_teacher_features needs a method without input "
        f"augmentation; {method.name} augments its inputs."
      )
    return {
      f"feature{level + 1}": np_rng.standard_normal((num_slots, *shape), np.float32)
      for level, shape in enumerate(method.feature_shapes(b))
    }
  category = (tuple(config.data.categories) or ("synthetic",))[0]
  slots = [
    method.make_batch(np_rng.standard_normal((b, s, s, 3)).astype(np.float32), np_rng, category)
    for _ in range(num_slots)
  ]
  return {k: np.stack([x[k] for x in slots]) for k in slots[0]}
