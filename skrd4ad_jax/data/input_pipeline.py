"""Input data of one category (train / val / test): decoding with tf.data, then memory.

Pre-processing reproduces the RD4AD reference: PIL `convert('RGB')`, then
`Resize((256, 256))` (antialiased bilinear on 8-bit values: Pillow's two
fixed-point passes, horizontal then vertical, emulated bit for bit), `/ 255`,
ImageNet mean/std: images become float32 [H, W, 3]. (Pillow 13 runs the
vertical pass first on some portrait images; there results differ by at most
one 8-bit level. 16-bit images are scaled to 8 bits, where PIL would clip.)
Masks (any nonzero value = defect) are resized the same way and binarised at
`mask_threshold`. `decode_and_resize` gives a predict script the same numbers.

Fields of `data_cfg` (an `ml_collections.ConfigDict`, `config.data`):

  source: 'folder' (an MVTec-layout tree at `root`), 'tfds' (the builders of
    this package, prepared from `manual_dir`) or 'demo' (generated offline by
    `skrd4ad_jax.data.demo_data.ensure_demo_dataset`, then read as a folder).
  dataset: tfds builder name for source 'tfds': 'mvtec_ad', 'visa' or 'vad'.
  root: folder root (<root>/<category>/train/good/...); for 'demo' where the
    demo tree is written ('' = its default location).
  categories: tuple of category names; empty = all (see `resolve_categories`).
  image_size: side of the square network input (256).
  mask_threshold: a resized mask pixel is defective when > this (0.5).
  val_fraction: fraction of the normal training images held out as the 'val'
    split (for thresholds), chosen deterministically by `shuffle_seed`;
    0 = none (default 0.1).
  tfds_data_dir: tfds data_dir ('' = tfds' default, ~/tensorflow_datasets).
  manual_dir: where the downloaded archives / extracted trees are for 'tfds'
    ('' = <tfds_data_dir>/downloads/manual).
  shuffle_seed: seed of the validation hold-out (the training order is the
    job's own: see `skrd4ad_jax.training.batches`).
  Optional: demo_seed (0): seed given to `ensure_demo_dataset`.

`CategoryData.load` decodes every split once, in parallel (tf.data), and keeps
the images in host memory as uint8 at the configured size; batches are then
cut from memory in numpy.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import dataclasses
import io
import os
from typing import Any

import numpy as np
from PIL import Image
import tensorflow as tf

from skrd4ad_jax import normalization
from skrd4ad_jax.data import folder

EVAL_SPLITS = ("test", "val", "train")
PREFETCH_BATCHES = 2  # used by predict's streaming pipeline
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


# Pillow's fixed-point precision of 8-bit resampling (libImaging/Resample.c).
_PIL_PRECISION_BITS = 32 - 8 - 2


def _pil_bilinear_coeffs(in_size, out_size):
  """Pillow's antialiased bilinear weights for one axis, in fixed point.

  Mirrors `precompute_coeffs` + `normalize_coeffs_8bpc` of Pillow's
  Resample.c in IEEE double, in the same order of operations, so the integer
  weights are bit-identical.

  Args:
    in_size: input length.
    out_size: output length.

  Returns:
    index int32 [out, ksize] (input positions, clamped) and weight int32
    [out, ksize] (0 beyond each window).
  """
  in_size, out_size = int(in_size), int(out_size)
  scale = in_size / out_size
  filterscale = max(scale, 1.0)
  support = 1.0 * filterscale  # The bilinear filter's support is 1.
  ksize = int(np.ceil(support)) * 2 + 1
  center = (np.arange(out_size) + 0.5) * scale
  ss = 1.0 / filterscale
  xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
  xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
  taps = np.arange(ksize)
  w = np.maximum(1.0 - np.abs((taps[None] + xmin[:, None] - center[:, None] + 0.5) * ss), 0.0)
  w = np.where(taps[None] < xmax[:, None], w, 0.0)
  total = np.zeros(out_size)
  for k in range(ksize):  # Sequential, as in C (numpy's sum is pairwise).
    total = total + w[:, k]
  safe_total = np.where(total == 0.0, 1.0, total)[:, None]
  w = np.where(total[:, None] != 0.0, w / safe_total, w)
  weight = np.trunc(0.5 + w * (1 << _PIL_PRECISION_BITS)).astype(np.int32)
  index = np.minimum(xmin[:, None] + taps[None], in_size - 1).astype(np.int32)
  return index, weight


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
      _pil_bilinear_coeffs, [in_size, out_size], [tf.int32, tf.int32], stateful=False
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
    records: dict[str, Any],
    counts: dict[str, int],
    has_masks: bool,
    from_files: bool,
    image_size: int,
    mask_threshold: float = 0.5,
    location: str = "",
  ):
    """Use `make_category_data`; `records` maps split -> dataset maker."""
    self.category = category
    self.num_train = counts["train"]
    self.num_val = counts["val"]
    self.num_test = counts["test"]
    self.has_masks = has_masks
    self.image_size = image_size
    self.location = location
    self._records = records
    self._from_files = from_files
    self._mask_threshold = mask_threshold
    self._arrays: dict[str, SplitArrays] = {}

  # -- per-record decoding ----------------------------------------------------

  def _load_image(self, record):
    contents = tf.io.read_file(record["image"]) if self._from_files else (record["image"])
    return decode_image_8bit(contents, self.image_size)

  def _load_mask(self, record):
    mask = record["mask"]
    size = self.image_size

    def decode():
      contents = tf.io.read_file(mask) if self._from_files else mask
      return decode_mask_binary(contents, size, self._mask_threshold)

    return tf.cond(tf.strings.length(mask) > 0, decode, lambda: tf.zeros([size, size], tf.uint8))

  def _load_example(self, record):
    return {
      "image": self._load_image(record),
      "gt_mask": self._load_mask(record),
      "gt_label": record["gt_label"],
      "image_path": record["image_path"],
      "defect_type": record["defect_type"],
    }

  def _record_problem(self, split: str, index: int) -> str:
    """Why record ``index`` of ``split`` does not load (image or mask), in one line."""
    for record in self._records[split]().skip(index).take(1):
      path = record["image_path"].numpy().decode()
      mask = (
        record["mask"].numpy().decode(errors="replace") if self._from_files else "the stored mask"
      )
      for what, load in (("image", self._load_image), ("mask", self._load_mask)):
        try:
          load(record).numpy()
        except Exception as e:  # any decoder error is the file's problem
          culprit = path if what == "image" else f"{mask} (mask of {path})"
          reason = (str(e).strip().splitlines() or [""])[0]
          return f"{culprit}: {type(e).__name__}: {reason}"
      return f"{path}: could not be loaded"
    return f"record {index}: could not be loaded"

  # -- loading ----------------------------------------------------------------

  def load(self) -> None:
    """Decodes every split into memory; a problem names the files and the fix.

    Raises:
      DatasetError: naming every image or mask that cannot be read or decoded
        (up to 20), its split and category.
    """
    if self._arrays:
      return
    problems = []
    for split in ("train", "val", "test"):
      arrays, bad = self._decode_split(split)
      problems += [(split, self._record_problem(split, i)) for i in bad]
      self._arrays[split] = arrays
    if problems:
      self._arrays = {}
      shown = "; ".join(f"[{split}] {what}" for split, what in problems[:20])
      more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
      raise DatasetError(
        f"Category {self.category!r}: {len(problems)} file(s) cannot be read or decoded: "
        f"{shown}{more}. Fix: replace these files with valid images or remove them."
      )

  def _decode_split(self, split: str) -> tuple[SplitArrays, list[int]]:
    """(the decodable records of ``split``, indices of those that fail)."""
    size = self.image_size
    ds = self._records[split]().enumerate()
    ds = ds.map(lambda i, r: (i, self._load_example(r)), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.ignore_errors().with_options(dataset_options())
    indices, out = [], {k: [] for k in ("image", "gt_mask", "gt_label", "path", "defect")}
    for i, ex in ds.as_numpy_iterator():
      indices.append(int(i))
      out["image"].append(ex["image"])
      out["gt_mask"].append(ex["gt_mask"])
      out["gt_label"].append(ex["gt_label"])
      out["path"].append(ex["image_path"].decode())
      out["defect"].append(ex["defect_type"].decode())
    total = {"train": self.num_train, "val": self.num_val, "test": self.num_test}[split]
    bad = sorted(set(range(total)) - set(indices))
    arrays = SplitArrays(
      image=np.asarray(out["image"], np.uint8).reshape(-1, size, size, 3),
      gt_mask=np.asarray(out["gt_mask"], np.uint8).reshape(-1, size, size),
      gt_label=np.asarray(out["gt_label"], np.int32).reshape(-1),
      image_path=out["path"],
      defect_type=out["defect"],
    )
    return arrays, bad

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

  # -- batches ----------------------------------------------------------------

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
# Construction from a config.


def _folder_category_data(data_cfg, root: str, category: str) -> CategoryData:
  splits = folder.scan_category(
    root, category, val_fraction=data_cfg.val_fraction, seed=data_cfg.shuffle_seed
  )
  split_samples = {"train": splits.train, "val": splits.val, "test": splits.test}
  records = {k: (lambda s=v: _folder_records(s)) for k, v in split_samples.items()}
  counts = {k: len(v) for k, v in split_samples.items()}
  return CategoryData(
    category,
    records,
    counts,
    splits.has_masks,
    from_files=True,
    image_size=data_cfg.image_size,
    mask_threshold=data_cfg.mask_threshold,
    location=os.path.join(root, category),
  )


def tfds_builder(data_cfg, category: str):
  """Returns the prepared tfds builder of `dataset/category`."""
  import tensorflow_datasets as tfds

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
  return CategoryData(
    category,
    records,
    counts,
    has_masks,
    from_files=False,
    image_size=data_cfg.image_size,
    mask_threshold=data_cfg.mask_threshold,
    location=f"tfds {data_cfg.dataset}/{category}",
  )


def _folder_root(data_cfg) -> str:
  if data_cfg.source == "demo":
    from skrd4ad_jax.data import demo_data

    return demo_data.ensure_demo_dataset(data_cfg.root or None, data_cfg.get("demo_seed", 0))
  return data_cfg.root


def resolve_categories(data_cfg) -> tuple[str, ...]:
  """The configured categories, or all of them when the tuple is empty."""
  if data_cfg.categories:
    return tuple(data_cfg.categories)
  if data_cfg.source == "tfds":
    import tensorflow_datasets as tfds

    cls = tfds.builder_cls(data_cfg.dataset)
    return tuple(c.name for c in cls.BUILDER_CONFIGS)
  return tuple(folder.discover_categories(_folder_root(data_cfg)))


def make_category_data(data_cfg, category: str) -> CategoryData:
  """Builds the pipelines of one category from `config.data`.

  Args:
    data_cfg: the data config (fields in the module docstring).
    category: category name.

  Returns:
    The category's `CategoryData`.

  Raises:
    DatasetError: missing or malformed data, naming the file and the fix.
  """
  configure_tensorflow()
  if data_cfg.source in ("folder", "demo"):
    return _folder_category_data(data_cfg, _folder_root(data_cfg), category)
  if data_cfg.source == "tfds":
    return _tfds_category_data(data_cfg, category)
  raise DatasetError(f"Unknown data source {data_cfg.source!r}: use 'folder', 'tfds' or 'demo'.")
