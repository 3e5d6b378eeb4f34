"""Configuration: the base config, dataset config files, and their loading.

- ``defaults.get_config()``: every field with its official default and a comment.
- ``load_config('configs/mvtec.py:bottle,cable')``: a config file as
  ``--config=`` reads it (its ``get_config(arg)``), without touching ``sys.path``.
- ``parse_categories``: the ``:a,b`` argument of a dataset config.
- ``validation``: the checks that need nothing above this layer (keys, types,
  ranges, combinations); ``training/preflight.py`` adds the registries' checks.
- ``flatten(config)``: ``{'train.epochs': 200, ...}``, the one flattener.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import importlib.util
import os
from typing import Any

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


def flatten(config: Mapping[str, Any] | ml_collections.ConfigDict) -> dict[str, Any]:
  """Every leaf of a (nested) config or dict under its dotted key.

  ``{'train': {'epochs': 2}}`` -> ``{'train.epochs': 2}``; lists and tuples are
  leaves. Used wherever configs are compared, listed or logged.
  """
  if isinstance(config, ml_collections.ConfigDict):
    config = config.to_dict()
  out: dict[str, Any] = {}
  for key, value in config.items():
    if isinstance(value, Mapping):
      out.update({f"{key}.{k}": v for k, v in flatten(value).items()})
    else:
      out[str(key)] = value
  return out
