"""Input pipelines, folder scanning and tfds builders of skrd4ad_jax.

Importing the package registers the tfds builders `mvtec_ad`, `visa` and `vad`
when tensorflow_datasets is installed (tfds imports TensorFlow lazily, so this
stays cheap); `data_pipelines.folder` works without TensorFlow or tfds.
"""

import importlib.util

if importlib.util.find_spec('tensorflow_datasets') is not None:
  from data_pipelines import mvtec_ad  # pylint: disable=g-import-not-at-top
  from data_pipelines import vad  # pylint: disable=g-import-not-at-top
  from data_pipelines import visa  # pylint: disable=g-import-not-at-top
