"""Input pipelines, folder scanning, demo data and tfds builders of skrd4ad_jax.

Importing the package registers the tfds builders `mvtec_ad`, `visa` and `vad`
when tensorflow_datasets is installed (tfds imports TensorFlow lazily, so this
stays cheap); `skrd4ad_jax.data.folder` works without TensorFlow or tfds.
"""

import importlib.util

if importlib.util.find_spec("tensorflow_datasets") is not None:
  # Defining the builder classes registers them with tfds.
  from skrd4ad_jax.data import mvtec_ad, vad, visa  # noqa: F401
