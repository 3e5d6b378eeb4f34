"""Result tables: ours per category and mean, beside the published numbers.

``write_results_table`` writes ``results.csv`` (raw values, metrics in
``[0, 1]``, one row per category plus a ``mean`` row) and ``results.md`` (a
markdown table in percent with the published RD4AD / SK-RD4AD / MRKD numbers
beside ours, followed by notes and the sources of the published numbers).

The published numbers live in the package data file ``published_results.csv``
(columns ``dataset, method, category, image_auroc, pixel_auroc, pixel_aupro,
aupro_protocol, source, note``; values in percent, empty when not published).
Published AUPROs of the RD4AD family are per-image averages (``aupro_protocol``
``rd4ad``), so they sit beside our ``pixel_aupro_rd4ad``, not beside the
pooled MVTec/anomalib ``pixel_aupro``.

Why one module of this size: one results table, written three ways (CSV, per-
seed CSV, Markdown beside the published numbers), from one set of column rules;
splitting it would repeat those rules.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
import csv
import math
import numbers
import os
import re
from typing import Any

import numpy as np

from skrd4ad_jax import faults

PUBLISHED_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "published_results.csv")

# Our dataset names are the csv's; the aliases are what users type.
DATASET_ALIASES = {
  "mvtec": "mvtec_ad",
  "mvtecad": "mvtec_ad",
  "mvtec_ad": "mvtec_ad",
  "visa": "visa",
  "vad": "vad",
  "valeo": "vad",
  "valeo_ad": "vad",
}
METHOD_DISPLAY_NAMES = {
  "rd4ad": "RD4AD",
  "sk_rd4ad": "SK-RD4AD",
  "mrkd": "MRKD",
  "rd_plus_plus": "RD++",
  "anomalib_rd": "anomalib RD",
}
# Published methods shown beside ours by default (those with per-category tables
# for the RD4AD architecture family).
DEFAULT_METHODS = ("rd4ad", "sk_rd4ad", "mrkd")
PUBLISHED_METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro")
# Which of our columns a published AUPRO is comparable with, by protocol.
# "unknown" (VisA, SK-RD4AD README) comes from RD4AD-family code, hence rd4ad.
AUPRO_COLUMN_BY_PROTOCOL = {
  "rd4ad": "pixel_aupro_rd4ad",
  "unknown": "pixel_aupro_rd4ad",
  "": "pixel_aupro_rd4ad",
  "mvtec": "pixel_aupro",
  "pooled": "pixel_aupro",
  "anomalib": "pixel_aupro",
}
AUPRO_PROTOCOL_TEXT = {
  "rd4ad": "per-image averaged AUPRO (RD4AD family), shown beside pixel_aupro_rd4ad",
  "unknown": "AUPRO protocol not documented, shown beside pixel_aupro_rd4ad",
  "mvtec": "pooled AUPRO (FPR <= 0.3), shown beside pixel_aupro",
  "pooled": "pooled AUPRO (FPR <= 0.3), shown beside pixel_aupro",
  "anomalib": "pooled AUPRO (FPR <= 0.3), shown beside pixel_aupro",
}

CATEGORY = "category"
MEAN = "mean"
METRIC_COLUMNS = (
  "image_auroc",
  "pixel_auroc",
  "pixel_aupro",
  "pixel_aupro_rd4ad",
  "image_f1max",
  "pixel_ap",
)
TIMING_COLUMNS = ("train_seconds", "train_images_per_second")
STD_SUFFIX = "_std"
SELECTED_SUFFIX = "_test_selected"
# Per-seed columns that are not averaged over seeds.
SEED_COLUMNS = ("seed",)
MISSING = "\u2013"  # En dash, for values that do not exist (NaN, unpublished).
_PERCENT_PATTERN = re.compile(r"(auroc|aupro|f1|precision|recall|accuracy|iou|dice|(^|_)ap($|_))")


def canonical_dataset(dataset: str) -> str:
  """Returns the csv's name for ``dataset`` (e.g. 'mvtec' -> 'mvtec_ad').

  Args:
    dataset: a dataset name, case and '-' / '_' insensitive.

  Returns:
    The canonical name, or the normalised input when it has no alias.
  """
  key = dataset.strip().lower().replace("-", "_").replace(" ", "_")
  return DATASET_ALIASES.get(key, key)


def _read_records(csv_path: str | None = None) -> list[dict[str, str]]:
  with open(csv_path or PUBLISHED_CSV, newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


def published_datasets(csv_path: str | None = None) -> list[str]:
  """Lists the datasets that have published numbers in the csv."""
  return sorted({r["dataset"] for r in _read_records(csv_path)})


def _dataset_records(dataset: str, csv_path: str | None) -> list[dict[str, str]]:
  name = canonical_dataset(dataset)
  records = _read_records(csv_path)
  selected = [r for r in records if r["dataset"] == name]
  if not selected:
    known = sorted({r["dataset"] for r in records})
    raise ValueError(f"No published numbers for dataset {dataset!r}; the csv has {known}.")
  return selected


def load_published(
  dataset: str, csv_path: str | None = None
) -> dict[str, dict[str, dict[str, float]]]:
  """Reads the published numbers of one dataset.

  Args:
    dataset: 'mvtec_ad', 'visa' or 'vad' (aliases such as 'mvtec' work).
    csv_path: another csv with the same columns; defaults to the package's.

  Returns:
    ``{method: {category: {metric: value}}}`` with values in percent as
    published; metrics that were not published are absent. Averages are under
    the category ``'mean'``.

  Raises:
    ValueError: when the csv has no numbers for ``dataset``.
  """
  published: dict[str, dict[str, dict[str, float]]] = {}
  for record in _dataset_records(dataset, csv_path):
    metrics = {m: float(record[m]) for m in PUBLISHED_METRICS if (record.get(m) or "").strip()}
    published.setdefault(record["method"], {})[record["category"]] = metrics
  return published


def _is_number(value: Any) -> bool:
  return value is None or isinstance(value, numbers.Real) and not isinstance(value, bool)


def _as_float(value: Any) -> float:
  return math.nan if value is None else float(value)


def _is_missing(value: Any) -> bool:
  return value is None or (
    isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isnan(float(value))
  )


def is_percent_metric(column: str) -> bool:
  """Whether a column holds a score in [0, 1] shown in percent (AUROC...)."""
  return bool(_PERCENT_PATTERN.search(column))


def result_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
  """Orders the columns: category, metrics, extra keys (first seen), timing."""
  seen: list[str] = []
  for row in rows:
    for key in row:
      if key not in seen:
        seen.append(key)
  metrics = [c for c in METRIC_COLUMNS if c in seen]
  timing = [c for c in TIMING_COLUMNS if c in seen]
  extra = [c for c in seen if c != CATEGORY and c not in metrics and c not in timing]
  return [CATEGORY] + metrics + extra + timing


def mean_row(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Averages the numeric columns over categories (``np.mean``).

  A column is averaged when every row holds a number (or None, read as NaN)
  there; NaN propagates, so a metric missing for one category has no mean.
  Other columns (strings, e.g. a threshold rule) are None in the mean row.

  Args:
    rows: per-category dicts.

  Returns:
    A dict with ``category='mean'`` and one value per column.
  """
  mean: dict[str, Any] = {CATEGORY: MEAN}
  for column in result_columns(rows)[1:]:
    values = [row.get(column) for row in rows]
    if all(_is_number(v) for v in values):
      mean[column] = float(np.mean([_as_float(v) for v in values]))
    else:
      mean[column] = None
  return mean


