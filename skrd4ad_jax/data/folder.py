"""Scanning and validation of MVTec-layout image folders (no TensorFlow).

Layout::

  <root>/<category>/train/good/*.png                  normal training images
  <root>/<category>/test/good/*.png                   normal test images
  <root>/<category>/test/<defect>/*.png               anomalous test images
  <root>/<category>/ground_truth/<defect>/<stem>_mask.png   (or <stem>.png)

Masks are optional: without a ``ground_truth`` folder a category has image-level
labels only (``has_masks=False``). A test set may hold normal images only.
Image extensions (case-insensitive): png, jpg, jpeg, bmp, tif, tiff.

Every problem raises :class:`DatasetError` naming the file or folder and the
fix. This module imports only the standard library, numpy and PIL, so scanning
works on machines without TensorFlow.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import glob
import logging
import os

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NORMAL_DIR = "good"
TRAIN_DIR = "train"
TEST_DIR = "test"
MASK_DIR = "ground_truth"
MASK_SUFFIX = "_mask"
# Files that operating systems drop into folders; never treated as data.
_IGNORED_FILES = ("thumbs.db", "desktop.ini")


class DatasetError(ValueError):
  """A data set on disk is missing, malformed or inconsistent."""


@dataclasses.dataclass(frozen=True)
class Sample:
  """One image of a split.

  Attributes:
    image_path: path of the image file.
    label: 0 for normal, 1 for anomalous.
    mask_path: path of the ground-truth mask, None when there is none (normal
      images, or a data set without masks).
    defect_type: name of the test sub-folder (``'good'`` for normal images).
  """

  image_path: str
  label: int
  mask_path: str | None
  defect_type: str


@dataclasses.dataclass(frozen=True)
class CategorySplits:
  """The splits of one category.

  Attributes:
    category: category name (folder name under the root).
    train: normal training images, minus the validation hold-out.
    val: normal training images held out for thresholds (may be empty).
    test: normal and anomalous test images.
    has_masks: whether pixel-level ground truth exists (pixel metrics make
      sense); False means image-level metrics only.
  """

  category: str
  train: tuple[Sample, ...]
  val: tuple[Sample, ...]
  test: tuple[Sample, ...]
  has_masks: bool


def is_image_file(path: str) -> bool:
  """Returns whether `path` has one of the supported image extensions."""
  return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def _is_ignored(name: str) -> bool:
  return name.startswith(".") or name.lower() in _IGNORED_FILES


def check_image(path: str) -> tuple[int, int]:
  """Checks that `path` is a readable image and returns its size.

  Opens the file with PIL and verifies it (header and, for PNG, chunk
  checksums) without decoding the pixels.

  Args:
    path: image file.

  Returns:
    (width, height) of the image.

  Raises:
    DatasetError: the file does not exist, is not an image or is corrupt.
  """
  if not os.path.isfile(path):
    raise DatasetError(f"Image file not found: {path}")
  try:
    with Image.open(path) as im:
      size = im.size
      im.verify()
  except Exception as e:  # PIL raises many types for broken files.
    raise DatasetError(
      f"Corrupt or unreadable image: {path} ({type(e).__name__}: {e}). "
      "Fix: replace the file with a valid image or delete it."
    ) from e
  return size


def _list_image_dir(directory: str) -> list[str]:
  """Sorted image files of a folder; any other file is an error."""
  paths = []
  for name in sorted(os.listdir(directory)):
    path = os.path.join(directory, name)
    if _is_ignored(name) or os.path.isdir(path):
      continue
    if not is_image_file(name):
      raise DatasetError(
        f"Not an image file: {path}. Supported extensions: "
        f"{', '.join(IMAGE_EXTENSIONS)} (any case). Fix: move the file out "
        "of the data set folder."
      )
    paths.append(path)
  return paths


def _subdirs(directory: str) -> list[str]:
  return sorted(
    n
    for n in os.listdir(directory)
    if not _is_ignored(n) and os.path.isdir(os.path.join(directory, n))
  )


def _check_root(root: str) -> None:
  if not root or not os.path.isdir(root):
    raise DatasetError(
      f"Data set root not found: {root!r}. Fix: point the config field "
      "`root` to a folder laid out as <root>/<category>/train/good/*.png."
    )


def discover_categories(root: str) -> list[str]:
  """Lists the categories under `root` (folders that have `train/good`).

  Any other folder under `root` is reported with a warning (a category whose
  training folder is misnamed would otherwise vanish from the run unnoticed).

  Args:
    root: data set root.

  Returns:
    Sorted category names.

  Raises:
    DatasetError: the root is missing or holds no category.
  """
  _check_root(root)
  categories, others = [], []
  for c in _subdirs(root):
    is_category = os.path.isdir(os.path.join(root, c, TRAIN_DIR, NORMAL_DIR))
    (categories if is_category else others).append(c)
  for c in others:
    logging.warning(
      "Skipping %s: not a category (no %s folder inside). If it is one, put its "
      "normal training images in %s; otherwise move it out of %s.",
      os.path.join(root, c),
      os.path.join(TRAIN_DIR, NORMAL_DIR),
      os.path.join(root, c, TRAIN_DIR, NORMAL_DIR, ""),
      root,
    )
  if not categories:
    raise DatasetError(
      f"No category found under {root}: expected folders "
      "<root>/<category>/train/good/ with images. Fix: check `root` "
      "(it must be the folder that contains the category folders)."
    )
  return categories


def validation_indices(num_images: int, fraction: float, seed: int) -> np.ndarray:
  """Chooses the held-out validation images deterministically.

  Args:
    num_images: number of normal training images.
    fraction: fraction to hold out, in [0, 1).
    seed: random seed; the same seed gives the same choice.

  Returns:
    Sorted indices (int64) of the validation images: at least one when
    `fraction` > 0 and there are two images or more; never all of them.
  """
  if not 0.0 <= fraction < 1.0:
    raise DatasetError(
      f"val_fraction must be in [0, 1), got {fraction}. Fix: set "
      "`val_fraction` to e.g. 0.1, or 0 for no validation split."
    )
  if fraction == 0.0 or num_images < 2:
    return np.zeros([0], np.int64)
  num_val = min(max(1, int(round(fraction * num_images))), num_images - 1)
  rng = np.random.default_rng(seed)
  return np.sort(rng.permutation(num_images)[:num_val]).astype(np.int64)


def _find_masks(mask_root: str, defect: str) -> dict[str, str]:
  """Maps a mask file's image stem to its path for one defect folder."""
  mask_dir = os.path.join(mask_root, defect)
  masks = {}
  if not os.path.isdir(mask_dir):
    return masks
  for path in _list_image_dir(mask_dir):
    stem = os.path.splitext(os.path.basename(path))[0]
    if stem.endswith(MASK_SUFFIX):
      stem = stem[: -len(MASK_SUFFIX)]
    if stem in masks:
      raise DatasetError(
        f"Two masks for image stem {stem!r}: {masks[stem]} and {path}. Fix: keep one of them."
      )
    masks[stem] = path
  return masks


