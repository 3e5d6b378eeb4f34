"""The decoded train / val / test arrays of one category, and the configured folders.

``CategoryData`` is what the training loop and the evaluation read: every
split decoded once into host memory as uint8 at the configured size, batches
cut from memory in numpy. The decoding itself belongs to a data source
(``skrd4ad_jax.data.source``: Pillow; ``data_pipelines``: tf.data), which
gives each ``CategoryData`` a ``decode_split`` function; both sources give the
same arrays. No TensorFlow here.

Fields of ``data_cfg`` (an ``ml_collections.ConfigDict``, ``config.data``):

  source: 'folder' (an MVTec-layout tree at ``root``), 'tfds' (the builders of
    ``data_pipelines``, prepared from ``manual_dir``) or 'demo' (generated
    offline by ``skrd4ad_jax.data.demo_data.ensure_demo_dataset``, then read as
    a folder).
  dataset: tfds builder name for source 'tfds': 'mvtec_ad', 'visa' or 'vad'.
  root: folder root (<root>/<category>/train/good/...); for 'demo' where the
    demo tree is written ('' = its default location).
  categories: tuple of category names; empty = all (see ``DataSource.categories``).
  image_size: side of the square network input (256).
  mask_threshold: a resized mask pixel is defective when > this (0.5).
  val_fraction: fraction of the normal training images held out as the 'val'
    split (for thresholds), chosen deterministically by ``shuffle_seed``;
    0 = none (default 0.1).
  tfds_data_dir: tfds data_dir ('' = tfds' default, ~/tensorflow_datasets).
  manual_dir: where the downloaded archives / extracted trees are for 'tfds'
    ('' = <tfds_data_dir>/downloads/manual).
  shuffle_seed: seed of the validation hold-out (the training order is the
    job's own: see ``skrd4ad_jax.training.batches``).
  Optional: demo_seed (0): seed given to ``ensure_demo_dataset``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import dataclasses
import os

import numpy as np

from skrd4ad_jax import normalization
from skrd4ad_jax.data import folder

EVAL_SPLITS = ("test", "val", "train")
SPLITS = ("train", "val", "test")
FOLDER_SOURCES = ("folder", "demo")
# Problems named in one DatasetError.
MAX_PROBLEMS_SHOWN = 20

DatasetError = folder.DatasetError


@dataclasses.dataclass
class SplitArrays:
  """One split decoded into host memory at the configured size."""

  image: np.ndarray  # uint8 [N, S, S, 3]
  gt_mask: np.ndarray  # uint8 [N, S, S] in {0, 1} (zeros without masks)
  gt_label: np.ndarray  # int32 [N]
  image_path: list[str]
  defect_type: list[str]

  def __len__(self) -> int:
    return len(self.gt_label)

  @classmethod
  def stack(
    cls,
    image_size: int,
    images: list[np.ndarray],
    masks: list[np.ndarray],
    labels: list[int],
    paths: list[str],
    defects: list[str],
  ) -> SplitArrays:
    """Arrays from per-record lists (shapes kept for an empty split)."""
    size = int(image_size)
    return cls(
      image=np.asarray(images, np.uint8).reshape(-1, size, size, 3),
      gt_mask=np.asarray(masks, np.uint8).reshape(-1, size, size),
      gt_label=np.asarray(labels, np.int32).reshape(-1),
      image_path=list(paths),
      defect_type=list(defects),
    )


# (the decodable records of a split, one line per record that failed)
DecodeSplit = Callable[[str], tuple[SplitArrays, list[str]]]


class CategoryData:
  """The train / val / test data of one category.

  ``load`` decodes every image and mask of every split once, in parallel, and
  keeps them in host memory as uint8 at the configured size (``image_size**2 *
  3`` bytes per image): a bad file stops the run there, before any training
  step, and later epochs and evaluations never decode again.

  Attributes:
    category: category name.
    num_train: training images (after the validation hold-out).
    num_val: held-out normal images (split 'val').
    num_test: test images.
    has_masks: whether pixel ground truth exists (else image metrics only).
    image_size: side of the images.
    location: where the data comes from (for messages).
  """

  def __init__(
    self,
    category: str,
    counts: dict[str, int],
    has_masks: bool,
    image_size: int,
    decode_split: DecodeSplit,
    location: str = "",
  ):
    """Made by a data source (``DataSource.category_data``).

    Args:
      category: category name.
      counts: records per split ('train', 'val', 'test').
      has_masks: whether pixel ground truth exists.
      image_size: side of the decoded images.
      decode_split: split -> (its decodable records, one line per record that
        cannot be read or decoded: ``'<file>: <ErrorType>: <reason>'``).
      location: where the data comes from (for messages).
    """
    self.category = category
    self.num_train = counts["train"]
    self.num_val = counts["val"]
    self.num_test = counts["test"]
    self.has_masks = has_masks
    self.image_size = int(image_size)
    self.location = location
    self._decode_split = decode_split
    self._arrays: dict[str, SplitArrays] = {}

  def load(self) -> None:
    """Decodes every split into memory; a problem names the files and the fix.

    Raises:
      DatasetError: naming every image or mask that cannot be read or decoded
        (up to 20), its split and category.
    """
    if self._arrays:
      return
    problems, arrays = [], {}
    for split in SPLITS:
      arrays[split], bad = self._decode_split(split)
      problems += [(split, what) for what in bad]
    if problems:
      shown = "; ".join(f"[{split}] {what}" for split, what in problems[:MAX_PROBLEMS_SHOWN])
      extra = len(problems) - MAX_PROBLEMS_SHOWN
      more = f" (and {extra} more)" if extra > 0 else ""
      raise DatasetError(
        f"Category {self.category!r}: {len(problems)} file(s) cannot be read or decoded: "
        f"{shown}{more}. Fix: replace these files with valid images or remove them."
      )
    self._arrays = arrays

  def split(self, split: str) -> SplitArrays:
    """The decoded arrays of ``split`` (decoding every split on first use)."""
    if split not in EVAL_SPLITS:
      raise ValueError(f"split must be one of {EVAL_SPLITS}, got {split!r}.")
    self.load()
    return self._arrays[split]

  @property
  def train_images(self) -> np.ndarray:
    """uint8 [num_train, S, S, 3], in the split's fixed order."""
    return self.split("train").image

  def eval_batches(self, split: str, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Every image of `split` once, in a fixed order.

    Args:
      split: 'test', 'val' (held-out normal training images) or 'train'.
      batch_size: images per batch; the last batch is padded.

    Yields:
      Dicts of numpy arrays: image float32 [B, S, S, 3] ImageNet-normalised,
      gt_mask float32 [B, S, S] in {0, 1} (zeros without masks), gt_label
      int32 [B], image_path [B] and defect_type [B] (object arrays of str, ''
      for padding), valid bool [B] (False for padding).
    """
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    arrays = self.split(split)
    for start in range(0, len(arrays), batch_size):
      stop = min(start + batch_size, len(arrays))
      yield _pad_eval_batch(
        {
          "image": normalization.normalize_uint8(arrays.image[start:stop]),
          "gt_mask": arrays.gt_mask[start:stop],
          "gt_label": arrays.gt_label[start:stop],
          "image_path": arrays.image_path[start:stop],
          "defect_type": arrays.defect_type[start:stop],
        },
        batch_size,
      )


def _pad_eval_batch(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
  """Converts a (possibly short) batch to numpy with padding and `valid`."""
  n = batch["gt_label"].shape[0]
  pad = batch_size - n

  def padded(x):
    return np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])

  def strings(x):
    return np.array([str(s) for s in x] + [""] * pad, dtype=object)

  return {
    "image": padded(batch["image"]),
    "gt_mask": padded(batch["gt_mask"].astype(np.float32)),
    "gt_label": padded(batch["gt_label"].astype(np.int32)),
    "image_path": strings(batch["image_path"]),
    "defect_type": strings(batch["defect_type"]),
    "valid": np.arange(batch_size) < n,
  }


# ---------------------------------------------------------------------------
# The configured folders (sources 'folder' and 'demo').


def folder_root(data_cfg) -> str:
  """The folder tree of ``data_cfg``: ``root``, or the demo tree (generated once)."""
  if data_cfg.source == "demo":
    from skrd4ad_jax.data import demo_data

    return demo_data.ensure_demo_dataset(data_cfg.root or None, data_cfg.get("demo_seed", 0))
  return data_cfg.root


def folder_categories(data_cfg) -> tuple[str, ...]:
  """The configured categories, or every category of the folder tree."""
  if data_cfg.categories:
    return tuple(data_cfg.categories)
  return tuple(folder.discover_categories(folder_root(data_cfg)))


def folder_splits(data_cfg, category: str) -> tuple[folder.CategorySplits, str]:
  """(the scanned splits of ``category``, its folder) for a 'folder' or 'demo' source."""
  root = folder_root(data_cfg)
  splits = folder.scan_category(
    root, category, val_fraction=data_cfg.val_fraction, seed=data_cfg.shuffle_seed
  )
  return splits, os.path.join(root, category)


def unknown_source(data_cfg) -> DatasetError:
  return DatasetError(f"Unknown data source {data_cfg.source!r}: use 'folder', 'tfds' or 'demo'.")


def problem_line(path: str, error: BaseException) -> str:
  """``'<path>: <ErrorType>: <first line of the message>'``."""
  reason = (str(error).strip().splitlines() or [""])[0]
  return f"{path}: {type(error).__name__}: {reason}"
