"""Tests for the tfds builders: real download_and_prepare from tiny trees."""

import csv
import os
import tarfile

import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from data_pipelines import input_pipeline, mvtec_ad, vad, visa
from skrd4ad_jax.data import folder

tf.config.set_visible_devices([], "GPU")

W, H = 24, 20


def _write(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


def _image(seed, gray=False):
  rng = np.random.default_rng(seed)
  shape = (H, W) if gray else (H, W, 3)
  return rng.integers(0, 256, shape, np.uint8)


def _mask(value):
  mask = np.zeros((H, W), np.uint8)
  mask[4:12, 6:18] = value
  return mask


def make_mvtec(root, category, gray=False):
  base = os.path.join(root, category)
  for i in range(4):
    _write(os.path.join(base, "train", "good", f"{i:03d}.png"), _image(i, gray))
  _write(os.path.join(base, "test", "good", "000.png"), _image(10, gray))
  for j, defect in enumerate(("crack", "scratch")):
    _write(os.path.join(base, "test", defect, "000.png"), _image(20 + j, gray))
    _write(os.path.join(base, "ground_truth", defect, "000_mask.png"), _mask(255 if j == 0 else 1))


def _prepare(name, data_dir, manual_dir):
  builder = tfds.builder(name, data_dir=str(data_dir))
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
  )
  return builder


def _examples(builder, split):
  return list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))


def test_builders_registered():
  assert tuple(c.name for c in tfds.builder_cls("mvtec_ad").BUILDER_CONFIGS) == mvtec_ad.CATEGORIES
  assert len(tfds.builder_cls("visa").BUILDER_CONFIGS) == 12
  assert (
    tuple(c.name for c in tfds.builder_cls("vad").BUILDER_CONFIGS) == vad.CATEGORIES == ("vad",)
  )
  assert len(mvtec_ad.CATEGORIES) == 15 and len(visa.CATEGORIES) == 12
  assert "mvtec_anomaly_detection.tar.xz" in (mvtec_ad.MvtecAd.MANUAL_DOWNLOAD_INSTRUCTIONS)


def test_mvtec_two_categories(tmp_path):
  manual = tmp_path / "manual"
  make_mvtec(str(manual), "bottle")
  make_mvtec(str(manual), "grid", gray=True)
  for category in ("bottle", "grid"):
    builder = _prepare(f"mvtec_ad/{category}", tmp_path / "data", manual)
    assert builder.info.splits["train"].num_examples == 4
    assert builder.info.splits["test"].num_examples == 3
    test = _examples(builder, "test")
    assert [e["image_path"].decode() for e in test] == [
      f"{category}/test/crack/000.png",
      f"{category}/test/good/000.png",
      f"{category}/test/scratch/000.png",
    ]
    assert [e["label"] for e in test] == [1, 0, 1]
    assert [e["defect_type"].decode() for e in test] == ["crack", "good", "scratch"]
    for e in test:
      assert e["image"].shape == (H, W, 3)
      assert e["mask"].shape == (H, W, 1)
      expected = _mask(255) if e["label"] else np.zeros((H, W), np.uint8)
      np.testing.assert_array_equal(e["mask"][..., 0], expected)  # Binarised.
    original = np.asarray(
      Image.open(manual / category / "test" / "good" / "000.png").convert("RGB")
    )
    np.testing.assert_array_equal(test[1]["image"], original)
    train = _examples(builder, "train")
    assert all(e["label"] == 0 and not e["mask"].any() for e in train)


def test_mvtec_from_archive(tmp_path):
  tree = tmp_path / "tree"
  make_mvtec(str(tree), "bottle")
  manual = tmp_path / "manual"
  manual.mkdir()
  with tarfile.open(manual / mvtec_ad.ARCHIVE, "w:xz") as tar:
    tar.add(tree / "bottle", arcname="bottle")
  builder = _prepare("mvtec_ad/bottle", tmp_path / "data", manual)
  assert builder.info.splits["test"].num_examples == 3


def test_missing_data_errors_name_directory_and_archive(tmp_path):
  empty = tmp_path / "manual"
  empty.mkdir()
  (empty / "unrelated.txt").write_text("x")
  with pytest.raises(folder.DatasetError) as info:
    _prepare("mvtec_ad/bottle", tmp_path / "data", empty)
  message = str(info.value)
  assert str(empty) in message and mvtec_ad.ARCHIVE in message
  assert mvtec_ad.HOMEPAGE in message
  with pytest.raises(folder.DatasetError) as info:
    _prepare("visa/candle", tmp_path / "data", tmp_path / "absent")
  assert str(tmp_path / "absent") in str(info.value)
  assert visa.ARCHIVE in str(info.value)
  with pytest.raises(folder.DatasetError, match="VAD not found"):
    _prepare("vad", tmp_path / "data", empty)


