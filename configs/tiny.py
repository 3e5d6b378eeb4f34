"""A tiny configuration for tests: a micro ResNet with a random teacher, 64x64 images.

  python -m skrd4ad_jax.main --config=configs/tiny.py --config.data.root=DIR

``DIR`` is any MVTec-layout tree; the tests make one with
``skrd4ad_jax.data.demo_data.ensure_demo_dataset``.
"""

import os

from skrd4ad_jax.config import defaults


def get_config(arg=""):
  config = defaults.get_config()
  config.name = "tiny"
  config.seed = 0
  # ResNet-18's layout a quarter as wide with one block per stage, and its paired
  # student (one OCE block, a (1, 1, 1) decoder; teachers/registry.py): every
  # method, loop and file path runs as with a real teacher, while a checkpoint
  # is ~6 MB instead of resnet18's ~90 MB and a step a fraction of its cost.
  config.model.teacher = "resnet_micro"
  config.model.teacher_weights = "random"
  config.data.source = "folder"
  config.data.dataset = "folder"
  config.data.root = os.environ.get("SKRD4AD_TINY_ROOT", "")
  config.data.categories = tuple(c.strip() for c in arg.split(",") if c.strip())
  config.data.image_size = 64
  config.data.val_fraction = 0.25
  config.train.epochs = 2
  config.train.batch_size = 4
  config.train.log_every_steps = 2
  config.train.eval_every_epochs = 0
  config.train.checkpoint_every_epochs = 1
  config.eval.batch_size = 8
  config.eval.tensorboard_pictures = 4
  return config
