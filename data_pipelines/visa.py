"""tfds builder of VisA, from the raw archive layout and its official split.

Raw layout (archive `VisA_20220922.tar`)::

  <root>/split_csv/1cls.csv          object,split,label,image,mask
  <root>/<class>/Data/Images/Normal/*.JPG
  <root>/<class>/Data/Images/Anomaly/*.JPG
  <root>/<class>/Data/Masks/Anomaly/*.png
  <root>/<class>/image_anno.csv      optional: image,label,mask (defect names)

The `1cls` split (one-class training) gives `train` (normal images) and `test`
(normal and anomalous). Images keep their JPEG bytes; masks are binarised
(`!= 0`, VisA masks use class values) and stored as {0, 255} PNG.
"""

from __future__ import annotations

import csv
import os

import tensorflow_datasets as tfds

from data_pipelines import mvtec_ad
from skrd4ad_jax import categories
from skrd4ad_jax.data import folder

CATEGORIES = categories.VISA
ARCHIVE = "VisA_20220922.tar"
SPLIT_CSV = os.path.join("split_csv", "1cls.csv")
HOMEPAGE = "https://github.com/amazon-science/spot-diff"
_URL = f"https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/{ARCHIVE}"

_CITATION = """@inproceedings{zou2022spot,
  title={SPot-the-Difference Self-supervised Pre-training for Anomaly
         Detection and Segmentation},
  author={Zou, Yang and Jeong, Jongheon and Pemula, Latha and Zhang, Dongqing
          and Dabeer, Onkar},
  booktitle={ECCV}, year={2022}}"""


def read_split_csv(root: str, category: str) -> dict[str, list[dict[str, str]]]:
  """Reads the rows of `category` from the official 1cls split.

  Args:
    root: raw VisA root (holds `split_csv/` and the class folders).
    category: VisA class.

  Returns:
    {'train': rows, 'test': rows}; each row has keys object, split, label,
    image, mask (paths relative to `root`, mask empty for normal images).
  """
  path = os.path.join(root, SPLIT_CSV)
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    expected = {"object", "split", "label", "image", "mask"}
    if not expected <= set(reader.fieldnames or ()):
      raise folder.DatasetError(
        f"{path} has columns {reader.fieldnames}, expected "
        f"{sorted(expected)}. Fix: use the split_csv/1cls.csv of the "
        "official VisA archive."
      )
    splits = {"train": [], "test": []}
    for row in reader:
      if row["object"] != category:
        continue
      if row["split"] not in splits or row["label"] not in ("normal", "anomaly"):
        raise folder.DatasetError(
          f"Unexpected split/label {row['split']!r}/{row['label']!r} for {row['image']} in {path}."
        )
      if row["split"] == "train" and row["label"] != "normal":
        raise folder.DatasetError(
          f"Anomalous training image {row['image']} in {path}: the "
          "one-class setting trains on normal images only. Fix: use the "
          "official split_csv/1cls.csv."
        )
      splits[row["split"]].append(row)
  if not splits["train"]:
    raise folder.DatasetError(f"No training rows for VisA class {category!r} in {path}.")
  return splits


def _defect_names(root: str, category: str) -> dict[str, str]:
  """Maps image path -> defect name from the optional image_anno.csv."""
  path = os.path.join(root, category, "image_anno.csv")
  if not os.path.isfile(path):
    return {}
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    if not {"image", "label"} <= set(reader.fieldnames or ()):
      return {}
    return {row["image"]: row["label"] for row in reader}


class Visa(tfds.core.GeneratorBasedBuilder):
  """VisA (Visual Anomaly), one config per class, official 1cls split."""

  name = "visa"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release (split_csv/1cls.csv)."}
  BUILDER_CONFIGS = [
    tfds.core.BuilderConfig(name=c, description=f"VisA class {c}.") for c in CATEGORIES
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Download {ARCHIVE} (about 1.8 GB) from {_URL} (see {HOMEPAGE}) and place it
  in the manual directory (`DownloadConfig(manual_dir=...)`, default
  <data_dir>/downloads/manual/). Either leave the archive there (it is
  extracted once, into tfds' download directory), or extract it so that
  <manual_dir>/split_csv/1cls.csv and <manual_dir>/<class>/Data/Images/ exist
  (<manual_dir>/VisA/... also works). Use the raw archive, not an MVTec-style
  re-organised copy (for such a copy use the `folder` source instead).
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      description="VisA: 12 classes of complex industrial objects.",
      features=mvtec_ad.anomaly_features(with_mask=True),
      homepage=HOMEPAGE,
      citation=_CITATION,
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    category = self.builder_config.name
    manual_dir = mvtec_ad.manual_dir_or_error(dl_manager, self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    root = mvtec_ad.find_data_root(
      manual_dir,
      is_root=lambda d: os.path.isfile(os.path.join(d, SPLIT_CSV)),
      archives=(ARCHIVE,),
      extract_root=os.fspath(dl_manager.download_dir),
      subdirs=("VisA", "visa", "VisA_20220922"),
    )
    if root is None:
      raise folder.DatasetError(
        f"VisA not found in {manual_dir}: expected "
        f"{os.path.join(manual_dir, SPLIT_CSV)} or the archive "
        f"{os.path.join(manual_dir, ARCHIVE)}.\n"
        f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}"
      )
    if not os.path.isdir(os.path.join(root, category, "Data", "Images")):
      raise folder.DatasetError(
        f"VisA class folder {os.path.join(root, category, 'Data', 'Images')} "
        "is missing. Fix: extract the complete archive."
      )
    rows = read_split_csv(root, category)
    defects = _defect_names(root, category)
    return {
      split: self._generate_examples(split_rows, root, defects)
      for split, split_rows in rows.items()
    }

  def _generate_examples(self, rows, root, defects):
    for row in rows:
      image_path = os.path.join(root, row["image"])
      size = folder.check_image(image_path)
      label = int(row["label"] == "anomaly")
      mask_path = os.path.join(root, row["mask"]) if row["mask"] else None
      if label and mask_path is None:
        raise folder.DatasetError(
          f"Anomalous VisA image without a mask in {SPLIT_CSV}: {image_path}."
        )
      if mask_path is not None and not os.path.isfile(mask_path):
        raise folder.DatasetError(f"Mask listed in {SPLIT_CSV} is missing: {mask_path}.")
      defect = defects.get(row["image"], "anomaly") if label else "good"
      yield (
        row["image"],
        {
          "image": image_path,
          "mask": mvtec_ad.binary_mask(mask_path, size),
          "label": label,
          "defect_type": defect or "anomaly",
          "image_path": row["image"],
        },
      )
