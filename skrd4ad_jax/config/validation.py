"""Config checks that need nothing above the configuration layer, and ``ConfigError``.

``problems(config)`` compares a config with ``defaults.get_config()`` (unknown
keys, with a "did you mean") and checks the types, ranges and combinations of
the fields this layer knows (training budget, data, evaluation, thresholds, slot
counts, the per-category strings). The checks that need the registries of
methods, teachers, maps and the loop (``training/preflight.py``) run as further
``sections`` of the same pass, so a run reports every problem at once: one
:class:`ConfigError` whose ``problems`` each name the field, the value and the
fix. Nothing here imports JAX or TensorFlow.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
import difflib
import math
from typing import Any

import ml_collections

from skrd4ad_jax.config import defaults

DATA_SOURCES = ("folder", "tfds", "demo")
TFDS_DATASETS = ("mvtec_ad", "visa", "vad")
THRESHOLD_SOURCES = ("val", "test")
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


class Checks:
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


def _check_train(c: Checks) -> None:
  c.integer("train.batch_size", 1, " E.g. --config.train.batch_size=16.")
  c.integer("train.num_steps", 0, " 0 = count epochs instead.")
  c.number("train.learning_rate", 0, math.inf, low_open=True)
  c.number("train.b1", 0, 1, high_open=True, fix=" Adam's beta1; official 0.5.")
  c.number("train.b2", 0, 1, high_open=True, fix=" Adam's beta2; official 0.999.")
  c.integer("train.log_every_steps", 1)
  c.boolean("train.tensorboard")
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


def _check_data(c: Checks) -> None:
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


def _check_eval_and_thresholds(c: Checks) -> None:
  c.integer("eval.batch_size", 1, " E.g. --config.eval.batch_size=16.")
  c.number("eval.fpr_limit", 0, 1, low_open=True, fix=" AUPRO's FPR limit; standard 0.3.")
  c.boolean("eval.save_pictures")
  c.integer("eval.tensorboard_pictures", 0)
  c.boolean("eval.baseline")
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


def _check_parallel_counts(c: Checks) -> None:
  c.integer("parallel.data_axis_size", 1, " 1 = categories only.")
  c.integer("parallel.slots_per_device", 0, " 0 = automatic.")
  c.number("parallel.device_memory_gb", 0, math.inf, fix=" 0 = what the device reports.")


# The checks that need nothing above the configuration layer; the entry points
# run them with the registries' checks (``training/preflight.py``).
BASE_SECTIONS: tuple[Callable[[Checks], None], ...] = (
  _check_train,
  _check_data,
  _check_eval_and_thresholds,
  _check_parallel_counts,
)


def problems(
  config: ml_collections.ConfigDict,
  sections: Sequence[Callable[[Checks], None]] = BASE_SECTIONS,
  resolve: Callable[[ml_collections.ConfigDict], ml_collections.ConfigDict] | None = None,
) -> list[str]:
  """Every problem of ``config`` that ``sections`` find; [] if none.

  Args:
    config: a run's config, e.g. ``FLAGS.config`` or ``load_config(...)``.
    sections: the checks to run after the keys and types (``BASE_SECTIONS``
      here; ``preflight.SECTIONS`` adds those of methods, teachers and maps).
    resolve: fills the settings left to the teacher before the sections run
      (what the run uses), when the caller can.

  Returns:
    One sentence per problem, each naming ``config.<field>``, the value and the fix.
  """
  base = defaults.get_config()
  known = list(flat_keys(base))
  found = _compare_with_defaults(config, base, known)
  if resolve is not None:
    config = resolve(config)
  # A mistyped field is reported once, by type, not again by range.
  checks = Checks(config, skip={key for key, _ in found})
  for section in sections:
    section(checks)
  return [problem for _, problem in found] + checks.problems
