"""The TensorFlow side of the data: the tf.data input pipeline and the tfds builders.

* ``input_pipeline``: tf.data decoding and resizing (bit for bit as
  ``skrd4ad_jax.data.decode``), folder and tfds records, the decoded
  ``CategoryData`` of a category, predict's stream.
* ``mvtec_ad``, ``visa``, ``vad``: tfds builders, read from manual downloads.
* ``TFDataSource``: the ``skrd4ad_jax.data.source.DataSource`` of tf.data (and
  tfds for ``config.data.source='tfds'``).
* ``select_source``: what entry points call: ``TFDataSource`` when TensorFlow
  can be imported, else ``PillowSource`` (with one warning);
  ``SKRD4AD_DECODER=pillow`` (or ``tf.data``) chooses.

Importing this package imports no TensorFlow; it registers the tfds builders
(``tfds.builder('mvtec_ad/bottle')``) when tensorflow_datasets is installed, which
imports TensorFlow only when a data set is built or read. Only the bottom layers
of ``skrd4ad_jax`` are imported from here (``data``, ``normalization``,
``categories``), never models, methods, training or evaluation.
"""

from __future__ import annotations

import importlib

from absl import logging

from skrd4ad_jax.data import source as source_lib

_LAZY = {"input_pipeline", "mvtec_ad", "visa", "vad"}
_warned = False


def tensorflow_available() -> bool:
  """Whether ``import tensorflow`` works here (it is imported, once, by this check)."""
  try:
    import tensorflow  # noqa: F401
  except ImportError:
    return False
  return True


def tfds_available() -> bool:
  try:
    import tensorflow_datasets  # noqa: F401
  except ImportError:
    return False
  return True


def register_builders() -> bool:
  """Registers the tfds builders ``mvtec_ad``, ``visa`` and ``vad``; False without tfds."""
  if not tfds_available():
    return False
  # Defining the builder classes registers them with tfds.
  from data_pipelines import mvtec_ad, vad, visa  # noqa: F401

  return True


def configure_tensorflow() -> None:
  """Keeps TensorFlow (when installed) off accelerators, leaving their memory to JAX."""
  try:
    import tensorflow as tf
  except ImportError:
    return
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # Already initialised: the caller decided.
    pass


class TFDataSource(source_lib.DataSource):
  """tf.data decoding (and tfds records for ``config.data.source='tfds'``)."""

  name = "tf.data"

  def __init__(self):
    from data_pipelines import input_pipeline

    self._pipeline = input_pipeline

  def categories(self, data_cfg) -> tuple[str, ...]:
    return self._pipeline.resolve_categories(data_cfg)

  def category_data(self, data_cfg, category: str):
    return self._pipeline.make_category_data(data_cfg, category)

  def decoded_images(self, paths, image_size):
    return self._pipeline.image_stream(paths, image_size)


def select_source(data_cfg=None) -> source_lib.DataSource:
  """The data source of an entry point: tf.data when TensorFlow imports, else Pillow.

  Both give the same arrays; without TensorFlow one warning says so (and
  ``config.data.source='tfds'`` then fails with a message naming the fix).
  ``SKRD4AD_DECODER`` (``source.decoder_choice``) overrides the choice.

  Args:
    data_cfg: ``config.data`` (for the warning's words); None for predict.

  Raises:
    ValueError: ``SKRD4AD_DECODER`` is misspelt, or asks for tf.data where
      TensorFlow cannot be imported.
  """
  global _warned
  choice = source_lib.decoder_choice()
  if choice == "pillow":
    return source_lib.PillowSource()
  if tensorflow_available():
    configure_tensorflow()
    return TFDataSource()
  if choice == "tf.data":
    raise ValueError(
      f"{source_lib.DECODER_ENV}=tf.data, but TensorFlow cannot be imported: install "
      f"it (pip install tensorflow-cpu) or unset {source_lib.DECODER_ENV}."
    )
  if not _warned:
    _warned = True
    what = f" (config.data.source={data_cfg.source!r})" if data_cfg is not None else ""
    logging.warning(
      "TensorFlow cannot be imported: images are decoded with Pillow and numpy%s, "
      "with the same results as tf.data; tfds data sets need TensorFlow.",
      what,
    )
  return source_lib.PillowSource()


def __getattr__(name: str):
  if name in _LAZY:
    return importlib.import_module(f"data_pipelines.{name}")
  raise AttributeError(f"module 'data_pipelines' has no attribute {name!r}")


register_builders()
