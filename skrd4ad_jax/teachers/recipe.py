"""What a teacher decides for a run: the student's layout and the recipe defaults.

``resolve(config)`` fills the settings a config leaves to its teacher (the loss
kind, the consistency weight, the map levels: ``registry.OFFICIAL_RECIPE``'s
keys); ``student_layout(config.model)`` gives the trainable parts' widths and
depths; ``recipe_notes`` says which settings differ from the official recipe.
"""

from __future__ import annotations

import ml_collections

from skrd4ad_jax.models.student import StudentLayout
from skrd4ad_jax.teachers import registry


def student_layout(model_cfg) -> StudentLayout:
  """Resolves the layout from ``config.model`` (0 / empty fields = the teacher's default).

  The defaults are the official pairing of each teacher (``teachers.registry``).
  """
  spec = registry.get(model_cfg.teacher)
  return StudentLayout(
    channels=tuple(spec.channels),
    block=spec.block,
    oce_blocks=int(model_cfg.get("oce_blocks", 0) or spec.oce_blocks),
    decoder_blocks=tuple(model_cfg.get("decoder_blocks", ()) or spec.decoder_blocks),
    bottleneck_width_per_group=int(
      model_cfg.get("bottleneck_width_per_group", 0) or spec.width_per_group
    ),
    decoder_width_per_group=int(
      model_cfg.get("decoder_width_per_group", 0) or spec.width_per_group
    ),
  )


def _get(config: ml_collections.ConfigDict, dotted: str):
  node = config
  *parents, leaf = dotted.split(".")
  for p in parents:
    node = node[p]
  return node, leaf


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of ``config`` with every setting left to the teacher filled in.

  Settings that belong to the teacher (``registry.OFFICIAL_RECIPE``'s keys:
  the loss kind, the consistency weight, the map levels) take the value of
  ``config.model.teacher``'s recipe when they are None. Idempotent.
  """
  resolved = ml_collections.ConfigDict(config.to_dict())
  spec = registry.get(resolved.model.teacher)
  for key in registry.OFFICIAL_RECIPE:
    node, leaf = _get(resolved, key)
    if node.get(leaf) is None:
      node[leaf] = spec.recipe_value(key)
  return resolved


def recipe_notes(config: ml_collections.ConfigDict) -> list[str]:
  """Which recipe settings of a resolved config differ from the official recipe, and why."""
  spec = registry.get(config.model.teacher)
  differ = []
  for key, official in registry.OFFICIAL_RECIPE.items():
    node, leaf = _get(config, key)
    value = node.get(leaf)
    value = tuple(value) if isinstance(value, (list, tuple)) else value
    if value != official:
      source = "the teacher's default" if spec.recipe.get(key) == value else "set in the config"
      differ.append(f"{key}={value!r} ({source}; official: {official!r})")
  return differ
