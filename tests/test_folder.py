"""Tests for skrd4ad_jax.data.folder (scanning and validation, no TensorFlow)."""

import os
import subprocess
import sys
import zlib

import numpy as np
from PIL import Image
import pytest

from skrd4ad_jax.data import folder

SIZE = (24, 20)  # (width, height)


def _save(path, size=SIZE, value=None, mode="RGB"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(zlib.crc32(path.encode()))
  shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
  array = (
    np.full(shape, value, np.uint8)
    if value is not None
    else rng.integers(0, 256, shape, dtype=np.uint8)
  )
  Image.fromarray(array).save(path)
  return path


def make_tree(
  root,
  category="bottle",
  num_train=5,
  defects=("crack", "hole"),
  num_good=2,
  num_bad=2,
  masks="_mask",
  ext=".png",
):
  """Writes an MVTec-layout category; masks: '_mask', '' or None (none)."""
  base = os.path.join(root, category)
  for i in range(num_train):
    _save(os.path.join(base, "train", "good", f"{i:03d}{ext}"))
  for i in range(num_good):
    _save(os.path.join(base, "test", "good", f"{i:03d}{ext}"))
  for defect in defects:
    for i in range(num_bad):
      _save(os.path.join(base, "test", defect, f"{i:03d}{ext}"))
      if masks is not None:
        _save(
          os.path.join(base, "ground_truth", defect, f"{i:03d}{masks}.png"), value=255, mode="L"
        )
  return base


def test_scan_with_mask_suffix_and_several_defects(tmp_path):
  root = str(tmp_path)
  make_tree(root)
  splits = folder.scan_category(root, "bottle")
  assert splits.has_masks
  assert len(splits.train) == 5 and not splits.val
  assert [s.defect_type for s in splits.test] == (["crack"] * 2 + ["good"] * 2 + ["hole"] * 2)
  assert [s.label for s in splits.test] == [1, 1, 0, 0, 1, 1]
  for s in splits.test:
    if s.label:
      assert s.mask_path == os.path.join(
        root,
        "bottle",
        "ground_truth",
        s.defect_type,
        os.path.basename(s.image_path)[:-4] + "_mask.png",
      )
    else:
      assert s.mask_path is None
  paths = [s.image_path for s in splits.train]
  assert paths == sorted(paths)
  assert all(s.label == 0 and s.mask_path is None for s in splits.train)


def test_masks_named_like_the_image(tmp_path):
  make_tree(str(tmp_path), masks="")
  splits = folder.scan_category(str(tmp_path), "bottle")
  assert splits.has_masks
  bad = [s for s in splits.test if s.label]
  assert all(s.mask_path.endswith(os.path.basename(s.image_path)) for s in bad)


def test_no_masks_means_image_level_only(tmp_path):
  make_tree(str(tmp_path), masks=None)
  splits = folder.scan_category(str(tmp_path), "bottle")
  assert not splits.has_masks
  assert all(s.mask_path is None for s in splits.test)
  assert sum(s.label for s in splits.test) == 4


def test_require_masks_false_ignores_them(tmp_path):
  make_tree(str(tmp_path))
  splits = folder.scan_category(str(tmp_path), "bottle", require_masks=False)
  assert not splits.has_masks


def test_normal_only_test_set(tmp_path):
  make_tree(str(tmp_path), defects=(), masks=None)
  splits = folder.scan_category(str(tmp_path), "bottle")
  assert [s.label for s in splits.test] == [0, 0]
  assert not splits.has_masks


def test_extensions_case_insensitive_and_hidden_files_ignored(tmp_path):
  base = make_tree(str(tmp_path), ext=".JPG", masks=None)
  _save(os.path.join(base, "train", "good", "x.Png"))
  _save(os.path.join(base, "train", "good", "y.bmp"))
  _save(os.path.join(base, "train", "good", "z.tiff"))
  open(os.path.join(base, "train", "good", ".DS_Store"), "w").close()
  splits = folder.scan_category(str(tmp_path), "bottle")
  assert len(splits.train) == 8


def test_discover_categories(tmp_path):
  make_tree(str(tmp_path), "zipper")
  make_tree(str(tmp_path), "bottle")
  os.makedirs(tmp_path / "not_a_category" / "test")
  assert folder.discover_categories(str(tmp_path)) == ["bottle", "zipper"]


def test_validation_split_deterministic_and_never_empties_train(tmp_path):
  make_tree(str(tmp_path), num_train=20, masks=None)
  a = folder.scan_category(str(tmp_path), "bottle", val_fraction=0.1, seed=3)
  b = folder.scan_category(str(tmp_path), "bottle", val_fraction=0.1, seed=3)
  assert a == b
  assert len(a.val) == 2 and len(a.train) == 18
  all_paths = {s.image_path for s in a.train} | {s.image_path for s in a.val}
  assert len(all_paths) == 20
  choices = {
    tuple(
      s.image_path
      for s in folder.scan_category(str(tmp_path), "bottle", val_fraction=0.1, seed=seed).val
    )
    for seed in range(5)
  }
  assert len(choices) > 1  # The seed matters.
  assert len(folder.validation_indices(20, 0.01, 0)) == 1  # At least one.
  assert len(folder.validation_indices(2, 0.9, 0)) == 1  # Train keeps one.
  assert len(folder.validation_indices(1, 0.5, 0)) == 0
  assert len(folder.validation_indices(20, 0.0, 0)) == 0
  with pytest.raises(folder.DatasetError, match="val_fraction"):
    folder.validation_indices(20, 1.0, 0)


def test_check_image_returns_size(tmp_path):
  path = _save(str(tmp_path / "a.png"))
  assert folder.check_image(path) == SIZE


def _truncate(path):
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])


