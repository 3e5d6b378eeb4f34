"""The tf.data input pipeline: decoding, resizing, masks, folder and tfds records, streams.

Pre-processing reproduces the RD4AD reference: PIL `convert('RGB')`, then
`Resize((256, 256))` (antialiased bilinear on 8-bit values: Pillow's two
fixed-point passes, horizontal then vertical, emulated bit for bit), `/ 255`,
ImageNet mean/std. 16-bit images are scaled to 8 bits, where PIL would clip.
Masks (any nonzero value = defect) are resized the same way and binarised at
`mask_threshold`. `skrd4ad_jax.data.decode` computes the same integers with
Pillow and numpy; `decode_and_resize` gives a script the same numbers.

`make_category_data` decodes every split of a category once, in parallel
(tf.data), into a `skrd4ad_jax.data.category_data.CategoryData` (the fields of
`config.data` are described there); `image_stream` is predict's stream. Both are
reached through `data_pipelines.TFDataSource`.

Why one module of this size: it is the whole TensorFlow side of decoding
(training, evaluation and predict's stream), and all three must give the same
integers; keeping them together keeps one resize and one mask rule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import io
import os
import re

import numpy as np
from PIL import Image
import tensorflow as tf

from skrd4ad_jax import normalization
from skrd4ad_jax.data import category_data as category_data_lib
from skrd4ad_jax.data import decode, folder, source
from skrd4ad_jax.data.category_data import CategoryData, SplitArrays

PREFETCH_BATCHES = source.PREFETCH_BATCHES  # used by predict's streaming pipeline
# tf.data's autotuner may use at most this much host memory for buffers.
RAM_BUDGET_BYTES = 1 << 30

DatasetError = folder.DatasetError


def configure_tensorflow() -> None:
  """Keeps TensorFlow off accelerators, leaving their memory to JAX."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # Already initialised: the caller decided.
    pass


def dataset_options() -> tf.data.Options:
  """Deterministic, memory-friendly tf.data options."""
  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = 1
  options.autotune.ram_budget = RAM_BUDGET_BYTES
  return options


# ---------------------------------------------------------------------------
# Decoding and resizing (graph-compatible; used by the pipeline and predict).


def _to_rgb(image: tf.Tensor) -> tf.Tensor:
  """[H, W, C] with C in 1..4 -> [H, W, 3]: gray is repeated, alpha dropped."""
  channels = tf.shape(image)[-1]
  rgb = tf.cond(channels < 3, lambda: tf.tile(image[..., :1], [1, 1, 3]), lambda: image[..., :3])
  rgb.set_shape([None, None, 3])
  return rgb


def _pil_decode(contents: np.ndarray) -> np.ndarray:
  """Formats TensorFlow cannot decode (e.g. TIFF): float32 [H, W, 3] in [0, 1].

  `contents` comes as uint8 [N]: numpy strings would drop trailing NUL bytes.
  """
  with Image.open(io.BytesIO(contents.tobytes())) as im:
    if im.mode.startswith("I;16") or im.mode == "I":
      array = np.asarray(im).astype(np.float32) / 65535.0
    elif im.mode == "F":
      array = np.asarray(im).astype(np.float32)
    else:
      return np.asarray(im.convert("RGB"), np.float32) / 255.0
  array = np.clip(array, 0.0, 1.0)
  return np.repeat(array[..., None], 3, axis=-1)


def _decode_unit_rgb(contents: tf.Tensor) -> tf.Tensor:
  """Decodes an encoded image to float32 [H, W, 3] in [0, 1], unquantised.

  PNG is decoded at 16 bits (8-bit files come out scaled exactly), JPEG with
  libjpeg's accurate integer DCT (PIL's default), BMP/GIF/WebP by TensorFlow,
  anything else (TIFF) by PIL.
  """
  magic = tf.strings.substr(contents, 0, 4)
  is_png = tf.equal(magic, b"\x89PNG")
  is_jpeg = tf.io.is_jpeg(contents)
  is_tf_other = (
    tf.equal(tf.strings.substr(magic, 0, 2), b"BM")
    | tf.equal(magic, b"GIF8")
    | tf.equal(magic, b"RIFF")
  )

  def png():
    image = tf.io.decode_png(contents, channels=0, dtype=tf.uint16)
    return _to_rgb(tf.cast(image, tf.float32) / 65535.0)

  def jpeg():
    image = tf.io.decode_jpeg(contents, channels=3, dct_method="INTEGER_ACCURATE")
    return tf.cast(image, tf.float32) / 255.0

  def tf_other():
    image = tf.io.decode_image(contents, channels=0, expand_animations=False)
    return _to_rgb(tf.cast(image, tf.float32) / 255.0)

  def pil():
    image = tf.numpy_function(
      _pil_decode, [tf.io.decode_raw(contents, tf.uint8)], tf.float32, stateful=False
    )
    image.set_shape([None, None, 3])
    return image

  return tf.case(
    [(is_png, png), (is_jpeg, jpeg), (is_tf_other, tf_other)], default=pil, exclusive=False
  )


