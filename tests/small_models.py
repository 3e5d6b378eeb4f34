"""Small test configurations shared by the relatives' tests."""

import os
import sys

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(model_name, section, **fields):
  """resnet18 / random teacher / 64 px, with a one-block OCE and decoder stages.

  Args:
    model_name: ``config.model.name``.
    section: the method's own config section (e.g. 'mrkd'), updated with ``fields``.
  """
  if os.path.join(REPO, "configs") not in sys.path:
    sys.path.insert(0, os.path.join(REPO, "configs"))
  import tiny  # pylint: disable=g-import-not-at-top
  cfg = tiny.get_config()
  cfg.model.name = model_name
  cfg.model.oce_blocks = 1
  cfg.model.decoder_blocks = (1, 1, 1)
  cfg.train.batch_size = 2
  cfg[section].update(fields)
  return cfg


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
