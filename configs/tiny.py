"""A tiny configuration for tests: resnet18 with a random teacher, 64x64 images.

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
  config.model.teacher = "resnet18"
  config.model.teacher_weights = "random"
  # A slimmer student than resnet18's official pairing (one OCE block, one block
  # per decoder stage): half the parameters, so each checkpoint writes ~90 MB
  # instead of ~160 MB and each step traces and runs faster.
  config.model.oce_blocks = 1
  config.model.decoder_blocks = (1, 1, 1)
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
