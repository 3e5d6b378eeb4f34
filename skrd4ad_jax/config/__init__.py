"""Configuration: the base config, dataset config files, and their loading.

- ``defaults.get_config()``: every field with its official default and a comment.
- ``load_config('configs/mvtec.py:bottle,cable')``: a config file as
  ``--config=`` reads it (its ``get_config(arg)``), without touching ``sys.path``.
- ``parse_categories``: the ``:a,b`` argument of a dataset config.
- ``validation.validate(config)``: the whole config checked before a run.
- ``resolve(config)``: a copy with the teacher's defaults filled in
  (``teachers.registry``): what a run actually uses, and what it stores.
"""

from __future__ import annotations

from collections.abc import Sequence
import importlib.util
import os

import ml_collections


def parse_categories(arg: str, all_categories: Sequence[str]) -> tuple[str, ...]:
  """``'bottle,cable'`` -> ('bottle', 'cable'); '' -> all; unknown names raise ConfigError."""
  from skrd4ad_jax.config.validation import ConfigError

  if not arg:
    return tuple(all_categories)
  wanted = tuple(c.strip() for c in arg.split(",") if c.strip())
  unknown = [c for c in wanted if c not in all_categories]
  if unknown:
    raise ConfigError(
      [
        f"Unknown categories {unknown} after the ':' of --config; choose from "
        f"{', '.join(all_categories)}."
      ]
    )
  return wanted


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads ``path[:arg]`` the way ``--config=path[:arg]`` does.

  Args:
    spec: a config file path, optionally followed by ``:arg`` (e.g.
      ``configs/mvtec.py:bottle,cable``).

  Returns:
    ``get_config(arg)`` (or ``get_config()`` without an argument) of that file.
  """
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Config file not found: {path}")
  name = "skrd4ad_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


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
  from skrd4ad_jax.teachers import registry

  resolved = ml_collections.ConfigDict(config.to_dict())
  spec = registry.get(resolved.model.teacher)
  for key in registry.OFFICIAL_RECIPE:
    node, leaf = _get(resolved, key)
    if node.get(leaf) is None:
      node[leaf] = spec.recipe_value(key)
  return resolved


def teacher_recipe_notes(config: ml_collections.ConfigDict) -> list[str]:
  """Which recipe settings of a resolved config differ from the official recipe, and why."""
  from skrd4ad_jax.teachers import registry

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
