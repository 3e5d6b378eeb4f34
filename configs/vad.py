"""VAD (Valeo Anomaly Dataset): one category, image-level labels only.

  python -m skrd4ad_jax.main --config=configs/vad.py --config.data.manual_dir=/data/vad

``manual_dir`` holds ``train/good``, ``test/good`` and ``test/<bad>``. No masks:
pixel metrics are reported as '–'. Needs the torchvision wide_resnet50_2 teacher.
"""

import os

from skrd4ad_jax.config import defaults


def get_config(arg=""):
  del arg
  config = defaults.get_config()
  config.name = "vad"
  config.data.source = "tfds"
  config.data.dataset = "vad"
  config.data.manual_dir = os.environ.get("VAD_ROOT", "")
  config.data.categories = ("vad",)
  return config
