"""The two data sources (Pillow, tf.data) give the same numbers; the data side runs without TF."""

import csv
import io
import os
import struct
import subprocess
import sys
import zlib

import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

import data_pipelines
from data_pipelines import input_pipeline
from skrd4ad_jax.data import decode, folder, source

tf.config.set_visible_devices([], "GPU")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Makes `import tensorflow` / `import tensorflow_datasets` fail in a subprocess.
BLOCK_TF = (
  "import sys; sys.modules['tensorflow'] = None; sys.modules['tensorflow_datasets'] = None\n"
)


def _encode(array_or_image, fmt="PNG", **kwargs):
  image = (
    array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
  )
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def _png16(array, filters):
  """A 16-bit PNG of uint16 [H, W, C] whose row r uses PNG filter ``filters[r % len]``."""
  height, width, channels = array.shape
  color = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
  bpp = 2 * channels
  raw = array.astype(">u2").tobytes()
  stride = width * bpp
  rows, prior = [], np.zeros(stride, np.int64)
  for y in range(height):
    line = np.frombuffer(raw[y * stride : (y + 1) * stride], np.uint8).astype(np.int64)
    left = np.concatenate([np.zeros(bpp, np.int64), line[:-bpp]])
    up_left = np.concatenate([np.zeros(bpp, np.int64), prior[:-bpp]])
    kind = filters[y % len(filters)]
    if kind == 0:
      pred = np.zeros_like(line)
    elif kind == 1:
      pred = left
    elif kind == 2:
      pred = prior
    elif kind == 3:
      pred = (left + prior) >> 1
    else:
      p = left + prior - up_left
      pa, pb, pc = np.abs(p - left), np.abs(p - prior), np.abs(p - up_left)
      pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prior, up_left))
    rows.append(bytes([kind]) + ((line - pred) & 255).astype(np.uint8).tobytes())
    prior = line

  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

  header = struct.pack(">IIBBBBB", width, height, 16, color, 0, 0, 0)
  return (
    b"\x89PNG\r\n\x1a\n"
    + chunk(b"IHDR", header)
    + chunk(b"IDAT", zlib.compress(b"".join(rows)))
    + chunk(b"IEND", b"")
  )


def _cases():
  rng = np.random.default_rng(0)
  smooth = np.asarray(
    Image.fromarray(rng.integers(0, 256, (11, 11, 3), np.uint8)).resize((40, 44), Image.BICUBIC)
  )
  cases = {}
  for shape in [(40, 56), (20, 20), (10, 12), (3, 50), (30, 20), (60, 20), (131, 97)]:
    cases[f"rgb_{shape[0]}x{shape[1]}"] = _encode(rng.integers(0, 256, shape + (3,), np.uint8))
  cases["gray"] = _encode(rng.integers(0, 256, (21, 33), np.uint8))
  cases["rgba"] = _encode(rng.integers(0, 256, (21, 33, 4), np.uint8))
  cases["gray_alpha"] = _encode(
    Image.fromarray(rng.integers(0, 256, (21, 33, 4), np.uint8)).convert("LA")
  )
  cases["palette"] = _encode(Image.fromarray(smooth).convert("P"))
  cases["bilevel"] = _encode(
    Image.fromarray(rng.integers(0, 2, (21, 33), np.uint8) * 255).convert("1")
  )
  cases["gray16"] = _encode(Image.fromarray(rng.integers(0, 65536, (21, 33)).astype(np.uint16)))
  for channels in (1, 2, 3, 4):  # 16-bit colour: Pillow alone truncates these
    wide = rng.integers(0, 65536, (13, 17, channels)).astype(np.uint16)
    cases[f"png16_c{channels}"] = _png16(wide, filters=(0, 1, 2, 3, 4))
  cases["png16_tf"] = tf.io.encode_png((smooth.astype(np.uint16) * 257)[:, :, :3]).numpy()
  for fmt in ("JPEG", "BMP", "TIFF", "GIF", "WEBP"):
    cases[fmt] = _encode(smooth, fmt)
  mask = np.zeros((32, 30), np.uint8)
  mask[:, :16] = 1  # VisA-style class value
  mask[0, 29] = 3
  cases["mask_values"] = _encode(mask)
  cases["mask16"] = _encode(Image.fromarray(mask.astype(np.uint16)))
  return cases