def _check_rows(rows: Sequence[Mapping[str, Any]]) -> None:
  if not rows:
    raise ValueError("No result rows to write.")
  for row in rows:
    if CATEGORY not in row:
      raise ValueError(f"Every result row needs a 'category' key: {dict(row)}.")
    if row[CATEGORY] == MEAN:
      raise ValueError("A category may not be named 'mean'; the mean row is added by the writer.")


def _csv_value(value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, numbers.Real) and not isinstance(value, bool):
    return repr(float(value)) if isinstance(value, float) else str(value)
  return str(value)


def _format_ours(column: str, value: Any) -> str:
  if _is_missing(value):
    return MISSING
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    return str(value).replace("|", "\\|")
  if is_percent_metric(column):
    return f"{100.0 * float(value):.1f}"
  if column in TIMING_COLUMNS:
    return f"{float(value):.1f}"
  if isinstance(value, numbers.Integral):
    return str(value)
  return f"{float(value):.4g}"


def _published_columns(dataset: str | None, methods: Sequence[str], csv_path: str | None):
  """Published columns to add: {our column: [(header, method, metric)]}."""
  if dataset is None:
    return {}, {}, []
  name = canonical_dataset(dataset)
  if name not in published_datasets(csv_path):
    return {}, {}, []
  records = _dataset_records(name, csv_path)
  published = load_published(name, csv_path)
  protocols = {
    r["method"]: (r.get("aupro_protocol") or "").strip()
    for r in records
    if (r.get("pixel_aupro") or "").strip()
  }
  columns: dict[str, list[tuple[str, str, str]]] = {}
  for method in methods:
    if method not in published:
      continue
    display = METHOD_DISPLAY_NAMES.get(method, method)
    for metric in PUBLISHED_METRICS:
      ours = metric
      if metric == "pixel_aupro":
        ours = AUPRO_COLUMN_BY_PROTOCOL.get(protocols.get(method, ""), "pixel_aupro_rd4ad")
      if any(metric in values for values in published[method].values()):
        header = f"{ours} ({display} published)"
        columns.setdefault(ours, []).append((header, method, metric))
  return columns, published, [r for r in records if r["method"] in methods]


