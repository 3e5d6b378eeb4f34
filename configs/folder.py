"""Your own images in an MVTec-style folder tree, no prepare step.

  python -m skrd4ad_jax.main --config=configs/folder.py --config.data.root=/data/my_line
  python -m skrd4ad_jax.main --config=configs/folder.py:part_a,part_b --config.data.root=...

Layout: ``<root>/<category>/train/good/*``, ``<root>/<category>/test/good/*``,
``<root>/<category>/test/<defect>/*`` and, optionally,
``<root>/<category>/ground_truth/<defect>/<stem>_mask.png`` (or ``<stem>.png``).
Without ground_truth only image-level metrics are computed; a test set with only
``good`` images is allowed. Categories are discovered when none are named.
"""

import os

from skrd4ad_jax.config import defaults


def get_config(arg=""):
  config = defaults.get_config()
  config.name = "folder"
  config.data.source = "folder"
  config.data.dataset = "folder"
  config.data.root = os.environ.get("SKRD4AD_FOLDER_ROOT", "")
  config.data.categories = tuple(c.strip() for c in arg.split(",") if c.strip())
  return config
