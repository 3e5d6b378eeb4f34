"""Inference speed: JAX predict vs the ONNX export in onnxruntime vs the SavedModel in TensorFlow.

  python scripts/benchmark_inference.py                       # demo and WRN50-2, all formats
  python scripts/benchmark_inference.py --presets=wrn50 --formats=jax --batch=64   # e.g. a GPU

For each preset a model with random weights (speed does not depend on them) is
built, exported in each format, and timed on uint8 images of the training size:
batch-1 latency (median of ``--repeats`` calls) and throughput at ``--batch``
(images/s over ``--repeats`` calls), after one warm-up call each. Every format
runs the whole model: ImageNet normalisation, teacher, student, anomaly map,
score. Prints a table and writes ``--json``.

Presets: ``demo`` (configs/demo.py: SK-RD4AD, VGG16-HED, 128 px) and ``wrn50``
(configs/mvtec.py: SK-RD4AD, WideResNet-50-2, 256 px).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from skrd4ad_jax import methods, teachers  # noqa: E402
from skrd4ad_jax.config import load_config  # noqa: E402
from skrd4ad_jax.export import exporter  # noqa: E402
from skrd4ad_jax.export import run as runner  # noqa: E402
from skrd4ad_jax.export import spec as spec_lib  # noqa: E402

PRESETS = {"demo": "configs/demo.py", "wrn50": "configs/mvtec.py"}
FORMATS = ("jax", "onnx", "saved_model")


def random_predictor(preset: str):
  """A stand-in for ``predict.Predictor`` with random weights (what the export reads)."""
  config = load_config(os.path.join(REPO, PRESETS[preset]))
  config.model.teacher_weights = "random"
  method = methods.build_method(config)
  size = int(config.data.image_size)
  teacher_vars = teachers.load_teacher_variables(
    config.model.teacher, "random", image_size=size, seed=0
  )
  rng = jax.random.PRNGKey(0)
  state = method.init(rng, teacher_vars)
  nan = float("nan")
  thresholds = {k: nan for k in spec_lib.THRESHOLD_INPUTS}
  return types.SimpleNamespace(
    config=config,
    method=method,
    state=state,
    teacher_vars=teacher_vars,
    rng=rng,
    image_size=size,
    thresholds=thresholds,
    _eval_step=jax.jit(method.anomaly_maps),
  )


def timed(fn, images: np.ndarray, repeats: int) -> list[float]:
  fn(images)  # warm-up (compilation, session set-up)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn(images)
    times.append(time.perf_counter() - t0)
  return times


def bench_preset(preset: str, formats, batch: int, repeats: int, workdir: str, log) -> list[dict]:
  predictor = random_predictor(preset)
  fn = exporter.ExportedFunction(predictor, with_postprocessing=False, thresholds_as="inputs")
  size = predictor.image_size
  rng = np.random.default_rng(0)
  one = rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8)
  many = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
  rows = []
  for fmt in formats:
    t0 = time.perf_counter()
    if fmt == "jax":
      jitted = jax.jit(lambda image: fn._full(fn._leaves, image))
      run = lambda x, f=jitted: jax.block_until_ready(f(x))
    else:
      directory = os.path.join(workdir, f"{preset}_{fmt}")
      os.makedirs(directory, exist_ok=True)
      if fmt == "onnx":
        exporter.write_onnx(fn, directory)
        model_file = spec_lib.ONNX_FILE
      else:
        exporter.write_saved_model(fn, directory, ("cpu",))
        model_file = spec_lib.SAVED_MODEL_DIR
      spec_lib.write_spec(
        directory,
        {"format": fmt, "model_file": model_file, "image_size": size, "thresholds": {}},
      )
      model = runner.load_model(directory)
      run = model.run
    prepare = time.perf_counter() - t0
    latency = timed(run, one, repeats)
    throughput = timed(run, many, repeats)
    row = {
      "preset": preset,
      "teacher": predictor.config.model.teacher,
      "image_size": size,
      "format": fmt,
      "batch1_latency_ms": 1000 * statistics.median(latency),
      "batch": batch,
      "images_per_second": batch * repeats / sum(throughput),
      "prepare_seconds": prepare,
    }
    log(
      f"{preset:6s} {fmt:12s} batch-1 {row['batch1_latency_ms']:9.1f} ms   "
      f"batch-{batch} {row['images_per_second']:8.2f} images/s   (export/compile "
      f"{prepare:.0f} s)"
    )
    rows.append(row)
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--presets", default="demo,wrn50")
  parser.add_argument("--formats", default=",".join(FORMATS))
  parser.add_argument("--batch", type=int, default=8, help="throughput batch size")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--json", default="", help="write the rows here")
  args = parser.parse_args(argv)
  formats = [f for f in args.formats.split(",") if f]
  for f in formats:
    if f not in FORMATS:
      parser.error(f"unknown format {f!r}; choose from {FORMATS}")
  rows = []
  with tempfile.TemporaryDirectory() as workdir:
    for preset in [p for p in args.presets.split(",") if p]:
      if preset not in PRESETS:
        parser.error(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
      rows += bench_preset(preset, formats, args.batch, args.repeats, workdir, print)
  machine = {
    "jax_backend": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
    "cpu_count": os.cpu_count(),
    "load_average": list(os.getloadavg()),
    "python": platform.python_version(),
  }
  print(json.dumps(machine))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"machine": machine, "rows": rows}, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
