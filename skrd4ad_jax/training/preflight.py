"""The whole config checked before anything runs, with the registries above the config.

``validate(config)`` runs one pass of ``config/validation.py``'s checks (keys,
types, ranges, the budget, data and thresholds) plus the sections that need the
method, teacher, map and loop registries: the method and teacher names, the
student's layout, losses and anomaly maps, the category loop, the per-method
sections and feature caching. It raises one ``ConfigError`` whose ``problems``
each name the field, the value and the fix, so that an entry point prints one
line per problem within seconds (nothing here imports TensorFlow or reads data).
``prepare(config)`` validates and resolves the teacher's defaults: what a run
uses and stores, once per run.
"""

from __future__ import annotations

import math

import ml_collections

from skrd4ad_jax import anomaly_map, interpolation, losses, methods
from skrd4ad_jax.config import validation
from skrd4ad_jax.config.validation import ConfigError
from skrd4ad_jax.evaluation import evaluate
from skrd4ad_jax.methods.base import DTYPES
from skrd4ad_jax.methods.rd_expert import draem
from skrd4ad_jax.teachers import recipe, registry
from skrd4ad_jax.training import parallel

SKIP_CONNECTIONS = (-1, 0, 1)


def _check_model(c: validation.Checks) -> None:
  c.choice("model.name", methods.METHOD_NAMES)
  c.choice(
    "model.teacher",
    tuple(registry.TEACHERS),
    " See the Teachers table of the README.",
  )
  c.choice("model.skip_connections", SKIP_CONNECTIONS, " -1 = by model name, 0 = off, 1 = on.")
  for key in ("bottleneck_width_per_group", "decoder_width_per_group", "oce_blocks"):
    c.integer(f"model.{key}", 0, " 0 = the teacher's official value.")
  if c.has("model.decoder_blocks"):
    blocks = c.get("model.decoder_blocks")
    if blocks and (
      len(blocks) != 3
      or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in blocks)
    ):
      c.add(
        f"config.model.decoder_blocks={tuple(blocks)!r} must be three integers >= 1 "
        "(blocks per decoder stage), or () for the teacher's official value."
      )
  c.choice("model.dtype", tuple(DTYPES), " Use 'bfloat16' on accelerators, else 'float32'.")


def _check_maps_and_loss(c: validation.Checks) -> None:
  c.choice("loss.kind", losses.LOSS_KINDS)
  c.number("loss.consistency_rate", 0, math.inf)
  c.choice("anomaly_map.mode", anomaly_map.MAP_MODES)
  c.number("anomaly_map.sigma", 0, math.inf, fix=" 0 disables the blur.")
  c.number("anomaly_map.truncate", 0, math.inf, low_open=True)
  c.choice("anomaly_map.blur_mode", interpolation.BLUR_MODES)
  if c.has("anomaly_map.levels") and c.get("anomaly_map.levels") is not None:
    levels = c.get("anomaly_map.levels")
    teacher = c.get("model.teacher")
    num_levels = len(registry.TEACHERS[teacher].channels) if teacher in registry.TEACHERS else 3
    ok = (
      len(levels) > 0
      and all(isinstance(v, int) and not isinstance(v, bool) for v in levels)
      and all(1 <= v <= num_levels for v in levels)
      and len(set(levels)) == len(levels)
    )
    if not ok:
      c.add(
        f"config.anomaly_map.levels={tuple(levels)!r} must be a non-empty subset of "
        f"1..{num_levels} without repeats (1 = the shallowest teacher level), e.g. (1, 2, 3)."
      )


def _check_loop(c: validation.Checks) -> None:
  c.choice("parallel.category_loop", parallel.CATEGORY_LOOPS)
  c.choice("eval.protocol", evaluate.PROTOCOLS)
  problem = parallel.category_loop_problem(
    c.get("parallel.category_loop"), c.get("parallel.data_axis_size")
  )
  if problem:
    c.add(problem)


def _check_methods(c: validation.Checks) -> None:
  c.number("mrkd.mask_ratio", 0, 1, high_open=True, fix=" MRKD's feature-mask ratio; default 0.2.")
  c.boolean("mrkd.mask_at_test")
  c.boolean("rd_expert.gated")
  c.number("rd_expert.teacher_learning_rate", 0, math.inf, low_open=True)
  c.choice("rd_expert.foreground", draem.FOREGROUND_MODES)
  c.integer("rd_expert.num_steps", 1)
  c.integer("rd_expert.long_num_steps", 1)
  name = c.get("model.name")
  if c.get("train.cache_teacher_features") is True and name in methods.METHOD_NAMES:
    if not methods.method_class(name).supports_feature_cache:
      c.add(
        f"config.train.cache_teacher_features=True needs a method without input "
        f"augmentation (rd4ad, sk_rd4ad); {name} changes its inputs every step. "
        "Fix: --config.train.cache_teacher_features=False."
      )


SECTIONS = validation.BASE_SECTIONS + (
  _check_model,
  _check_maps_and_loss,
  _check_loop,
  _check_methods,
)


def problems(config: ml_collections.ConfigDict) -> list[str]:
  """Every problem of ``config`` (checked as resolved: teacher defaults filled in); [] if none."""
  teacher = config.get("model", {}).get("teacher") if "model" in config else None
  resolve = recipe.resolve if teacher in registry.TEACHERS else None
  return validation.problems(config, SECTIONS, resolve)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises one ``ConfigError`` listing every problem of ``config``."""
  found = problems(config)
  if found:
    raise ConfigError(found)


def prepare(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config`` validated and resolved: what a run uses and stores.

  Raises:
    ConfigError: ``.problems`` holds one sentence per problem.
  """
  validate(config)
  return recipe.resolve(config)
