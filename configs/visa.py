"""VisA, 12 categories, built by the tfds builder from the raw archive + split_csv/1cls.csv.

  python -m skrd4ad_jax.main --config=configs/visa.py --config.data.manual_dir=/data/visa_raw
  python -m skrd4ad_jax.main --config=configs/visa.py:pcb1,pcb2 --config.data.manual_dir=...

``manual_dir`` holds the extracted VisA archive (``<class>/Data/...`` and
``split_csv/1cls.csv``). Needs the torchvision wide_resnet50_2 teacher.
"""

import os

from skrd4ad_jax import categories
from skrd4ad_jax import config as config_lib
from skrd4ad_jax.config import defaults

CATEGORIES = categories.VISA


def get_config(arg=""):
  config = defaults.get_config()
  config.name = "visa"
  config.data.source = "tfds"
  config.data.dataset = "visa"
  config.data.manual_dir = os.environ.get("VISA_ROOT", "")
  config.data.categories = config_lib.parse_categories(arg, CATEGORIES)
  return config