CASES = _cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_pillow_decoder_equals_tf_decoder(name):
  contents = CASES[name]
  for size in (16, 37, 64):
    ours = decode.decode_image_8bit(contents, size)
    theirs = input_pipeline.decode_image_8bit(tf.constant(contents), size).numpy()
    assert ours.dtype == np.uint8 and ours.shape == (size, size, 3)
    np.testing.assert_array_equal(ours, theirs, err_msg=f"{name} at {size}")
    for threshold in (0.5, 0.1):
      ours = decode.decode_mask_binary(contents, size, threshold)
      theirs = input_pipeline.decode_mask_binary(tf.constant(contents), size, threshold).numpy()
      np.testing.assert_array_equal(ours, theirs, err_msg=f"mask of {name} at {size}")


def test_png16_reader_reads_every_filter():
  wide = np.random.default_rng(1).integers(0, 65536, (9, 7, 3)).astype(np.uint16)
  for filters in ((0,), (1,), (2,), (3,), (4,), (4, 3, 2, 1, 0)):
    np.testing.assert_array_equal(decode._read_png16(_png16(wide, filters)), wide)


def test_resize_matches_pillow_where_pillow_goes_horizontal_first():
  image = np.random.default_rng(2).integers(0, 256, (40, 56, 3), np.uint8)
  ref = np.asarray(Image.fromarray(image).resize((16, 16), Image.BILINEAR))
  np.testing.assert_array_equal(decode.resize_8bit(image, 16), ref)


# --- the two sources ----------------------------------------------------------


