"""Data sources: what the training loop and predict receive to read images.

A ``DataSource`` lists the configured categories, decodes a category into a
``CategoryData`` and streams image files for predict. Two implement it with the
same numbers (the same uint8 arrays, masks, order and paths):

* ``PillowSource`` (here): Pillow and numpy (``skrd4ad_jax.data.decode``), for
  ``config.data.source`` 'folder' and 'demo'; no TensorFlow.
* ``data_pipelines.TFDataSource``: tf.data, and tfds for source 'tfds'.

Entry points pick one with ``data_pipelines.select_source``; library code that
is given none uses ``PillowSource``. ``SKRD4AD_DECODER`` (``decoder_choice``)
lets the user choose.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from concurrent import futures
import os

import numpy as np

from skrd4ad_jax import normalization
from skrd4ad_jax.data import category_data as category_data_lib
from skrd4ad_jax.data import decode, folder
from skrd4ad_jax.data.category_data import CategoryData, SplitArrays

DatasetError = folder.DatasetError
# Which decoder entry points use: 'auto' (tf.data when TensorFlow imports, else
# Pillow), 'tf.data', or 'pillow' (the same arrays without tf.data: on a 2-core
# CPU its pipelines take ~2.5 s to build per run, and predict, which has no
# TensorBoard writer, then never imports TensorFlow, ~4 s more).
DECODER_ENV = "SKRD4AD_DECODER"
DECODERS = ("auto", "tf.data", "pillow")
# Images decoded ahead of the consumer, in batches (predict's stream).
PREFETCH_BATCHES = 2

# (index in the paths, uint8 [S, S, 3] or None, why it failed or None)
Decoded = tuple[int, "np.ndarray | None", "str | None"]


def decoder_choice() -> str:
  """``SKRD4AD_DECODER`` (default ``auto``), checked."""
  value = os.environ.get(DECODER_ENV, "auto").strip().lower() or "auto"
  if value not in DECODERS:
    raise ValueError(f"{DECODER_ENV}={value!r}: expected one of {', '.join(DECODERS)}.")
  return value


def decode_workers() -> int:
  """Threads that decode images (Pillow and numpy release the GIL while they work)."""
  return max(1, min(8, os.cpu_count() or 1))


def failure_message(
  path: str, error: BaseException | None = None, reason: str | None = None
) -> str:
  """Why ``path`` could not be loaded, with the fix, in one line.

  Args:
    path: the image file.
    error: what its decoder raised (None: nothing known).
    reason: the words to show instead of the error's first line.
  """
  try:
    folder.check_image(path)
  except folder.DatasetError as e:
    return str(e)
  if error is None:
    return f"Could not load image {path}."
  first = reason if reason is not None else (str(error).strip().splitlines() or [""])[0]
  return (
    f"Could not decode image {path} ({type(error).__name__}: {first}). Fix: replace "
    "the file with a valid image or remove it."
  )


class DataSource:
  """Reads the data of a config: categories, decoded categories, predict's stream.

  Attributes:
    name: a short name for messages ('pillow', 'tf.data').
  """

  name: str = ""

  def categories(self, data_cfg) -> tuple[str, ...]:
    """The configured categories (``data_cfg.categories``), or every one found."""
    raise NotImplementedError

  def category_data(self, data_cfg, category: str) -> CategoryData:
    """The train / val / test data of ``category`` (decoded on first use).

    Raises:
      DatasetError: missing or malformed data, naming the file and the fix.
    """
    raise NotImplementedError

  def decoded_images(self, paths: Sequence[str], image_size: int) -> Iterator[Decoded]:
    """``(index, uint8 [S, S, 3] or None, failure message or None)`` for each path, in order."""
    raise NotImplementedError

  def image_batches(
    self, paths: Sequence[str], image_size: int, batch_size: int
  ) -> Iterator[dict[str, object]]:
    """Decodes ``paths`` in order, as the evaluation does, in padded batches (predict's stream).

    Memory stays at a few batches whatever the number of paths.

    Args:
      paths: image files.
      image_size: side of the network input.
      batch_size: images per batch; the last batch is padded with zeros.

    Yields:
      Dicts: ``image`` float32 [B, S, S, 3] ImageNet-normalised, ``image_8bit``
      uint8 [B, S, S, 3], ``index`` int64 [B] (position in ``paths``, -1 for
      padding), ``valid`` bool [B], and ``failures``: (index, message) of the
      files that could not be loaded since the previous batch (before this
      batch's last image; the last batch also has those after it). A last dict
      holds only ``failures`` when files fail after a full batch (or all fail).
    """
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    yield from batch_images(self.decoded_images(paths, image_size), image_size, batch_size)


def batch_images(
  decoded: Iterable[Decoded], image_size: int, batch_size: int
) -> Iterator[dict[str, object]]:
  """``DataSource.image_batches`` from ``decoded_images``."""
  images, indices, failures = [], [], []

  def batch():
    n, pad = len(images), batch_size - len(images)
    image_8bit = np.concatenate(
      [np.stack(images), np.zeros((pad, image_size, image_size, 3), np.uint8)]
    )
    out = {
      "image": normalization.normalize_uint8(image_8bit),
      "image_8bit": image_8bit,
      "index": np.asarray(indices + [-1] * pad, np.int64),
      "valid": np.arange(batch_size) < n,
      "failures": list(failures),
    }
    images.clear()
    indices.clear()
    failures.clear()
    return out

  for index, image, error in decoded:
    if image is None:
      failures.append((index, error))
      continue
    images.append(image)
    indices.append(index)
    if len(images) == batch_size:
      yield batch()
  if images:
    yield batch()
  elif failures:
    yield {"failures": list(failures)}


class PillowSource(DataSource):
  """Pillow and numpy: sources 'folder' and 'demo', without TensorFlow."""

  name = "pillow"

  def _check(self, data_cfg) -> None:
    if data_cfg.source == "tfds":
      raise DatasetError(
        f"config.data.source='tfds' ({data_cfg.dataset}) reads tfds records, which needs "
        "TensorFlow and tensorflow_datasets; they cannot be imported here (or this code "
        "was given the Pillow data source, e.g. by SKRD4AD_DECODER=pillow). Fix: install "
        "them (pip install tensorflow-cpu tensorflow-datasets) and pass "
        "data_pipelines.select_source(config.data), or point config.data.source='folder' "
        "and config.data.root at the extracted data set."
      )
    if data_cfg.source not in category_data_lib.FOLDER_SOURCES:
      raise category_data_lib.unknown_source(data_cfg)

  def categories(self, data_cfg) -> tuple[str, ...]:
    if data_cfg.categories:
      return tuple(data_cfg.categories)
    self._check(data_cfg)
    return category_data_lib.folder_categories(data_cfg)

  def category_data(self, data_cfg, category: str) -> CategoryData:
    self._check(data_cfg)
    splits, location = category_data_lib.folder_splits(data_cfg, category)
    size, threshold = int(data_cfg.image_size), float(data_cfg.mask_threshold)
    samples = {"train": splits.train, "val": splits.val, "test": splits.test}

    def load(sample: folder.Sample):
      try:
        image = decode.decode_image_8bit(sample.image_path, size)
      except Exception as e:  # Pillow raises many types for broken files.
        return None, category_data_lib.problem_line(sample.image_path, e)
      if not sample.mask_path:
        return (image, np.zeros([size, size], np.uint8)), None
      try:
        mask = decode.decode_mask_binary(sample.mask_path, size, threshold)
      except Exception as e:
        culprit = f"{sample.mask_path} (mask of {sample.image_path})"
        return None, category_data_lib.problem_line(culprit, e)
      return (image, mask), None

    def decode_split(split: str) -> tuple[SplitArrays, list[str]]:
      ok, problems = [], []
      with futures.ThreadPoolExecutor(decode_workers()) as pool:
        for sample, (loaded, problem) in zip(samples[split], pool.map(load, samples[split])):
          if loaded is None:
            problems.append(problem)
          else:
            ok.append((sample, *loaded))
      arrays = SplitArrays.stack(
        size,
        [image for _, image, _ in ok],
        [mask for _, _, mask in ok],
        [s.label for s, _, _ in ok],
        [s.image_path for s, _, _ in ok],
        [s.defect_type for s, _, _ in ok],
      )
      return arrays, problems

    return CategoryData(
      category,
      {k: len(v) for k, v in samples.items()},
      splits.has_masks,
      size,
      decode_split,
      location=location,
    )

  def decoded_images(self, paths: Sequence[str], image_size: int) -> Iterator[Decoded]:
    def load(item):
      index, path = item
      try:
        return index, decode.decode_image_8bit(path, image_size), None
      except Exception as e:  # Pillow raises many types for broken files.
        return index, None, failure_message(path, e)

    ahead = max(decode_workers(), 8) * (PREFETCH_BATCHES + 1)
    with futures.ThreadPoolExecutor(decode_workers()) as pool:
      pending = []
      for item in enumerate(os.fspath(p) for p in paths):
        pending.append(pool.submit(load, item))
        if len(pending) >= ahead:
          yield pending.pop(0).result()
      for future in pending:
        yield future.result()