_PIL_PRECISION_BITS = decode.PIL_PRECISION_BITS


def _pil_resize_axis(image: tf.Tensor, out_size: int, axis: int) -> tf.Tensor:
  """Resamples int32 [H, W, C] along `axis` (0 or 1) as Pillow's 8-bit pass.

  Args:
    image: int32 [H, W, C] values in [0, 255].
    out_size: output length along `axis`.
    axis: 0 (vertical pass) or 1 (horizontal pass).

  Returns:
    int32 values in [0, 255], `axis` resized to `out_size`.
  """
  in_size = tf.shape(image)[axis]

  def resample():
    index, weight = tf.numpy_function(
      decode.pil_bilinear_coeffs, [in_size, out_size], [tf.int32, tf.int32], stateful=False
    )
    index = tf.reshape(index, [out_size, -1])
    weight = tf.reshape(weight, [out_size, -1])
    taps = tf.gather(image, index, axis=axis)  # Tap axis after `axis`.
    if axis == 0:
      weight = weight[:, :, None, None]  # taps: [out, k, W, C]
    else:
      weight = weight[None, :, :, None]  # taps: [H, out, k, C]
    total = tf.reduce_sum(taps * weight, axis=axis + 1)
    total += 1 << (_PIL_PRECISION_BITS - 1)
    return tf.clip_by_value(tf.bitwise.right_shift(total, _PIL_PRECISION_BITS), 0, 255)

  # Pillow skips a pass whose size does not change.
  return tf.cond(tf.equal(in_size, out_size), lambda: image, resample)


def pil_resize_8bit(image: tf.Tensor, image_size: int) -> tf.Tensor:
  """Bit-exact `PIL.Image.resize((S, S), BILINEAR)` of 8-bit [H, W, C] values.

  Antialiased bilinear (triangle filter widened when downscaling), horizontal
  pass then vertical pass, each rounded to 8 bits, as Pillow does for 'RGB'
  and 'L' images (and so the RD4AD reference pre-processing).

  Args:
    image: [H, W, C] integer values in [0, 255] (any int/float dtype).
    image_size: output side S.

  Returns:
    uint8 [S, S, C].
  """
  image = tf.cast(image, tf.int32)
  image = _pil_resize_axis(image, image_size, axis=1)
  image = _pil_resize_axis(image, image_size, axis=0)
  image.set_shape([image_size, image_size, None])
  return tf.cast(image, tf.uint8)


def decode_image_8bit(contents: tf.Tensor, image_size: int) -> tf.Tensor:
  """Decodes, converts to 8-bit RGB and resizes: uint8 [S, S, 3]."""
  image = tf.floor(_decode_unit_rgb(contents) * 255.0 + 0.5)  # 16 -> 8 bits.
  image = pil_resize_8bit(image, image_size)
  image.set_shape([image_size, image_size, 3])
  return image


def decode_mask_binary(contents: tf.Tensor, image_size: int, threshold: float = 0.5) -> tf.Tensor:
  """Decodes a mask (any nonzero value is a defect), resizes, binarises.

  The {0, 255} mask is resized like an 8-bit 'L' image (as the reference
  does), then a pixel is a defect when value / 255 > threshold.

  Returns:
    uint8 [S, S] in {0, 1}.
  """
  defect = tf.reduce_any(_decode_unit_rgb(contents) > 0, axis=-1)
  mask255 = tf.cast(defect, tf.int32)[..., None] * 255
  resized = tf.cast(pil_resize_8bit(mask255, image_size)[..., 0], tf.float32)
  return tf.cast(resized / 255.0 > threshold, tf.uint8)