def _published_value(
  published, method: str, category: str, metric: str, categories: Sequence[str] = ()
) -> float | None:
  """One published number; for 'mean', the average over ``categories``.

  The published average is used when ``categories`` cover every category of
  the dataset; for a subset of categories the published per-category numbers
  are averaged instead (None when one is missing), so that both means run
  over the same categories.
  """
  own = published.get(method, {})
  if category != MEAN:
    return own.get(category, {}).get(metric)
  dataset_categories = {c for per_method in published.values() for c in per_method if c != MEAN}
  if dataset_categories <= set(categories):
    value = own.get(MEAN, {}).get(metric)
    if value is not None or len(dataset_categories) > 1:
      return value
  values = [own.get(c, {}).get(metric) for c in categories]
  if not values or any(v is None for v in values):
    return None
  return float(np.mean(values))


def _source_notes(records: Sequence[Mapping[str, str]], methods: Sequence[str]) -> list[str]:
  notes = []
  for method in methods:
    own = [r for r in records if r["method"] == method]
    if not own:
      continue
    sources = list(dict.fromkeys(r["source"] for r in own if r["source"]))
    extra = list(dict.fromkeys(r["note"] for r in own if r.get("note")))
    protocols = list(
      dict.fromkeys(
        r["aupro_protocol"]
        for r in own
        if (r.get("pixel_aupro") or "").strip() and r.get("aupro_protocol")
      )
    )
    text = f"{METHOD_DISPLAY_NAMES.get(method, method)}: " + "; ".join(sources)
    for protocol in protocols:
      text += f"; AUPRO: {AUPRO_PROTOCOL_TEXT.get(protocol, protocol)}"
    if extra:
      text += "; " + "; ".join(extra)
    notes.append(text + ".")
  return notes


