"""tfds builder of the Valeo Anomaly Dataset (VAD), from a manual download.

Layout (one category, image-level labels only, no masks)::

  <root>/train/good/*.png
  <root>/test/good/*.png
  <root>/test/<bad>/*.png

Splits `train` and `test`; there is no `mask` feature (image-level metrics
only). Images keep their original bytes.
"""

from __future__ import annotations

import os

import tensorflow_datasets as tfds

from data_pipelines import mvtec_ad
from skrd4ad_jax.data import folder

CATEGORIES = ("vad",)
ARCHIVES = ("VAD.zip", "vad.zip", "VAD.tar.gz", "vad.tar.gz", "VAD.tar", "vad.tar")
HOMEPAGE = "https://github.com/pej0918/SK-RD4AD"

_CITATION = """@inproceedings{baitieva2024supervised,
  title={Supervised Anomaly Detection for Complex Industrial Images},
  author={Baitieva, Aimira and Hurych, David and Besnier, Victor and
          Bernard, Olivier},
  booktitle={CVPR}, year={2024}}"""


def _is_vad_root(directory: str) -> bool:
  return os.path.isdir(os.path.join(directory, "train", folder.NORMAL_DIR))


class Vad(tfds.core.GeneratorBasedBuilder):
  """Valeo Anomaly Dataset: one category, image-level labels."""

  name = "vad"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="vad", description="The single category.")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Download the Valeo Anomaly Dataset (VAD) from Valeo (link in the paper
  "Supervised Anomaly Detection for Complex Industrial Images", CVPR 2024, and
  in {HOMEPAGE}) and place it in the manual directory
  (`DownloadConfig(manual_dir=...)`, default <data_dir>/downloads/manual/):
  either extracted, so that <manual_dir>/train/good/ and <manual_dir>/test/
  exist (<manual_dir>/VAD/train/good/ also works), or as one of the archives
  {", ".join(ARCHIVES)} (extracted once, into tfds' download directory).
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      description="Valeo Anomaly Dataset (VAD), one-class setting.",
      features=mvtec_ad.anomaly_features(with_mask=False),
      homepage=HOMEPAGE,
      citation=_CITATION,
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    manual_dir = mvtec_ad.manual_dir_or_error(dl_manager, self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    root = mvtec_ad.find_data_root(
      manual_dir,
      is_root=_is_vad_root,
      archives=ARCHIVES,
      extract_root=os.fspath(dl_manager.download_dir),
      subdirs=("VAD", "vad"),
    )
    if root is None:
      raise folder.DatasetError(
        f"VAD not found in {manual_dir}: expected "
        f"{os.path.join(manual_dir, 'train', 'good')} or one of the "
        f"archives {', '.join(ARCHIVES)} there.\n"
        f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}"
      )
    root = os.path.normpath(root)
    splits = folder.scan_category(
      os.path.dirname(root), os.path.basename(root), require_masks=False
    )
    return {
      "train": self._generate_examples(splits.train, root),
      "test": self._generate_examples(splits.test, root),
    }

  def _generate_examples(self, samples, root):
    yield from mvtec_ad.generate_sample_examples(samples, root, with_mask=False)
