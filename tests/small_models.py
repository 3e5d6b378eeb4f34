"""Small test configurations shared by the relatives' tests."""

import os

import jax
import numpy as np

from skrd4ad_jax.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(model_name, section, **fields):
  """configs/tiny.py (resnet_micro, random teacher, 64 px; one OCE block, a (1, 1, 1) decoder).

  Args:
    model_name: ``config.model.name``.
    section: the method's own config section (e.g. 'mrkd'), updated with ``fields``.
  """
  cfg = load_config(os.path.join(REPO, "configs", "tiny.py"))
  cfg.model.name = model_name
  cfg.model.oce_blocks = 1
  cfg.model.decoder_blocks = (1, 1, 1)
  cfg.train.batch_size = 2
  cfg[section].update(fields)
  return cfg


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