def aggregate_seeds(
  seed_rows: Sequence[Mapping[str, Any]], categories: Sequence[str] | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """Per-category mean and spread over seeds, and the overall mean row.

  Args:
    seed_rows: one row per (category, seed) job, with ``category`` and the
      same numeric columns (a ``seed`` column is dropped).
    categories: the order of the categories (default: first seen).

  Returns:
    ``(rows, mean)``: one row per category with the mean over its seeds of
    every numeric column and, when some category has several seeds,
    ``<column>_std`` (sample standard deviation over seeds) for every metric
    and ``n_seeds``; and the mean row, whose metrics are the mean over
    categories and whose ``_std`` is the standard deviation over seeds of the
    per-seed category means (the spread of the whole benchmark's mean).
    With one seed per category the rows are the input rows and the mean row
    is ``mean_row``'s.
  """
  if categories is None:
    categories = list(dict.fromkeys(str(r[CATEGORY]) for r in seed_rows))
  groups = {c: [r for r in seed_rows if r[CATEGORY] == c] for c in categories}
  groups = {c: g for c, g in groups.items() if g}
  strip = [{k: v for k, v in r.items() if k not in SEED_COLUMNS} for r in seed_rows]
  if all(len(g) == 1 for g in groups.values()):
    rows = [next(r for r in strip if r[CATEGORY] == c) for c in groups]
    return rows, mean_row(rows)
  columns = result_columns(strip)[1:]
  numeric = [c for c in columns if all(_is_number(r.get(c)) for r in strip)]
  spread = [c for c in numeric if c not in TIMING_COLUMNS]
  rows = []
  for category, group in groups.items():
    row: dict[str, Any] = {CATEGORY: category}
    for column in columns:
      values = [_as_float(r.get(column)) for r in group]
      if column in numeric:
        row[column] = float(np.mean(values))
        if column in spread:
          row[column + STD_SUFFIX] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
      else:
        row[column] = group[0].get(column)
    row["n_seeds"] = len(group)
    rows.append(row)
  mean: dict[str, Any] = {CATEGORY: MEAN}
  for column in columns:
    mean[column] = float(np.mean([r[column] for r in rows])) if column in numeric else None
  num_seeds = min(len(g) for g in groups.values())
  for column in spread:
    per_seed = [
      np.mean([_as_float(g[k].get(column)) for g in groups.values()]) for k in range(num_seeds)
    ]
    mean[column + STD_SUFFIX] = float(np.std(per_seed, ddof=1)) if num_seeds > 1 else 0.0
  mean["n_seeds"] = num_seeds
  return rows, mean


def write_rows_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> str:
  """Writes ``rows`` (e.g. every seed's row) as a csv with ``result_columns``' order."""
  columns = result_columns(rows)
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
      writer.writerow([_csv_value(row.get(c)) for c in columns])
  return os.fspath(path)


def _shown_columns(columns: Sequence[str]) -> list[str]:
  """Columns of the markdown / console tables: ``X_std`` is shown inside ``X``'s cell."""
  return [c for c in columns if not (c.endswith(STD_SUFFIX) and c[: -len(STD_SUFFIX)] in columns)]


def _header(column: str) -> str:
  if column.endswith(SELECTED_SUFFIX):
    return f"{column[: -len(SELECTED_SUFFIX)]} (best test epoch: test-selected, optimistic)"
  return column


def _cell(column: str, row: Mapping[str, Any]) -> str:
  text = _format_ours(column, row.get(column))
  std = row.get(column + STD_SUFFIX)
  if text != MISSING and std is not None and not _is_missing(std):
    text += " ± " + _format_ours(column, std)
  return text


def write_results_table(
  rows: Sequence[Mapping[str, Any]],
  out_dir: str | os.PathLike,
  dataset: str | None = None,
  notes: Iterable[str] = (),
  methods: Sequence[str] = DEFAULT_METHODS,
  csv_path: str | None = None,
  mean: Mapping[str, Any] | None = None,
) -> tuple[str, str]:
  """Writes ``results.csv`` and ``results.md`` for one dataset.

  Args:
    rows: one dict per category with ``category`` and our metrics in
      ``[0, 1]`` (``image_auroc``, ``pixel_auroc``, ``pixel_aupro``,
      ``pixel_aupro_rd4ad``, ``image_f1max``, ``pixel_ap``), timing
      (``train_seconds``, ``train_images_per_second``) and any extra keys,
      which are kept (columns whose name says AUROC/AUPRO/F1/precision/recall/
      AP are shown in percent). NaN or None means 'not available'
      (pixel metrics of image-level datasets) and is shown as '–'.
    out_dir: directory to write to; created when missing.
    dataset: 'mvtec_ad', 'visa', 'vad' (or an alias) to add the published
      numbers beside ours; None or a dataset without published numbers (a
      user's folder) gives our columns only.
    notes: lines listed under the table (AUPRO protocol, epoch selection,
      threshold source...). The sources of the published numbers are added.
    methods: published methods to show (keys of ``METHOD_DISPLAY_NAMES``);
      a method's metric column appears only where the csv has a value.
    csv_path: published numbers to use instead of the package's csv.
    mean: the mean row (default: ``mean_row(rows)``); ``aggregate_seeds``
      gives one with the spread over seeds. Columns ``X_std`` are shown as
      ``X ± std`` in the markdown table.

  Returns:
    ``(csv_path, md_path)`` of the written files.
  """
  _check_rows(rows)
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  columns = result_columns(rows)
  table = [dict(row) for row in rows] + [dict(mean) if mean is not None else mean_row(rows)]
  categories = [str(row[CATEGORY]) for row in rows]

  results_csv = os.path.join(out_dir, "results.csv")
  faults.point("results_csv", path=results_csv)
  with open(results_csv, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(columns)
    for row in table:
      writer.writerow([_csv_value(row.get(c)) for c in columns])

  published_columns, published, records = _published_columns(dataset, methods, csv_path)
  headers: list[str] = []
  cells: list[list[str]] = [[] for _ in table]
  for column in _shown_columns(columns):
    headers.append(_header(column))
    for i, row in enumerate(table):
      if column == CATEGORY:
        text = str(row[CATEGORY]).replace("|", "\\|")
        cells[i].append(f"**{text}**" if i == len(table) - 1 else text)
      else:
        cells[i].append(_cell(column, row))
    for header, method, metric in published_columns.get(column, []):
      headers.append(header)
      for i, row in enumerate(table):
        value = _published_value(published, method, str(row[CATEGORY]), metric, categories)
        cells[i].append(MISSING if value is None else f"{value:.1f}")
  # Published numbers for metrics we did not compute still deserve a column.
  for column, entries in published_columns.items():
    if column in columns:
      continue
    for header, method, metric in entries:
      headers.append(header)
      for i, row in enumerate(table):
        value = _published_value(published, method, str(row[CATEGORY]), metric, categories)
        cells[i].append(MISSING if value is None else f"{value:.1f}")

  title = canonical_dataset(dataset) if dataset else "results"
  lines = [
    f"# Results: {title}",
    "",
    "Metrics in percent (1 decimal); timings in seconds and images per "
    f"second; {MISSING} = not available or not published.",
    "",
    "| " + " | ".join(headers) + " |",
    "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|",
  ]
  lines += ["| " + " | ".join(r) + " |" for r in cells]
  notes = list(notes)
  if notes:
    lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
  source_notes = _source_notes(records, methods) if published_columns else []
  if source_notes:
    dataset_categories = {c for per_method in published.values() for c in per_method if c != MEAN}
    if not dataset_categories <= set(categories):
      source_notes.append(
        f"The published means in the mean row average the published "
        f"per-category numbers over the same {len(categories)} categories "
        f"as ours ({MISSING} where one is unpublished), not the papers' "
        f"averages over all {len(dataset_categories)}."
      )
  if source_notes:
    lines += ["", "Published numbers:", ""] + [f"- {n}" for n in source_notes]
  results_md = os.path.join(out_dir, "results.md")
  with open(results_md, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return results_csv, results_md


def format_console_table(
  rows: Sequence[Mapping[str, Any]],
  dataset: str | None = None,
  columns: Sequence[str] | None = None,
  methods: Sequence[str] = DEFAULT_METHODS,
  mean: Mapping[str, Any] | None = None,
) -> str:
  """Formats the per-category results and their mean as a fixed-width table.

  Args:
    rows: per-category dicts as for ``write_results_table``.
    dataset: when it has published numbers, one line per published method
      with its published mean is added under ours.
    columns: columns to show (default: all numeric ones of the rows).
    methods: published methods to list when ``dataset`` is given.
    mean: the mean row (default: ``mean_row(rows)``); ``X_std`` columns are
      shown as ``X ± std``.

  Returns:
    The table as text, metrics in percent, '-' for missing values.
  """
  _check_rows(rows)
  mean = dict(mean) if mean is not None else mean_row(rows)
  if columns is None:
    columns = [c for c in result_columns(rows)[1:] if mean.get(c) is not None]
  columns = [c for c in _shown_columns(columns) if c != CATEGORY]

  def cell(column, row):
    text = _cell(column, row)
    return "-" if text == MISSING else text

  body = [[str(r[CATEGORY])] + [cell(c, r) for c in columns] for r in rows]
  footer = [[MEAN] + [cell(c, mean) for c in columns]]
  if dataset is not None:
    published_columns, published, _ = _published_columns(dataset, methods, None)
    for method in methods:
      entries = {
        ours: metric
        for ours, items in published_columns.items()
        for _, m, metric in items
        if m == method
      }
      if not entries:
        continue
      line = [f"{METHOD_DISPLAY_NAMES.get(method, method)} published"]
      for column in columns:
        value = (
          _published_value(
            published, method, MEAN, entries[column], [str(r[CATEGORY]) for r in rows]
          )
          if column in entries
          else None
        )
        line.append("-" if value is None else f"{value:.1f}")
      footer.append(line)

  header = [CATEGORY] + list(columns)
  widths = [max(len(r[i]) for r in [header] + body + footer) for i in range(len(header))]

  def render(values):
    first = values[0].ljust(widths[0])
    rest = [v.rjust(w) for v, w in zip(values[1:], widths[1:])]
    return "  ".join([first] + rest).rstrip()

  rule = "-" * len(render(header))
  lines = [render(header), rule] + [render(r) for r in body] + [rule]
  lines += [render(r) for r in footer]
  return "\n".join(lines)
