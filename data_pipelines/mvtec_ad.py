"""tfds builder of MVTec AD, read from a manually downloaded copy.

Usage::

  import data_pipelines  # registers the builders
  builder = tfds.builder('mvtec_ad/bottle', data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir='/data/mvtec'))

Splits `train` (normal) and `test`. Images are stored as their original bytes
(grayscale categories stay grayscale PNG; `decode_and_resize` and tfds' own
decoder turn them into RGB), masks as binarised {0, 255} PNG, all-zero for
normal images. Also holds the archive helpers shared by the VisA and VAD
builders.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
import os
import tarfile
import zipfile

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from skrd4ad_jax import categories
from skrd4ad_jax.data import folder

CATEGORIES = categories.MVTEC_AD
ARCHIVE = "mvtec_anomaly_detection.tar.xz"
HOMEPAGE = "https://www.mvtec.com/company/research/datasets/mvtec-ad"
LABEL_NAMES = ("normal", "anomaly")
_DONE_MARKER = ".extracted"

_CITATION = """@inproceedings{bergmann2019mvtec,
  title={MVTec AD -- A Comprehensive Real-World Dataset for Unsupervised
         Anomaly Detection},
  author={Bergmann, Paul and Fauser, Michael and Sattlegger, David and
          Steger, Carsten},
  booktitle={CVPR}, year={2019}}"""


def manual_dir_or_error(dl_manager, instructions: str) -> str:
  """Returns the manual directory, or raises DatasetError with instructions."""
  try:
    return os.fspath(dl_manager.manual_dir)
  except AssertionError as e:
    raise folder.DatasetError(f"{e}") from e


def extract_archive(archive: str, dest_root: str) -> str:
  """Extracts a .tar(.xz/.gz/.bz2) or .zip archive once and returns its folder.

  Extraction happens into `dest_root/<archive name>/`; a marker file makes
  later calls (other categories) reuse it.

  Args:
    archive: archive file.
    dest_root: folder to extract into (e.g. tfds' download directory).

  Returns:
    The folder holding the extracted files.
  """
  dest = os.path.join(dest_root, os.path.basename(archive) + ".extracted")
  if os.path.exists(os.path.join(dest, _DONE_MARKER)):
    return dest
  os.makedirs(dest, exist_ok=True)
  try:
    if zipfile.is_zipfile(archive):
      with zipfile.ZipFile(archive) as zf:
        zf.extractall(dest)
    else:
      with tarfile.open(archive) as tar:
        try:
          tar.extractall(dest, filter="data")
        except TypeError:  # Python < 3.11.4 has no extraction filters.
          tar.extractall(dest)
  except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as e:
    raise folder.DatasetError(
      f"Could not extract {archive} ({type(e).__name__}: {e}). Fix: "
      "download the archive again, or extract it yourself into the manual "
      "directory."
    ) from e
  with open(os.path.join(dest, _DONE_MARKER), "w") as f:
    f.write(archive)
  return dest


def find_data_root(
  manual_dir: str,
  is_root: Callable[[str], bool],
  archives: Sequence[str],
  extract_root: str,
  subdirs: Sequence[str] = (),
) -> str | None:
  """Finds an extracted data tree in `manual_dir`, extracting an archive.

  Args:
    manual_dir: tfds manual directory.
    is_root: predicate telling whether a folder is the data root.
    archives: archive file names to look for in `manual_dir` when no extracted
      tree is found.
    extract_root: where archives are extracted.
    subdirs: sub-folder names the root may be nested in (one or two levels).

  Returns:
    The data root, or None when neither a tree nor an archive exists.
  """

  def search(base: str) -> str | None:
    candidates = [base] + [os.path.join(base, s) for s in subdirs]
    candidates += [os.path.join(c, s) for c in candidates[1:] for s in subdirs]
    for candidate in candidates:
      if os.path.isdir(candidate) and is_root(candidate):
        return candidate
    return None

  root = search(manual_dir)
  if root is not None:
    return root
  for name in archives:
    path = os.path.join(manual_dir, name)
    if os.path.isfile(path):
      root = search(extract_archive(path, extract_root))
      if root is not None:
        return root
  return None


def binary_mask(path: str | None, size: tuple[int, int]) -> np.ndarray:
  """Reads a mask as uint8 {0, 255} [H, W, 1]; zeros when `path` is None.

  Args:
    path: mask file (any nonzero value counts as defect), or None.
    size: (width, height) of the image, used for zeros and to check the mask.

  Returns:
    The binarised mask.
  """
  if path is None:
    return np.zeros([size[1], size[0], 1], np.uint8)
  folder.check_image(path)
  with Image.open(path) as im:
    if im.size != tuple(size):
      raise folder.DatasetError(
        f"Mask size {im.size[0]}x{im.size[1]} of {path} differs from its "
        f"image size {size[0]}x{size[1]}. Fix: save the mask at the "
        "image's resolution."
      )
    mask = np.asarray(im)
  if mask.ndim == 3:
    mask = mask[..., :3].max(axis=-1)  # Alpha never marks a defect.
  return ((mask != 0) * 255).astype(np.uint8)[..., None]


def anomaly_features(with_mask: bool = True) -> tfds.features.FeaturesDict:
  """Features shared by the anomaly-detection builders."""
  features = {
    "image": tfds.features.Image(shape=(None, None, 3)),
    "label": tfds.features.ClassLabel(names=LABEL_NAMES),
    "defect_type": tfds.features.Text(),
    "image_path": tfds.features.Text(),
  }
  if with_mask:
    features["mask"] = tfds.features.Image(shape=(None, None, 1), encoding_format="png")
  return tfds.features.FeaturesDict(features)


def generate_sample_examples(samples: Iterable[folder.Sample], root: str, with_mask: bool = True):
  """Yields (key, example) of folder samples; keys are paths below `root`."""
  for sample in samples:
    rel = os.path.relpath(sample.image_path, root)
    with Image.open(sample.image_path) as im:
      size = im.size
    example = {
      "image": sample.image_path,
      "label": sample.label,
      "defect_type": sample.defect_type,
      "image_path": rel,
    }
    if with_mask:
      example["mask"] = binary_mask(sample.mask_path, size)
    yield rel, example


class MvtecAd(tfds.core.GeneratorBasedBuilder):
  """MVTec AD, one config per category."""

  name = "mvtec_ad"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
    tfds.core.BuilderConfig(name=c, description=f"MVTec AD category {c}.") for c in CATEGORIES
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Download {ARCHIVE} (4.9 GB) from {HOMEPAGE} (free for non-commercial use,
  registration needed) and place it in the manual directory
  (`DownloadConfig(manual_dir=...)`, default <data_dir>/downloads/manual/).
  Either leave the archive there (it is extracted once, into tfds' download
  directory), or extract it so that <manual_dir>/<category>/train/good/ exists
  (<manual_dir>/mvtec_anomaly_detection/<category>/ also works). Per-category
  archives (<category>.tar.xz) are accepted too.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      description="MVTec AD: industrial anomaly detection, 15 categories.",
      features=anomaly_features(with_mask=True),
      homepage=HOMEPAGE,
      citation=_CITATION,
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    category = self.builder_config.name
    manual_dir = manual_dir_or_error(dl_manager, self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    root = find_data_root(
      manual_dir,
      is_root=lambda d: os.path.isdir(os.path.join(d, category, "train")),
      archives=(ARCHIVE, f"{category}.tar.xz"),
      extract_root=os.fspath(dl_manager.download_dir),
      subdirs=("mvtec_anomaly_detection", "mvtec_ad", "mvtec"),
    )
    if root is None:
      raise folder.DatasetError(
        f"MVTec AD category {category!r} not found in {manual_dir}: expected "
        f"{os.path.join(manual_dir, category, 'train', 'good')} or the "
        f"archive {os.path.join(manual_dir, ARCHIVE)}.\n"
        f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}"
      )
    splits = folder.scan_category(root, category, check_images=True)
    return {
      "train": self._generate_examples(splits.train, root),
      "test": self._generate_examples(splits.test, root),
    }

  def _generate_examples(self, samples, root):
    yield from generate_sample_examples(samples, root, with_mask=True)
