"""MVTec AD, all 15 categories (or a subset), the official SK-RD4AD recipe.

  python -m skrd4ad_jax.main --config=configs/mvtec.py \
      --config.data.root=/data/mvtec_anomaly_detection
  python -m skrd4ad_jax.main --config=configs/mvtec.py:bottle,cable --config.data.root=...

Reads the extracted MVTec AD tree (``<root>/<category>/train/good`` ...). To use the
tfds builder instead: ``--config.data.source=tfds --config.data.manual_dir=DIR``.
Needs the torchvision teacher: ``python scripts/port_torchvision_weights.py
--arch wide_resnet50_2 --download`` (or --input FILE).
"""

import os

from skrd4ad_jax import config as config_lib
from skrd4ad_jax.config import defaults

CATEGORIES = (
  "carpet",
  "bottle",
  "hazelnut",
  "leather",
  "cable",
  "capsule",
  "grid",
  "pill",
  "transistor",
  "metal_nut",
  "screw",
  "toothbrush",
  "zipper",
  "tile",
  "wood",
)


def get_config(arg=""):
  config = defaults.get_config()
  config.name = "mvtec"
  config.data.dataset = "mvtec_ad"
  config.data.source = "folder"
  config.data.root = os.environ.get("MVTEC_ROOT", "")
  config.data.categories = config_lib.parse_categories(arg, CATEGORIES)
  return config