def scan_category(
  root: str,
  category: str,
  val_fraction: float = 0.0,
  seed: int = 0,
  require_masks: bool | None = None,
  check_images: bool = True,
) -> CategorySplits:
  """Lists and validates the images of one category.

  Args:
    root: data set root.
    category: category folder name.
    val_fraction: fraction of the normal training images held out as a
      validation set (for thresholds); chosen deterministically by `seed`.
    seed: seed of the validation choice.
    require_masks: None: use masks when a `ground_truth` folder exists;
      True: fail unless every anomalous test image has a mask; False: ignore
      masks.
    check_images: open every image with PIL to catch non-image or corrupt
      files and masks whose size differs from their image.

  Returns:
    The category's splits, each sorted by path.

  Raises:
    DatasetError: naming the file or folder at fault and the fix.
  """
  _check_root(root)
  cat_dir = os.path.join(root, category)
  if not os.path.isdir(cat_dir):
    try:
      available = ", ".join(discover_categories(root))
    except DatasetError:
      available = "(none)"
    raise DatasetError(
      f"Unknown category {category!r}: {cat_dir} does not exist. "
      f"Available categories under {root}: {available}."
    )
  train_dir = os.path.join(cat_dir, TRAIN_DIR, NORMAL_DIR)
  if not os.path.isdir(train_dir):
    raise DatasetError(
      f"Missing training folder {train_dir}. Fix: put the normal training "
      f"images of {category!r} in <root>/{category}/train/good/."
    )
  train_paths = _list_image_dir(train_dir)
  if not train_paths:
    raise DatasetError(
      f"Empty category {category!r}: no training images in {train_dir}. "
      f"Fix: add normal images ({', '.join(IMAGE_EXTENSIONS)})."
    )

  test = []
  test_dir = os.path.join(cat_dir, TEST_DIR)
  mask_root = os.path.join(cat_dir, MASK_DIR)
  use_masks = require_masks is not False and os.path.isdir(mask_root)
  if require_masks and not use_masks:
    raise DatasetError(
      f"Masks required but {mask_root} does not exist. Fix: add "
      f"ground_truth/<defect>/<stem>_mask.png files, or set require_masks "
      "to None for image-level metrics only."
    )
  if os.path.isdir(test_dir):
    defects = _subdirs(test_dir)
  else:
    defects = []
    logging.warning(
      "Category %r has no test folder %s: the test split is empty.", category, test_dir
    )
  has_masks = False
  missing, missing_images = [], []
  for defect in defects:
    masks = _find_masks(mask_root, defect) if use_masks else {}
    label = 0 if defect == NORMAL_DIR else 1
    for path in _list_image_dir(os.path.join(test_dir, defect)):
      stem = os.path.splitext(os.path.basename(path))[0]
      mask = masks.pop(stem, None)
      if mask is None and label == 1:
        missing.append(os.path.join(mask_root, defect, stem + MASK_SUFFIX + ".png"))
        missing_images.append(path)
      has_masks |= mask is not None
      test.append(Sample(path, label, mask, defect))
    if masks:
      orphan = sorted(masks.values())[0]
      raise DatasetError(
        f"Mask without an image: {orphan} (no test/{defect}/<stem>.* "
        f"image matches; {len(masks)} such mask(s) in {defect!r}). Fix: "
        "rename the mask to <image stem>_mask.png or remove it."
      )
  if use_masks:
    for defect in _subdirs(mask_root):
      if defect not in defects and _find_masks(mask_root, defect):
        raise DatasetError(
          f"Mask folder without images: {os.path.join(mask_root, defect)} "
          f"(no {os.path.join(test_dir, defect)}). Fix: rename it to "
          "match its test folder or remove it."
        )
  if missing and (has_masks or require_masks):
    raise DatasetError(
      f"Anomalous test image without a mask: {missing_images[0]} "
      f"({len(missing)} such image(s)"
      f"{', while other masks exist' if has_masks else ''}). Fix: add "
      f"{missing[0]} (an all-zero mask if the defect is invisible), or "
      "remove the ground_truth folder for image-level metrics only."
    )

  if check_images:
    for path in train_paths:
      check_image(path)
    for sample in test:
      size = check_image(sample.image_path)
      if sample.mask_path is not None:
        mask_size = check_image(sample.mask_path)
        if mask_size != size:
          raise DatasetError(
            f"Mask size {mask_size[0]}x{mask_size[1]} of "
            f"{sample.mask_path} differs from the image size "
            f"{size[0]}x{size[1]} of {sample.image_path}. Fix: save the "
            "mask at the image's resolution."
          )

  train = [Sample(p, 0, None, NORMAL_DIR) for p in train_paths]
  val_idx = set(validation_indices(len(train), val_fraction, seed).tolist())
  return CategorySplits(
    category=category,
    train=tuple(s for i, s in enumerate(train) if i not in val_idx),
    val=tuple(s for i, s in enumerate(train) if i in val_idx),
    test=tuple(test),
    has_masks=has_masks,
  )