def make_visa(root):
  rows, annos = [], {}
  for category in ("candle", "pcb1"):
    for i in range(4):
      rel = f"{category}/Data/Images/Normal/{i:04d}.JPG"
      Image.fromarray(_image(i)).save(_mkdir(root, rel), format="JPEG")
      rows.append([category, "train" if i < 3 else "test", "normal", rel, ""])
    for i in range(2):
      rel = f"{category}/Data/Images/Anomaly/{i:03d}.JPG"
      mask_rel = f"{category}/Data/Masks/Anomaly/{i:03d}.png"
      Image.fromarray(_image(50 + i)).save(_mkdir(root, rel), format="JPEG")
      _write(os.path.join(root, mask_rel), _mask(i + 1))  # Class values.
      rows.append([category, "test", "anomaly", rel, mask_rel])
      annos.setdefault(category, []).append([rel, "chunk missing", mask_rel])
  _write_csv(
    os.path.join(root, "split_csv", "1cls.csv"), ["object", "split", "label", "image", "mask"], rows
  )
  _write_csv(
    os.path.join(root, "candle", "image_anno.csv"), ["image", "label", "mask"], annos["candle"]
  )


def _mkdir(root, rel):
  path = os.path.join(root, rel)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  return path


def _write_csv(path, header, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


def test_visa_raw_layout_and_official_split(tmp_path):
  manual = tmp_path / "manual"
  make_visa(str(manual))
  for category, defect in (("candle", "chunk missing"), ("pcb1", "anomaly")):
    builder = _prepare(f"visa/{category}", tmp_path / "data", manual)
    assert builder.info.splits["train"].num_examples == 3
    test = _examples(builder, "test")
    assert [e["label"] for e in test] == [0, 1, 1]
    assert [e["defect_type"].decode() for e in test] == ["good", defect, defect]
    assert test[0]["image_path"].decode() == (f"{category}/Data/Images/Normal/0003.JPG")
    assert not test[0]["mask"].any()
    for e in test[1:]:
      np.testing.assert_array_equal(e["mask"][..., 0], _mask(255))
    jpeg = open(manual / test[1]["image_path"].decode(), "rb").read()
    np.testing.assert_array_equal(test[1]["image"], tf.io.decode_jpeg(jpeg).numpy())


def test_vad(tmp_path):
  base = tmp_path / "manual" / "VAD"
  for i in range(3):
    _write(str(base / "train" / "good" / f"{i:03d}.png"), _image(i))
  _write(str(base / "test" / "good" / "000.png"), _image(5))
  _write(str(base / "test" / "bad" / "000.png"), _image(6))
  _write(str(base / "test" / "bad" / "001.png"), _image(7))
  builder = _prepare("vad", tmp_path / "data", tmp_path / "manual")
  assert "mask" not in builder.info.features
  assert builder.info.splits["train"].num_examples == 3
  test = _examples(builder, "test")
  assert [e["label"] for e in test] == [1, 1, 0]
  assert [e["image_path"].decode() for e in test] == [
    "test/bad/000.png",
    "test/bad/001.png",
    "test/good/000.png",
  ]


def _data_cfg(**kwargs):
  cfg = ml_collections.ConfigDict(
    dict(
      source="tfds",
      dataset="mvtec_ad",
      root="",
      categories=(),
      image_size=16,
      mask_threshold=0.5,
      val_fraction=0.25,
      tfds_data_dir="",
      manual_dir="",
      shuffle_seed=0,
    )
  )
  cfg.update(kwargs)
  return cfg


def test_pipeline_from_tfds_equals_folder(tmp_path):
  manual = tmp_path / "manual"
  make_mvtec(str(manual), "bottle")
  tfds_cfg = _data_cfg(tfds_data_dir=str(tmp_path / "data"), manual_dir=str(manual))
  from_tfds = input_pipeline.make_category_data(tfds_cfg, "bottle")
  from_folder = input_pipeline.make_category_data(
    _data_cfg(source="folder", root=str(manual)), "bottle"
  )
  assert input_pipeline.resolve_categories(tfds_cfg) == mvtec_ad.CATEGORIES
  for data in (from_tfds, from_folder):
    assert (data.num_train, data.num_val, data.num_test) == (3, 1, 3)
    assert data.has_masks
  for split in ("test", "val"):
    a = next(from_tfds.eval_batches(split, 4))
    b = next(from_folder.eval_batches(split, 4))
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["gt_mask"], b["gt_mask"])
    np.testing.assert_array_equal(a["gt_label"], b["gt_label"])
    np.testing.assert_array_equal(a["valid"], b["valid"])
    assert [os.path.join(str(manual), p) if p else "" for p in a["image_path"]] == b[
      "image_path"
    ].tolist()
  train = from_tfds.train_images
  assert train.shape == (3, 16, 16, 3)
  np.testing.assert_array_equal(np.sort(train, axis=0), np.sort(from_folder.train_images, axis=0))


def test_pipeline_from_tfds_without_masks(tmp_path):
  base = tmp_path / "manual"
  for i in range(3):
    _write(str(base / "train" / "good" / f"{i:03d}.png"), _image(i))
  _write(str(base / "test" / "bad" / "000.png"), _image(6))
  cfg = _data_cfg(
    dataset="vad", tfds_data_dir=str(tmp_path / "data"), manual_dir=str(base), val_fraction=0.0
  )
  data = input_pipeline.make_category_data(cfg, "vad")
  assert not data.has_masks and data.num_test == 1
  batch = next(data.eval_batches("test", 2))
  assert batch["gt_label"].tolist() == [1, 0]
  assert not batch["gt_mask"].any()
