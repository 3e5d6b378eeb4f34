"""Parameter trees of the four methods: names and shapes fixed across refactorings.

``tests/data/param_trees.json.gz`` holds, for every method and teacher, the
``params`` and ``batch_stats`` leaves (path -> shape) of the state
``method.init`` makes at 64 px, recorded before the package moved into its
current layout. Checkpoints written by any version of the project restore into
these trees, so a change here breaks every stored run and must be deliberate.
"""

import gzip
import json
import os

import jax
import pytest

from skrd4ad_jax import methods, teachers
from skrd4ad_jax.config import defaults

RECORDED = os.path.join(os.path.dirname(__file__), "data", "param_trees.json.gz")
with gzip.open(RECORDED, "rt") as f:
  TREES = json.load(f)


def tree_shapes(state) -> dict[str, list[int]]:
  flat = {}
  for col in ("params", "batch_stats"):
    for path, leaf in jax.tree_util.tree_flatten_with_path(getattr(state, col))[0]:
      key = "/".join(str(getattr(k, "key", k)) for k in path)
      flat[f"{col}/{key}"] = list(leaf.shape)
  return flat


@pytest.mark.parametrize("name_teacher", sorted(TREES))
def test_parameter_tree_is_unchanged(name_teacher):
  name, teacher = name_teacher.split("/")
  cfg = defaults.get_config()
  cfg.model.name = name
  cfg.model.teacher = teacher
  cfg.data.image_size = 64
  method = methods.build_method(cfg)
  init = teachers.build_teacher(teacher).init
  teacher_vars = jax.eval_shape(
    init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 64, 64, 3), "float32")
  )
  state = jax.eval_shape(method.init, jax.random.PRNGKey(0), teacher_vars)
  got, want = tree_shapes(state), TREES[name_teacher]
  assert sorted(set(want) - set(got)) == [], "leaves missing"
  assert sorted(set(got) - set(want)) == [], "new leaves"
  assert {k: v for k, v in got.items() if want[k] != v} == {}, "shapes changed"
