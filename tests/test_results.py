"""Tests for skrd4ad_jax.results (result tables beside published numbers)."""

import csv
import math
import os

import numpy as np
import pytest

from skrd4ad_jax.evaluation import results

METRICS = results.METRIC_COLUMNS


def _csv_rows(path):
  with open(path, newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


def _reference_record(dataset, method, category):
  """Reads one row of the package csv independently of the module."""
  for record in _csv_rows(results.PUBLISHED_CSV):
    if (record["dataset"], record["method"], record["category"]) == (dataset, method, category):
      return record
  raise KeyError((dataset, method, category))


def _rows(categories, seed=0, **extra):
  rng = np.random.default_rng(seed)
  rows = []
  for category in categories:
    row = {"category": category}
    row.update({m: float(rng.uniform(0.8, 1.0)) for m in METRICS})
    row["train_seconds"] = float(rng.uniform(100, 200))
    row["train_images_per_second"] = float(rng.uniform(20, 40))
    row.update(extra)
    rows.append(row)
  return rows


def _md_table(md_path):
  """The markdown table as a list of {header: cell} dicts."""
  with open(md_path, encoding="utf-8") as f:
    lines = [l for l in f.read().splitlines() if l.startswith("|")]
  split = lambda l: [c.strip() for c in l.strip("|").split("|")]
  headers = split(lines[0])
  return [dict(zip(headers, split(l))) for l in lines[2:]]


class TestLoadPublished:
  def test_mvtec_carpet_matches_the_csv(self):
    published = results.load_published("mvtec_ad")
    for method in ("rd4ad", "mrkd", "sk_rd4ad"):
      record = _reference_record("mvtec_ad", method, "carpet")
      for metric in ("image_auroc", "pixel_auroc", "pixel_aupro"):
        got = published[method]["carpet"].get(metric)
        if record[metric]:
          assert got == pytest.approx(float(record[metric]))
        else:
          assert got is None
    assert published["rd4ad"]["carpet"] == {
      "image_auroc": 98.9,
      "pixel_auroc": 98.9,
      "pixel_aupro": 97.0,
    }
    assert "image_auroc" not in published["sk_rd4ad"]["carpet"]

  def test_aliases_and_datasets(self):
    assert results.load_published("mvtec") == results.load_published("MVTec-AD")
    visa = results.load_published("visa")
    assert len([c for c in visa["sk_rd4ad"] if c != "mean"]) == 12
    assert visa["rd4ad"]["pcb1"]["pixel_aupro"] == pytest.approx(43.2)
    assert results.load_published("vad")["sk_rd4ad"]["vad"] == {"image_auroc": 87.0}

  def test_unknown_dataset_names_the_known_ones(self):
    with pytest.raises(ValueError, match="mvtec_ad"):
      results.load_published("my_factory")


class TestWriteResultsTable:
  def test_files_rows_and_mean(self, tmp_path):
    rows = _rows(["carpet", "bottle", "zipper"], image_threshold=0.0123, threshold_rule="f1")
    csv_path, md_path = results.write_results_table(
      rows,
      tmp_path / "out",
      dataset="mvtec_ad",
      notes=["last-epoch metrics, no test-set selection"],
    )
    assert os.path.isfile(csv_path) and os.path.isfile(md_path)
    written = _csv_rows(csv_path)
    assert [r["category"] for r in written] == ["carpet", "bottle", "zipper", "mean"]
    # Extra keys are kept.
    assert written[0]["image_threshold"] == "0.0123"
    assert written[0]["threshold_rule"] == "f1"
    assert written[-1]["threshold_rule"] == ""
    for column in METRICS + ("train_seconds", "train_images_per_second", "image_threshold"):
      for row, out in zip(rows, written):
        assert float(out[column]) == row[column]
      assert float(written[-1][column]) == pytest.approx(
        np.mean([r[column] for r in rows]), rel=1e-12
      )

  def test_markdown_percent_and_published(self, tmp_path):
    rows = _rows(["carpet", "bottle", "zipper"])
    _, md_path = results.write_results_table(
      rows, tmp_path, dataset="mvtec_ad", notes=["threshold: F1 on test"]
    )
    table = _md_table(md_path)
    assert [r["category"] for r in table] == ["carpet", "bottle", "zipper", "**mean**"]
    assert table[0]["image_auroc"] == f"{100 * rows[0]['image_auroc']:.1f}"
    assert table[0]["train_seconds"] == f"{rows[0]['train_seconds']:.1f}"
    carpet = _reference_record("mvtec_ad", "rd4ad", "carpet")
    assert table[0]["pixel_auroc (RD4AD published)"] == (f"{float(carpet['pixel_auroc']):.1f}")
    # Published AUPROs are per-image averages: beside pixel_aupro_rd4ad.
    assert table[0]["pixel_aupro_rd4ad (RD4AD published)"] == (
      f"{float(carpet['pixel_aupro']):.1f}"
    )
    assert "pixel_aupro (RD4AD published)" not in table[0]
    assert table[0]["image_auroc (MRKD published)"] == "100.0"
    # SK-RD4AD published no zipper numbers and no image AUROC at all.
    assert table[2]["pixel_auroc (SK-RD4AD published)"] == results.MISSING
    assert "image_auroc (SK-RD4AD published)" not in table[0]
    # Three of 15 categories: the published mean runs over the same three.
    expected = np.mean(
      [
        float(_reference_record("mvtec_ad", "rd4ad", c)["image_auroc"])
        for c in ("carpet", "bottle", "zipper")
      ]
    )
    assert table[3]["image_auroc (RD4AD published)"] == f"{expected:.1f}"
    assert table[3]["pixel_auroc (SK-RD4AD published)"] == results.MISSING
    text = open(md_path, encoding="utf-8").read()
    assert "- threshold: F1 on test" in text
    assert "best epoch selected on the test set" in text

  def test_full_dataset_uses_the_published_average(self, tmp_path):
    categories = [c for c in results.load_published("mvtec_ad")["rd4ad"] if c != "mean"]
    _, md_path = results.write_results_table(_rows(categories), tmp_path, dataset="mvtec")
    mean = _md_table(md_path)[-1]
    record = _reference_record("mvtec_ad", "sk_rd4ad", "mean")
    assert mean["pixel_auroc (SK-RD4AD published)"] == (f"{float(record['pixel_auroc']):.1f}")

  def test_nan_image_level_dataset(self, tmp_path):
    rows = _rows(["vad"])
    for metric in ("pixel_auroc", "pixel_aupro", "pixel_aupro_rd4ad", "pixel_ap"):
      rows[0][metric] = math.nan
    csv_path, md_path = results.write_results_table(rows, tmp_path, dataset="vad")
    written = _csv_rows(csv_path)
    assert math.isnan(float(written[-1]["pixel_auroc"]))
    table = _md_table(md_path)
    for row in table:
      assert row["pixel_auroc"] == results.MISSING
      assert row["pixel_ap"] == results.MISSING
      assert row["image_auroc (SK-RD4AD published)"] == "87.0"
      assert row["image_auroc (RD4AD published)"] == "84.5"

  def test_custom_dataset_has_no_published_columns(self, tmp_path):
    _, md_path = results.write_results_table(_rows(["screws"]), tmp_path, dataset="my_factory")
    assert not any("published" in h for h in _md_table(md_path)[0])
    _, md_path = results.write_results_table(_rows(["screws"]), tmp_path)
    assert not any("published" in h for h in _md_table(md_path)[0])

  def test_rejects_a_category_named_mean(self, tmp_path):
    with pytest.raises(ValueError, match="mean"):
      results.write_results_table(_rows(["mean"]), tmp_path)


def test_mean_row_propagates_nan():
  rows = _rows(["a", "b"])
  rows[1]["pixel_ap"] = math.nan
  mean = results.mean_row(rows)
  assert math.isnan(mean["pixel_ap"])
  assert mean["image_auroc"] == np.mean([r["image_auroc"] for r in rows])


def test_format_console_table():
  rows = _rows(["carpet", "bottle"])
  rows[0]["pixel_ap"] = math.nan
  text = results.format_console_table(rows, dataset="mvtec_ad")
  lines = text.splitlines()
  assert lines[0].split()[:3] == ["category", "image_auroc", "pixel_auroc"]
  carpet = next(l for l in lines if l.startswith("carpet")).split()
  assert carpet[1] == f"{100 * rows[0]['image_auroc']:.1f}"
  assert "-" in carpet  # NaN pixel_ap.
  assert any(l.startswith("mean") for l in lines)
  assert any(l.startswith("RD4AD published") for l in lines)