def list_images(path_or_glob: str | Sequence[str], recursive: bool = False) -> list[str]:
  """Lists the images to predict on.

  Args:
    path_or_glob: an image file, a folder, a glob pattern (``**`` allowed),
      or a sequence of these.
    recursive: for folders, also list images in sub-folders.

  Returns:
    Sorted image paths (files of a folder or glob that are not images are
    skipped).

  Raises:
    DatasetError: nothing matches, or a named file is not an image.
  """
  if not isinstance(path_or_glob, (str, os.PathLike)):
    return [p for item in path_or_glob for p in list_images(item, recursive)]
  path = os.fspath(path_or_glob)
  if os.path.isfile(path):
    if not is_image_file(path):
      raise DatasetError(
        f"Not an image file: {path}. Supported extensions: {', '.join(IMAGE_EXTENSIONS)}."
      )
    return [path]
  if os.path.isdir(path):
    pattern = os.path.join(path, "**", "*") if recursive else os.path.join(path, "*")
  else:
    pattern = path
  paths = sorted(
    p
    for p in glob.glob(pattern, recursive=True)
    if os.path.isfile(p) and is_image_file(p) and not _is_ignored(os.path.basename(p))
  )
  if not paths:
    raise DatasetError(
      f"No image found at {path!r} (a file, folder or glob pattern of "
      f"{', '.join(IMAGE_EXTENSIONS)} files)."
    )
  return paths