def _write(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


def make_tree(root):
  rng = np.random.default_rng(0)
  base = os.path.join(root, "cat")
  for i in range(6):
    _write(
      os.path.join(base, "train", "good", f"{i:03d}.png"),
      rng.integers(0, 256, (20, 26, 3), np.uint8),
    )
  _write(os.path.join(base, "test", "good", "000.png"), rng.integers(0, 256, (26, 20), np.uint8))
  for defect in ("crack", "hole"):
    for i in range(2):
      _write(
        os.path.join(base, "test", defect, f"{i:03d}.png"),
        rng.integers(0, 256, (20, 26, 3), np.uint8),
      )
      mask = np.zeros((20, 26), np.uint8)
      mask[3 + i : 12, 5:17] = 255
      _write(os.path.join(base, "ground_truth", defect, f"{i:03d}_mask.png"), mask)
  return base


def data_config(root, **kwargs):
  cfg = ml_collections.ConfigDict(
    dict(
      source="folder",
      dataset="mvtec_ad",
      root=root,
      categories=(),
      image_size=16,
      mask_threshold=0.5,
      val_fraction=0.3,
      tfds_data_dir="",
      manual_dir="",
      shuffle_seed=0,
    )
  )
  cfg.update(kwargs)
  return cfg


def test_sources_give_identical_category_data(tmp_path):
  make_tree(str(tmp_path))
  cfg = data_config(str(tmp_path))
  pillow, tfdata = source.PillowSource(), data_pipelines.TFDataSource()
  assert pillow.categories(cfg) == tfdata.categories(cfg) == ("cat",)
  a, b = pillow.category_data(cfg, "cat"), tfdata.category_data(cfg, "cat")
  for attr in ("category", "num_train", "num_val", "num_test", "has_masks", "location"):
    assert getattr(a, attr) == getattr(b, attr), attr
  assert (a.num_train, a.num_val, a.num_test) == (4, 2, 5) and a.has_masks
  for split in ("train", "val", "test"):
    x, y = a.split(split), b.split(split)
    np.testing.assert_array_equal(x.image, y.image)
    np.testing.assert_array_equal(x.gt_mask, y.gt_mask)
    np.testing.assert_array_equal(x.gt_label, y.gt_label)
    assert x.image_path == y.image_path and x.defect_type == y.defect_type
  assert a.split("test").gt_mask.any()
  for p, q in zip(a.eval_batches("test", 3), b.eval_batches("test", 3)):
    for key in p:
      np.testing.assert_array_equal(p[key], q[key])


def _corrupt_pixel_data(png):
  """A PNG whose chunks and checksums are valid but whose pixel stream is not."""
  pos = png.index(b"IDAT") - 4
  length = struct.unpack(">I", png[pos : pos + 4])[0]
  chunk = b"IDAT" + bytes(b ^ 0x5A for b in png[pos + 8 : pos + 8 + length])
  return png[: pos + 4] + chunk + struct.pack(">I", zlib.crc32(chunk)) + png[pos + 12 + length :]


def test_sources_name_the_same_bad_files(tmp_path):
  base = make_tree(str(tmp_path))
  for path in ("test/hole/000.png", "ground_truth/crack/001_mask.png"):
    path = os.path.join(base, path)
    with open(path, "rb") as f:
      png = f.read()
    with open(path, "wb") as f:  # passes the scanner's check, fails to decode
      f.write(_corrupt_pixel_data(png))
  cfg = data_config(str(tmp_path))
  messages = []
  for src in (source.PillowSource(), data_pipelines.TFDataSource()):
    with pytest.raises(folder.DatasetError) as info:
      src.category_data(cfg, "cat").load()
    messages.append(str(info.value))
  for message in messages:
    assert "2 file(s)" in message and "[test]" in message and "Fix:" in message
    assert os.path.join(base, "test", "hole", "000.png") in message
    assert os.path.join(base, "ground_truth", "crack", "001_mask.png (mask of") in message


def test_image_batches_identical_with_failures(tmp_path):
  base = make_tree(str(tmp_path))
  paths = sorted(folder.list_images(base, recursive=True))[:7]
  broken = str(tmp_path / "broken.png")
  with open(broken, "wb") as f:
    f.write(b"this is not a png" * 10)
  paths = [broken] + paths[:3] + [broken] + paths[3:] + [broken]
  out = {}
  for src in (source.PillowSource(), data_pipelines.TFDataSource()):
    out[src.name] = list(src.image_batches(paths, 16, 3))
  a, b = out["pillow"], out["tf.data"]
  assert len(a) == len(b) == 3  # 7 images in 3 batches
  assert [[i for i, _ in batch["failures"]] for batch in a] == [[0], [4], [9]]
  for p, q in zip(a, b):
    assert [i for i, _ in p["failures"]] == [i for i, _ in q["failures"]]
    assert all(broken in m for _, m in p["failures"] + q["failures"])
    for key in ("image", "image_8bit", "index", "valid"):
      np.testing.assert_array_equal(p[key], q[key])
  assert a[2]["index"].tolist() == [8, -1, -1]
  assert a[0]["image_8bit"].dtype == np.uint8 and a[0]["image"].dtype == np.float32
  for src in (source.PillowSource(), data_pipelines.TFDataSource()):
    (only,) = list(src.image_batches([broken, broken], 16, 3))
    assert list(only) == ["failures"] and [i for i, _ in only["failures"]] == [0, 1]


def test_pillow_source_refuses_tfds_with_the_fix():
  cfg = data_config("", source="tfds", categories=("bottle",))
  with pytest.raises(folder.DatasetError, match="tensorflow_datasets.*Fix:"):
    source.PillowSource().category_data(cfg, "bottle")


def test_select_source_takes_tf_when_it_imports():
  assert isinstance(data_pipelines.select_source(), data_pipelines.TFDataSource)


def test_misspelt_decoder_setting_names_the_choices(monkeypatch):
  monkeypatch.setenv(source.DECODER_ENV, "tfdata")
  with pytest.raises(ValueError, match=r"SKRD4AD_DECODER='tfdata': expected one of auto, tf\.data"):
    data_pipelines.select_source()
  monkeypatch.setenv(source.DECODER_ENV, "tf.data")
  assert isinstance(data_pipelines.select_source(), data_pipelines.TFDataSource)


# --- without TensorFlow -------------------------------------------------------


def _python(code, *args, timeout=600, env=None):
  return subprocess.run(
    [sys.executable, "-c", code, *args],
    cwd=REPO,
    env=dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3", **(env or {})),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def test_data_side_imports_and_decodes_without_tensorflow(tmp_path):
  make_tree(str(tmp_path))
  code = BLOCK_TF + (
    "import importlib, pkgutil\n"
    "import skrd4ad_jax.data, skrd4ad_jax.categories\n"
    "for m in pkgutil.iter_modules(skrd4ad_jax.data.__path__):\n"
    "  importlib.import_module('skrd4ad_jax.data.' + m.name)\n"
    "import data_pipelines\n"
    "import skrd4ad_jax.methods.rd_expert.draem, skrd4ad_jax.export.run\n"
    "import ml_collections\n"
    "cfg = ml_collections.ConfigDict(dict(source='folder', dataset='mvtec_ad', root=sys.argv[1],\n"
    "  categories=(), image_size=16, mask_threshold=0.5, val_fraction=0.3, tfds_data_dir='',\n"
    "  manual_dir='', shuffle_seed=0))\n"
    "a = data_pipelines.select_source(cfg)\n"
    "b = data_pipelines.select_source(cfg)\n"
    "assert type(a).__name__ == 'PillowSource', a\n"
    "d = a.category_data(cfg, a.categories(cfg)[0])\n"
    "print('OK', d.num_train, d.num_val, d.num_test, int(d.train_images.sum()))\n"
    "assert not [m for m in sys.modules if m.startswith('tensorflow') and sys.modules[m]]\n"
  )
  proc = _python(code, str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-3000:]
  data = source.PillowSource().category_data(data_config(str(tmp_path)), "cat")
  expected = f"OK 4 2 5 {int(data.train_images.sum())}"
  assert expected in proc.stdout
  # One warning, however often a source is selected.
  assert proc.stderr.count("TensorFlow cannot be imported") == 1, proc.stderr


def test_import_registers_the_builders_without_tensorflow():
  code = (
    "import sys\n"
    "import data_pipelines\n"
    "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n"
    "import tensorflow_datasets as tfds\n"
    "print(sorted(tfds.builder_cls(n).__module__ for n in ('mvtec_ad', 'visa', 'vad')))\n"
  )
  proc = _python(code)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "['data_pipelines.mvtec_ad', 'data_pipelines.vad', 'data_pipelines.visa']" in proc.stdout


RUN_MAIN = (
  "import runpy\n"
  "sys.argv[0] = 'skrd4ad_jax.main'\n"
  "runpy.run_module('skrd4ad_jax.main', run_name='__main__', alter_sys=True)\n"
)


def _results(path):
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  # Timings differ between any two runs.
  return [{k: v for k, v in r.items() if "second" not in k and "time" not in k} for r in rows]


@pytest.mark.slow
def test_tiny_run_without_tensorflow_equals_tf_run(tmp_path):
  from skrd4ad_jax.data import demo_data

  root = demo_data.ensure_demo_dataset(
    str(tmp_path / "data"),
    seed=0,
    image_size=64,
    num_train=6,
    num_test_good=2,
    num_test_per_defect=1,
  )
  args = [
    f"--config={os.path.join(REPO, 'configs', 'tiny.py')}:brick",
    f"--config.data.root={root}",
    "--config.train.epochs=1",
  ]
  runs = {}
  for name, prelude in (("tf", "import sys\n"), ("no_tf", BLOCK_TF)):
    workdir = str(tmp_path / name)
    proc = _python(prelude + RUN_MAIN, *args, f"--workdir={workdir}", env={"JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-5000:]
    runs[name] = (proc, _results(os.path.join(workdir, "results.csv")))
  assert "TensorFlow cannot be imported" in runs["no_tf"][0].stderr
  assert "TensorFlow cannot be imported" not in runs["tf"][0].stderr
  assert "No TensorBoard events are written" in runs["no_tf"][0].stderr
  assert [r["category"] for r in runs["tf"][1]] == ["brick", "mean"]
  assert "image_auroc" in runs["tf"][1][0] and "pixel_aupro" in runs["tf"][1][0]
  assert runs["no_tf"][1] == runs["tf"][1]


def test_decoder_setting_pillow_never_imports_tensorflow():
  """SKRD4AD_DECODER=pillow with TensorFlow installed: Pillow, no TensorFlow, no warning."""
  code = (
    "import sys, data_pipelines\n"
    "s = data_pipelines.select_source()\n"
    "assert type(s).__name__ == 'PillowSource', s\n"
    "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'\n"
    "print('OK')\n"
  )
  proc = _python(code, env={source.DECODER_ENV: "pillow"})
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
  assert "TensorFlow cannot be imported" not in proc.stderr


def test_decoder_setting_tf_data_without_tensorflow_says_so():
  code = BLOCK_TF + (
    "import data_pipelines\n"
    "try:\n"
    "  data_pipelines.select_source()\n"
    "except ValueError as e:\n"
    "  print('ERROR', e)\n"
  )
  proc = _python(code, env={source.DECODER_ENV: "tf.data"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "ERROR SKRD4AD_DECODER=tf.data, but TensorFlow cannot be imported" in proc.stdout