def normalize(image_8bit: tf.Tensor) -> tf.Tensor:
  """uint8 [..., 3] -> float32 ImageNet-normalised `(x / 255 - mean) / std`."""
  image = tf.cast(image_8bit, tf.float32) / 255.0
  return (image - tf.constant(normalization.IMAGENET_MEAN)) / tf.constant(
    normalization.IMAGENET_STD
  )


def _read(path_or_bytes: str | bytes | os.PathLike | tf.Tensor):
  if isinstance(path_or_bytes, bytes):
    return tf.constant(path_or_bytes)
  if isinstance(path_or_bytes, (str, os.PathLike)):
    return tf.io.read_file(os.fspath(path_or_bytes))
  return tf.io.read_file(path_or_bytes)  # A string tensor holds a path.


def decode_and_resize(
  path_or_bytes: str | bytes | os.PathLike | tf.Tensor, image_size: int
) -> tf.Tensor:
  """Loads one image exactly as the pipeline does.

  Args:
    path_or_bytes: a file path (str / PathLike / string tensor) or the encoded
      file contents (python bytes). PNG (8/16-bit, gray, RGBA, palette), JPEG,
      BMP, GIF, WebP and TIFF are accepted.
    image_size: side of the output.

  Returns:
    float32 [image_size, image_size, 3], ImageNet-normalised.
  """
  return normalize(decode_image_8bit(_read(path_or_bytes), image_size))


def decode_and_resize_mask(
  path_or_bytes: str | bytes | os.PathLike | tf.Tensor, image_size: int, threshold: float = 0.5
) -> tf.Tensor:
  """Loads one ground-truth mask as the pipeline does.

  Args:
    path_or_bytes: a file path or the encoded file contents.
    image_size: side of the output.
    threshold: binarisation threshold of the resized mask in [0, 1].

  Returns:
    float32 [image_size, image_size] in {0, 1}.
  """
  return tf.cast(decode_mask_binary(_read(path_or_bytes), image_size, threshold), tf.float32)


# ---------------------------------------------------------------------------
# Sources: each split is a tf.data.Dataset of records
#   {'image': encoded bytes or path, 'mask': encoded bytes, path or b'',
#    'gt_label': int32, 'defect_type': str, 'image_path': str}
# with `from_files` telling whether 'image'/'mask' are paths.


def _folder_records(samples: Sequence[folder.Sample]) -> tf.data.Dataset:
  paths = [s.image_path for s in samples]
  return tf.data.Dataset.from_tensor_slices(
    {
      "image": tf.constant(paths, tf.string, shape=[len(paths)]),
      "mask": tf.constant([s.mask_path or "" for s in samples], tf.string, shape=[len(paths)]),
      "gt_label": tf.constant([s.label for s in samples], tf.int32, shape=[len(paths)]),
      "defect_type": tf.constant([s.defect_type for s in samples], tf.string, shape=[len(paths)]),
      "image_path": tf.constant(paths, tf.string, shape=[len(paths)]),
    }
  )


