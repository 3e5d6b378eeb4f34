"""The whole config checked before anything runs: one error listing every problem.

``validate(config)`` compares a config with ``defaults.get_config()`` (unknown
keys, with a "did you mean") and checks every field's type, range and choices,
the combinations that only fail later (thresholds on a validation split that is
empty, feature caching with an augmenting method, an image size the network
cannot take), the per-method sections and the per-category strings. It raises
one :class:`ConfigError` whose ``problems`` each name the field, the value and
the fix, so that ``main`` prints one line per problem within seconds instead of
a traceback after hours.

The choices come from the modules that use them (``losses.LOSS_KINDS``,
``anomaly_map.MAP_MODES``, ``teachers.registry.TEACHERS``...); nothing here
imports TensorFlow.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
import difflib
import math
from typing import Any

import ml_collections

from skrd4ad_jax.config import defaults

DATA_SOURCES = ("folder", "tfds", "demo")
TFDS_DATASETS = ("mvtec_ad", "visa", "vad")
THRESHOLD_SOURCES = ("val", "test")
EVAL_PROTOCOLS = ("project", "official")
SKIP_CONNECTIONS = (-1, 0, 1)
# The teacher's deepest tap (E3) has stride 16 and the bottleneck's OCE stage
# halves it once more; the decoder doubles it back three times and adds it to
# E3, E2, E1. Any other size leaves a feature map whose half does not double
# back to its own size (measured with jax.eval_shape of every method: 32, 64,
# ..., 256, 288 work; 24, 30, 48, 100, 250, 257 fail; tests/test_robustness.py).
IMAGE_SIZE_MULTIPLE = 32


class ConfigError(ValueError):
  """A config that cannot run; ``problems`` holds one sentence per problem.

  Attributes:
    problems: each names the field (``config.train.batch_size``), the value and
      the fix.
  """

  def __init__(self, problems: list[str]):
    self.problems = list(problems)
    super().__init__("\n".join(self.problems))


# ---------------------------------------------------------------------------
# Keys and types against the defaults.


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[str]:
  """Every dotted leaf key of ``config`` (``'train.epochs'``, ...)."""
  for key in sorted(config.keys()):
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      yield from flat_keys(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}"


def did_you_mean(
  key: str, known: list[str], siblings: list[str] = (), prefix: str = "config."
) -> str:
  """``' Did you mean config.x?'`` for the closest known key, or ''.

  Args:
    key: the unknown dotted key (``'train.epoch'``).
    known: every dotted leaf key of the defaults.
    siblings: the keys (leaves and sections) of the section that holds ``key``.
    prefix: written before each suggestion (``'--config.'`` on the command line).
  """
  parent, _, leaf = key.rpartition(".")
  section = f"{parent}." if parent else ""
  # The right name in the wrong section (`data.batch_size`), then a near name in
  # the same section (`train.epoch`, `eval.fpr`), then anywhere.
  close = [k for k in known if k.rsplit(".", 1)[-1] == leaf]
  close = close or [
    section + k for k in difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)
  ]
  close = close or [section + k for k in sorted(siblings) if len(leaf) >= 3 and k.startswith(leaf)]
  close = close or difflib.get_close_matches(key, known, n=1, cutoff=0.8)
  return f" Did you mean {' or '.join(prefix + k for k in close)}?" if close else ""


def unknown_key_problem(
  key: str, known: list[str], siblings: list[str] = (), prefix: str = "config."
) -> str:
  """The sentence for a key that the defaults do not have (``prefix`` as in did_you_mean)."""
  return (
    f"Unknown config key {prefix}{key}.{did_you_mean(key, known, siblings, prefix)} Every "
    "key is listed, with a comment, in skrd4ad_jax/config/defaults.py."
  )


def _type_name(t: type) -> str:
  return {int: "an integer", float: "a number", str: "a string", bool: "True or False"}.get(
    t, t.__name__
  )


def _type_problem(key: str, value: Any, expected: type) -> str | None:
  if value is None:
    return None  # A placeholder left unset (resolve fills the teacher's).
  if expected is bool:
    ok = isinstance(value, bool)
  elif expected is int:
    ok = isinstance(value, int) and not isinstance(value, bool)
  elif expected is float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  elif expected in (tuple, list):
    ok = isinstance(value, (tuple, list))
  else:
    ok = isinstance(value, expected)
  if ok:
    return None
  return f"config.{key}={value!r} must be {_type_name(expected)}, not {type(value).__name__}."


def _compare_with_defaults(
  config: ml_collections.ConfigDict,
  base: ml_collections.ConfigDict,
  known: list[str],
  prefix: str = "",
) -> list[tuple[str, str]]:
  """(dotted key, problem) of every unknown key and wrong type, section by section."""
  problems = []
  for key in sorted(config.keys()):
    dotted = f"{prefix}{key}"
    value = config[key]
    if key not in base:
      problems.append((dotted, unknown_key_problem(dotted, known, list(base.keys()))))
      continue
    reference = base[key]
    if isinstance(reference, ml_collections.ConfigDict):
      if isinstance(value, ml_collections.ConfigDict):
        problems += _compare_with_defaults(value, reference, known, dotted + ".")
      else:
        problems.append((dotted, f"config.{dotted} must be a section, not {value!r}."))
      continue
    if isinstance(value, ml_collections.ConfigDict):
      problems.append((dotted, f"config.{dotted} is a single setting, not a section."))
      continue
    problem = _type_problem(dotted, value, base.get_type(key))
    if problem:
      problems.append((dotted, problem))
  return problems


# ---------------------------------------------------------------------------
# Values.


class _Checks:
  """Collects problems; each check is skipped when the field is absent or mistyped."""

  def __init__(self, config: ml_collections.ConfigDict, skip: set[str]):
    self.config = config
    self.skip = skip  # Fields whose type is already reported.
    self.problems: list[str] = []

  def get(self, key: str, default: Any = None) -> Any:
    node = self.config
    for part in key.split("."):
      if not isinstance(node, (ml_collections.ConfigDict, Mapping)) or part not in node:
        return default
      node = node[part]
    return node

  def has(self, key: str) -> bool:
    return key not in self.skip and self.get(key, _MISSING) is not _MISSING

  def add(self, message: str) -> None:
    self.problems.append(message)

  def choice(self, key: str, choices, fix: str = "") -> None:
    if not self.has(key):
      return
    value = self.get(key)
    if value is None and key in _TEACHER_RECIPE_KEYS:
      return  # Left to the teacher (an unknown teacher is reported on its own).
    if value not in choices:
      self.add(f"config.{key}={value!r} is not one of {', '.join(repr(c) for c in choices)}.{fix}")

  def integer(self, key: str, minimum: int, fix: str = "") -> None:
    if not self.has(key):
      return
    value = self.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
      self.add(f"config.{key}={value!r} must be an integer >= {minimum}.{fix}")
    elif value < minimum:
      self.add(f"config.{key}={value} must be >= {minimum}.{fix}")

  def number(
    self,
    key: str,
    low: float,
    high: float,
    low_open: bool = False,
    high_open: bool = False,
    fix: str = "",
  ) -> None:
    """``key`` in the interval from ``low`` to ``high`` (open ends as asked)."""
    if not self.has(key):
      return
    value = self.get(key)
    if value is None:
      return
    ok = (
      isinstance(value, (int, float))
      and not isinstance(value, bool)
      and math.isfinite(value)
      and (value > low if low_open else value >= low)
      and (value < high if high_open else value <= high)
    )
    if not ok:
      interval = (
        f"{'(' if low_open else '['}{low:g}, "
        f"{'inf' if high == math.inf else format(high, 'g')}{')' if high_open else ']'}"
      )
      self.add(f"config.{key}={value!r} must be in {interval}.{fix}")

  def boolean(self, key: str) -> None:
    if self.has(key) and not isinstance(self.get(key), bool):
      self.add(f"config.{key}={self.get(key)!r} must be True or False.")


_MISSING = object()
# Settings that resolve() takes from the teacher when they are None.
_TEACHER_RECIPE_KEYS = ("loss.kind", "loss.consistency_rate", "anomaly_map.levels")


def parse_category_values(spec: str, key: str) -> tuple[dict[str, int], list[str]]:
  """``'carpet:10,leather:10'`` -> ({'carpet': 10, 'leather': 10}, problems)."""
  values, problems = {}, []
  for item in filter(None, (s.strip() for s in str(spec or "").split(","))):
    category, sep, value = item.partition(":")
    if not sep or not category.strip() or not value.strip().isdigit():
      problems.append(
        f"Cannot parse config.{key}={spec!r} at {item!r}: expected "
        "'category:N,category:N' (e.g. 'carpet:10,leather:10')."
      )
      continue
    values[category.strip()] = int(value)
  return values, problems


def _method_class(name: str):
  """The method class of ``config.model.name`` (class attributes only; nothing is built)."""
  if name in ("sk_rd4ad", "rd4ad"):
    from skrd4ad_jax.methods.rd import ReverseDistillation

    return ReverseDistillation
  if name == "mrkd":
    from skrd4ad_jax.methods.mrkd.method import MRKD

    return MRKD
  from skrd4ad_jax.methods.rd_expert.method import RDExpert

  return RDExpert


def _check_model(c: _Checks) -> None:
  from skrd4ad_jax import methods
  from skrd4ad_jax.methods.base import DTYPES
  from skrd4ad_jax.teachers import registry

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


def _check_maps_and_loss(c: _Checks) -> None:
  from skrd4ad_jax import anomaly_map, interpolation, losses
  from skrd4ad_jax.teachers import registry

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


def _check_train(c: _Checks) -> None:
  c.integer("train.batch_size", 1, " E.g. --config.train.batch_size=16.")
  c.integer("train.num_steps", 0, " 0 = count epochs instead.")
  c.number("train.learning_rate", 0, math.inf, low_open=True)
  c.number("train.b1", 0, 1, high_open=True, fix=" Adam's beta1; official 0.5.")
  c.number("train.b2", 0, 1, high_open=True, fix=" Adam's beta2; official 0.999.")
  c.integer("train.log_every_steps", 1)
  c.integer("train.eval_every_epochs", 0, " 0 = only the final evaluation.")
  c.integer("train.checkpoint_every_epochs", 0, " 0 = only the final checkpoint.")
  c.boolean("train.cache_teacher_features")
  c.integer("train.seeds", 1, " 1 = one run per category.")
  # A step budget: epochs, or train.num_steps, or the method's own (RD with Expert).
  num_steps = c.get("train.num_steps", 0)
  fixed_budget = (isinstance(num_steps, int) and num_steps > 0) or c.get("model.name") == (
    "rd_expert"
  )
  untrained = (
    " trains nothing: the model would be evaluated untrained. Fix: set "
    "config.train.epochs >= 1, or config.train.num_steps > 0 for a fixed step budget."
  )
  if c.has("train.epochs") and not fixed_budget:
    epochs = c.get("train.epochs")
    if isinstance(epochs, int) and not isinstance(epochs, bool) and epochs < 1:
      c.add(f"config.train.epochs={epochs}{untrained}")
  if c.has("train.category_epochs"):
    values, problems = parse_category_values(
      c.get("train.category_epochs"), "train.category_epochs"
    )
    for p in problems:
      c.add(p)
    for category, epochs in values.items():
      if epochs < 1 and not fixed_budget:
        c.add(f"config.train.category_epochs gives {category!r} {epochs} epochs, which{untrained}")


def _check_data(c: _Checks) -> None:
  c.choice("data.source", DATA_SOURCES)
  if c.get("data.source") == "tfds":
    c.choice("data.dataset", TFDS_DATASETS, " These are the tfds builders in data_pipelines/.")
  if c.get("data.source") == "folder" and c.has("data.root") and not c.get("data.root"):
    c.add(
      "config.data.root is empty: point it to the folder that holds the category "
      "folders (<root>/<category>/train/good/), e.g. --config.data.root=/data/mvtec."
    )
  if c.has("data.image_size"):
    size = c.get("data.image_size")
    m = IMAGE_SIZE_MULTIPLE
    if isinstance(size, int) and not isinstance(size, bool) and (size < m or size % m):
      lower, upper = max(m, size // m * m), max(m, -(-size // m) * m)
      near = f"{lower}" if lower == upper else f"{lower} or {upper}"
      c.add(
        f"config.data.image_size={size} must be a positive multiple of {m} (the teacher's "
        f"stride-16 features are halved once more by the bottleneck); use {near}."
      )
  c.number("data.mask_threshold", 0, 1, low_open=True)
  c.number(
    "data.val_fraction",
    0,
    1,
    high_open=True,
    fix=" E.g. 0.1, or 0 for no validation split (then config.thresholds.source='test').",
  )
  c.integer("data.host_workers", 0, " 0 = automatic.")
  if c.has("data.categories"):
    categories = c.get("data.categories")
    if any(not isinstance(x, str) or not x.strip() for x in categories):
      c.add(f"config.data.categories={tuple(categories)!r} must be category names.")
    elif len(set(categories)) != len(categories):
      c.add(f"config.data.categories={tuple(categories)!r} names a category twice.")


def _check_eval_and_thresholds(c: _Checks) -> None:
  c.integer("eval.batch_size", 1, " E.g. --config.eval.batch_size=16.")
  c.number("eval.fpr_limit", 0, 1, low_open=True, fix=" AUPRO's FPR limit; standard 0.3.")
  c.boolean("eval.save_pictures")
  c.integer("eval.tensorboard_pictures", 0)
  c.boolean("eval.baseline")
  c.choice("eval.protocol", EVAL_PROTOCOLS)
  c.choice(
    "thresholds.source",
    THRESHOLD_SOURCES,
    " 'val' = held-out normal training images, 'test' = the test set (optimistic).",
  )
  c.number("thresholds.normal_quantile", 0, 1, low_open=True, high_open=True, fix=" E.g. 0.99.")
  val_fraction = c.get("data.val_fraction")
  if (
    c.get("thresholds.source") == "val"
    and isinstance(val_fraction, (int, float))
    and not val_fraction > 0
  ):
    c.add(
      "config.thresholds.source='val' needs config.data.val_fraction > 0 (normal "
      "training images held out to choose thresholds): set e.g. "
      "--config.data.val_fraction=0.1, or --config.thresholds.source=test."
    )


def _check_parallel(c: _Checks) -> None:
  from skrd4ad_jax.training import parallel

  c.integer("parallel.data_axis_size", 1, " 1 = categories only.")
  c.integer("parallel.slots_per_device", 0, " 0 = automatic.")
  c.number("parallel.device_memory_gb", 0, math.inf, fix=" 0 = what the device reports.")
  c.choice("parallel.category_loop", parallel.CATEGORY_LOOPS)
  data_axis = c.get("parallel.data_axis_size")
  if c.get("parallel.category_loop") == "unroll" and isinstance(data_axis, int) and data_axis > 1:
    c.add(
      f"config.parallel.category_loop='unroll' needs config.parallel.data_axis_size=1 "
      f"(got {data_axis}): use category_loop='vmap' to split batches over devices."
    )


def _check_methods(c: _Checks) -> None:
  from skrd4ad_jax import methods
  from skrd4ad_jax.methods.rd_expert import draem

  c.number("mrkd.mask_ratio", 0, 1, high_open=True, fix=" MRKD's feature-mask ratio; default 0.2.")
  c.boolean("mrkd.mask_at_test")
  c.boolean("rd_expert.gated")
  c.number("rd_expert.teacher_learning_rate", 0, math.inf, low_open=True)
  c.choice("rd_expert.foreground", draem.FOREGROUND_MODES)
  c.integer("rd_expert.num_steps", 1)
  c.integer("rd_expert.long_num_steps", 1)
  name = c.get("model.name")
  if c.get("train.cache_teacher_features") is True and name in methods.METHOD_NAMES:
    if not _method_class(name).supports_feature_cache:
      c.add(
        f"config.train.cache_teacher_features=True needs a method without input "
        f"augmentation (rd4ad, sk_rd4ad); {name} changes its inputs every step. "
        "Fix: --config.train.cache_teacher_features=False."
      )


_SECTIONS: tuple[Callable[[_Checks], None], ...] = (
  _check_model,
  _check_maps_and_loss,
  _check_train,
  _check_data,
  _check_eval_and_thresholds,
  _check_parallel,
  _check_methods,
)


def problems(config: ml_collections.ConfigDict) -> list[str]:
  """Every problem of ``config`` (resolved here: teacher defaults filled in); [] if none.

  Args:
    config: a run's config, e.g. ``FLAGS.config`` or ``load_config(...)``.

  Returns:
    One sentence per problem, each naming ``config.<field>``, the value and the fix.
  """
  from skrd4ad_jax import config as config_lib
  from skrd4ad_jax.teachers import registry

  base = defaults.get_config()
  known = list(flat_keys(base))
  found = _compare_with_defaults(config, base, known)
  teacher = config.get("model", {}).get("teacher") if "model" in config else None
  if teacher in registry.TEACHERS:
    config = config_lib.resolve(config)  # What the run uses: the teacher's recipe filled in.
  # A mistyped field is reported once, by type, not again by range.
  checks = _Checks(config, skip={key for key, _ in found})
  for section in _SECTIONS:
    section(checks)
  return [problem for _, problem in found] + checks.problems


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises one :class:`ConfigError` listing every problem of ``config``.

  Args:
    config: a run's config.

  Raises:
    ConfigError: ``.problems`` holds one sentence per problem.
  """
  found = problems(config)
  if found:
    raise ConfigError(found)