def _bad_root(tmp_path, _):
  return str(tmp_path / "nope"), "bottle", str(tmp_path / "nope")


def _unknown_category(tmp_path, _):
  return str(tmp_path), "botle", "bottle"  # Lists the available one.


def _missing_train_good(tmp_path, base):
  os.rename(os.path.join(base, "train", "good"), os.path.join(base, "train", "ok"))
  return str(tmp_path), "bottle", os.path.join(base, "train", "good")


def _empty_train(tmp_path, base):
  train = os.path.join(base, "train", "good")
  for name in os.listdir(train):
    os.remove(os.path.join(train, name))
  return str(tmp_path), "bottle", train


def _non_image_file(tmp_path, base):
  path = os.path.join(base, "train", "good", "notes.txt")
  open(path, "w").close()
  return str(tmp_path), "bottle", path


def _corrupt_image(tmp_path, base):
  path = os.path.join(base, "test", "hole", "001.png")
  _truncate(path)
  return str(tmp_path), "bottle", path


def _garbage_image(tmp_path, base):
  path = os.path.join(base, "train", "good", "002.png")
  with open(path, "wb") as f:
    f.write(b"not an image at all")
  return str(tmp_path), "bottle", path


def _mask_size_differs(tmp_path, base):
  path = os.path.join(base, "ground_truth", "crack", "001_mask.png")
  _save(path, size=(10, 10), value=255, mode="L")
  return str(tmp_path), "bottle", path


def _mask_without_image(tmp_path, base):
  path = os.path.join(base, "ground_truth", "crack", "007_mask.png")
  _save(path, value=255, mode="L")
  return str(tmp_path), "bottle", path


def _mask_folder_without_images(tmp_path, base):
  path = os.path.join(base, "ground_truth", "scratch", "000_mask.png")
  _save(path, value=255, mode="L")
  return str(tmp_path), "bottle", os.path.join(base, "ground_truth", "scratch")


def _anomaly_without_mask(tmp_path, base):
  os.remove(os.path.join(base, "ground_truth", "hole", "000_mask.png"))
  return str(tmp_path), "bottle", os.path.join(base, "test", "hole", "000.png")


@pytest.mark.parametrize(
  "breaker",
  [
    _bad_root,
    _unknown_category,
    _missing_train_good,
    _empty_train,
    _non_image_file,
    _corrupt_image,
    _garbage_image,
    _mask_size_differs,
    _mask_without_image,
    _mask_folder_without_images,
    _anomaly_without_mask,
  ],
)
def test_bad_input_raises_naming_the_file(tmp_path, breaker):
  base = make_tree(str(tmp_path))
  root, category, named = breaker(tmp_path, base)
  with pytest.raises(folder.DatasetError) as info:
    folder.scan_category(root, category)
  assert named in str(info.value)
  assert isinstance(info.value, ValueError)


def test_require_masks_without_ground_truth(tmp_path):
  make_tree(str(tmp_path), masks=None)
  with pytest.raises(folder.DatasetError, match="ground_truth"):
    folder.scan_category(str(tmp_path), "bottle", require_masks=True)


def test_discover_categories_errors(tmp_path):
  with pytest.raises(folder.DatasetError, match="not found"):
    folder.discover_categories(str(tmp_path / "missing"))
  with pytest.raises(folder.DatasetError, match="No category"):
    folder.discover_categories(str(tmp_path))


def test_list_images(tmp_path):
  a = _save(str(tmp_path / "new" / "b.png"))
  b = _save(str(tmp_path / "new" / "a.JPG"))
  c = _save(str(tmp_path / "new" / "sub" / "c.bmp"))
  open(tmp_path / "new" / "readme.txt", "w").close()
  assert folder.list_images(a) == [a]
  assert folder.list_images(str(tmp_path / "new")) == [b, a]
  assert folder.list_images(str(tmp_path / "new"), recursive=True) == [b, a, c]
  assert folder.list_images(str(tmp_path / "new" / "*.png")) == [a]
  assert folder.list_images(str(tmp_path / "**" / "*.bmp")) == [c]
  assert folder.list_images([a, c]) == [a, c]
  with pytest.raises(folder.DatasetError, match="readme.txt"):
    folder.list_images(str(tmp_path / "new" / "readme.txt"))
  with pytest.raises(folder.DatasetError, match="No image found"):
    folder.list_images(str(tmp_path / "empty*"))


def test_folder_module_does_not_import_tensorflow():
  code = (
    "import sys; import skrd4ad_jax.data.folder; "
    'assert "tensorflow" not in sys.modules, "tensorflow imported"'
  )
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