def _decode_split_fn(
  records: dict[str, Callable[[], tf.data.Dataset]],
  counts: dict[str, int],
  from_files: bool,
  image_size: int,
  mask_threshold: float,
) -> category_data_lib.DecodeSplit:
  """``CategoryData``'s ``decode_split``: tf.data over the records of each split.

  Args:
    records: split -> a maker of its record dataset.
    counts: records per split.
    from_files: whether 'image' / 'mask' of a record are paths (else bytes).
    image_size: side of the decoded images.
    mask_threshold: binarisation threshold of the resized masks.
  """
  size = int(image_size)

  def load_image(record):
    contents = tf.io.read_file(record["image"]) if from_files else record["image"]
    return decode_image_8bit(contents, size)

  def load_mask(record):
    mask = record["mask"]

    def decode():
      contents = tf.io.read_file(mask) if from_files else mask
      return decode_mask_binary(contents, size, mask_threshold)

    return tf.cond(tf.strings.length(mask) > 0, decode, lambda: tf.zeros([size, size], tf.uint8))

  def load_example(record):
    return {
      "image": load_image(record),
      "gt_mask": load_mask(record),
      "gt_label": record["gt_label"],
      "image_path": record["image_path"],
      "defect_type": record["defect_type"],
    }

  def record_problem(split: str, index: int) -> str:
    """Why record ``index`` of ``split`` does not load (image or mask), in one line."""
    for record in records[split]().skip(index).take(1):
      path = record["image_path"].numpy().decode()
      mask = record["mask"].numpy().decode(errors="replace") if from_files else "the stored mask"
      for what, load in (("image", load_image), ("mask", load_mask)):
        try:
          load(record).numpy()
        except Exception as e:  # any decoder error is the file's problem
          culprit = path if what == "image" else f"{mask} (mask of {path})"
          return category_data_lib.problem_line(culprit, e)
      return f"{path}: could not be loaded"
    return f"record {index}: could not be loaded"

  def decode_split(split: str) -> tuple[SplitArrays, list[str]]:
    ds = records[split]().enumerate()
    ds = ds.map(lambda i, r: (i, load_example(r)), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.ignore_errors().with_options(dataset_options())
    indices, out = [], {k: [] for k in ("image", "gt_mask", "gt_label", "path", "defect")}
    for i, ex in ds.as_numpy_iterator():
      indices.append(int(i))
      out["image"].append(ex["image"])
      out["gt_mask"].append(ex["gt_mask"])
      out["gt_label"].append(ex["gt_label"])
      out["path"].append(ex["image_path"].decode())
      out["defect"].append(ex["defect_type"].decode())
    bad = sorted(set(range(counts[split])) - set(indices))
    arrays = SplitArrays.stack(
      size, out["image"], out["gt_mask"], out["gt_label"], out["path"], out["defect"]
    )
    return arrays, [record_problem(split, i) for i in bad]

  return decode_split


def _category_data(
  data_cfg,
  category: str,
  records: dict[str, Callable[[], tf.data.Dataset]],
  counts: dict[str, int],
  has_masks: bool,
  from_files: bool,
  location: str,
) -> CategoryData:
  size, threshold = int(data_cfg.image_size), float(data_cfg.mask_threshold)
  decode_split = _decode_split_fn(records, counts, from_files, size, threshold)
  return CategoryData(category, counts, has_masks, size, decode_split, location=location)


# ---------------------------------------------------------------------------
# Construction from a config.


def _folder_category_data(data_cfg, category: str) -> CategoryData:
  splits, location = category_data_lib.folder_splits(data_cfg, category)
  split_samples = {"train": splits.train, "val": splits.val, "test": splits.test}
  records = {k: (lambda s=v: _folder_records(s)) for k, v in split_samples.items()}
  counts = {k: len(v) for k, v in split_samples.items()}
  return _category_data(
    data_cfg, category, records, counts, splits.has_masks, from_files=True, location=location
  )


def tfds_builder(data_cfg, category: str):
  """Returns the prepared tfds builder of `dataset/category`."""
  import tensorflow_datasets as tfds

  import data_pipelines

  data_pipelines.register_builders()

  name = f"{data_cfg.dataset}/{category}"
  try:
    builder = tfds.builder(name, data_dir=data_cfg.tfds_data_dir or None)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DatasetError(f"Unknown tfds data set or category {name!r}: {e}") from e
  download_config = tfds.download.DownloadConfig(manual_dir=data_cfg.manual_dir or None)
  builder.download_and_prepare(download_config=download_config)
  return builder


def _tfds_category_data(data_cfg, category: str) -> CategoryData:
  import tensorflow_datasets as tfds

  builder = tfds_builder(data_cfg, category)
  has_masks = "mask" in builder.info.features
  decoders = {"image": tfds.decode.SkipDecoding()}
  if has_masks:
    decoders["mask"] = tfds.decode.SkipDecoding()

  def split_records(split):
    ds = builder.as_dataset(split=split, decoders=decoders, shuffle_files=False)

    def to_record(ex):
      return {
        "image": ex["image"],
        "mask": ex["mask"] if has_masks else tf.constant(b""),
        "gt_label": tf.cast(ex["label"], tf.int32),
        "defect_type": ex["defect_type"],
        "image_path": ex["image_path"],
      }

    return ds.map(to_record)

  num_train_all = builder.info.splits["train"].num_examples
  val_idx = folder.validation_indices(num_train_all, data_cfg.val_fraction, data_cfg.shuffle_seed)
  is_val = np.zeros([num_train_all], bool)
  is_val[val_idx] = True

  def hold_out(want_val):
    def make():
      flags = tf.constant(is_val)
      ds = split_records("train").enumerate()
      ds = ds.filter(lambda i, r: tf.equal(tf.gather(flags, i), want_val))
      return ds.map(lambda i, r: r)

    return make

  records = {"train": hold_out(False), "val": hold_out(True), "test": lambda: split_records("test")}
  counts = {
    "train": num_train_all - len(val_idx),
    "val": len(val_idx),
    "test": builder.info.splits["test"].num_examples,
  }
  return _category_data(
    data_cfg,
    category,
    records,
    counts,
    has_masks,
    from_files=False,
    location=f"tfds {data_cfg.dataset}/{category}",
  )


def resolve_categories(data_cfg) -> tuple[str, ...]:
  """The configured categories, or all of them when the tuple is empty."""
  if data_cfg.categories:
    return tuple(data_cfg.categories)
  if data_cfg.source == "tfds":
    import tensorflow_datasets as tfds

    import data_pipelines

    data_pipelines.register_builders()
    cls = tfds.builder_cls(data_cfg.dataset)
    return tuple(c.name for c in cls.BUILDER_CONFIGS)
  return category_data_lib.folder_categories(data_cfg)


def make_category_data(data_cfg, category: str) -> CategoryData:
  """Builds the pipelines of one category from `config.data`.

  Args:
    data_cfg: the data config (fields: ``skrd4ad_jax.data.category_data``).
    category: category name.

  Returns:
    The category's `CategoryData`.

  Raises:
    DatasetError: missing or malformed data, naming the file and the fix.
  """
  configure_tensorflow()
  if data_cfg.source in ("folder", "demo"):
    return _folder_category_data(data_cfg, category)
  if data_cfg.source == "tfds":
    return _tfds_category_data(data_cfg, category)
  raise category_data_lib.unknown_source(data_cfg)


# ---------------------------------------------------------------------------
# Predict's stream.


def _failure_message(path: str) -> str:
  """Why ``path`` could not be loaded (the stream only drops it), with the fix."""
  try:
    decode_and_resize(path, 8).numpy()
  except Exception as e:
    first = (str(e).strip().splitlines() or [""])[0]
    # TensorFlow wraps the decoder's words in op names: keep the words.
    first = re.sub(r"\s*\[Op:.*$", "", re.sub(r"\{\{.*?\}\}\s*", "", first))
    return source.failure_message(path, e, first)
  return source.failure_message(path)


def image_stream(paths: Sequence[str], image_size: int) -> Iterator[source.Decoded]:
  """``DataSource.decoded_images`` with tf.data: each path in order, decoded in parallel."""
  configure_tensorflow()
  paths = [os.fspath(p) for p in paths]

  def readable(path: bytes) -> np.ndarray:
    try:
      folder.check_image(path.decode())
    except folder.DatasetError:
      return np.array(False)
    return np.array(True)

  def check(index, path):
    return index, path, tf.numpy_function(readable, [path], tf.bool, stateful=False)

  def load(index, path):
    return index, decode_image_8bit(tf.io.read_file(path), image_size)

  n = len(paths)
  ds = tf.data.Dataset.from_tensor_slices(
    (tf.range(n, dtype=tf.int64), tf.constant(paths, tf.string, shape=[n]))
  )
  # A bad file is dropped here and reported from the gap in the indices, so it
  # does not stop the stream. PIL's check first drops most of them quietly
  # (TensorFlow logs a traceback for each decoder error it meets).
  ds = ds.map(check, num_parallel_calls=tf.data.AUTOTUNE).filter(lambda i, p, ok: ok)
  ds = ds.map(lambda i, p, ok: load(i, p), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.ignore_errors().prefetch(tf.data.AUTOTUNE).with_options(dataset_options())
  expected = 0
  for index, image in ds.as_numpy_iterator():
    for i in range(expected, int(index)):
      yield i, None, _failure_message(paths[i])
    yield int(index), image, None
    expected = int(index) + 1
  for i in range(expected, n):
    yield i, None, _failure_message(paths[i])
