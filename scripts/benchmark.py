r"""Times the training step: real model sizes, synthetic in-memory data.

One category alone (the single-category jitted step) and K categories in
parallel (``parallel.make_parallel_train_step`` with the config's category loop,
on whatever devices exist). The teacher is randomly initialised (the weights do
not change the time) and the images are random normals made in memory, so
neither weight files nor a data set are needed. Imports JAX only: no
TensorFlow, tfds or clu (the GPU machine has none).

  python scripts/benchmark.py --config=configs/mvtec.py --steps=3 --json=/tmp/mvtec.json
  python scripts/benchmark.py --config=configs/demo.py --categories=1,3
  python scripts/benchmark.py --config=configs/mvtec.py --config.train.cache_teacher_features=True
  XLA_FLAGS=--xla_force_host_platform_device_count=4 python scripts/benchmark.py \
      --config=configs/tiny.py --categories=1,3,4

Reported per K: compile seconds (lower + compile), the first (warm-up) step,
the median of ``--steps`` timed steps, images per second (padded slots do not
count), FLOPs per step from XLA's cost analysis, the fraction of
``--peak_tflops`` (default: the 2-core CPU figure of PERFORMANCE.md on CPU,
none elsewhere) and peak device memory where the backend exposes it
(``device.memory_stats()``; None on CPU). With
``config.train.cache_teacher_features=True`` the step is the student-only step
on precomputed teacher features (``feature1..3``), as the trainer runs it.
"""

import json
import os
import platform
import statistics
import sys
import time

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.DEFINE_integer("steps", 5, "Timed steps per K, after one warm-up step; the median counts.")
flags.DEFINE_list(
  "categories",
  ["1", "3"],
  "Numbers of categories K to time; K=1 uses the single-category step, K>1 the parallel step.",
)
flags.DEFINE_string("json", None, "Also write the figures to this JSON file.")
flags.DEFINE_float(
  "peak_tflops",
  None,
  "Peak of the machine in TFLOP/s for the fraction of "
  "peak (default: 0.19 on CPU, from PERFORMANCE.md; none elsewhere).",
)
flags.DEFINE_integer("seed", 0, "Seed of the random teacher, student and images.")
flags.mark_flags_as_required(["config"])

CPU_PEAK_TFLOPS = 0.19  # 2 cores of the CPU machine (PERFORMANCE.md)
# Modules the benchmark must not need; listed in the JSON when something imported them.
EDGE_MODULES = ("tensorflow", "tensorflow_datasets", "clu", "torch")


def synthetic_batch(method, config, num_slots, np_rng):
  """A host batch of random data shaped like the trainer's.

  Args:
    method: the ``methods.Method``.
    config: the config (batch size, image size, feature cache).
    num_slots: leading category axis.
    np_rng: numpy Generator.

  Returns:
    Dict of [num_slots, B, ...] float32 arrays: ``image`` plus the method's
    extras (``make_batch``), or ``feature1..3`` with the teacher-feature cache.
  """
  import numpy as np

  b, s = int(config.train.batch_size), int(config.data.image_size)
  if config.train.get("cache_teacher_features", False):
    if not method.supports_feature_cache:
      raise ValueError(
        f"config.train.cache_teacher_features needs a method without input "
        f"augmentation; {method.name} augments its inputs."
      )
    # The trainer's cached batches: feature1..3 of the frozen teacher, float32.
    return {
      f"feature{level + 1}": np_rng.standard_normal((num_slots, *shape), np.float32)
      for level, shape in enumerate(method.feature_shapes(b))
    }
  category = (tuple(config.data.categories) or ("synthetic",))[0]
  slots = [
    method.make_batch(np_rng.standard_normal((b, s, s, 3), np.float32), np_rng, category)
    for _ in range(num_slots)
  ]
  return {k: np.stack([x[k] for x in slots]) for k in slots[0]}


def _flops(compiled):
  """FLOPs of a compiled program from XLA's cost analysis, or None."""
  try:
    cost = compiled.cost_analysis()
  except Exception:
    return None
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def peak_memory_bytes(devices):
  """Largest ``peak_bytes_in_use`` over ``devices``; None where not exposed (CPU)."""
  peaks = []
  for d in devices:
    try:
      stats = d.memory_stats()
    except Exception:
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def time_step(config, method, teacher_vars, num_categories, steps, seed):
  """Compiles and times the training step of ``num_categories`` categories.

  Args:
    config: the config.
    method: the ``methods.Method`` built from it.
    teacher_vars: the (random) teacher variables.
    num_categories: 1 = the single-category step; more = the parallel step.
    steps: timed steps after the warm-up step.
    seed: seed of the student init and the data.

  Returns:
    A dict of figures (see the module docstring).
  """
  import jax
  import numpy as np

  from skrd4ad_jax.training import parallel, train

  key = jax.random.PRNGKey(seed)
  state = jax.jit(method.init)(key, teacher_vars)
  np_rng = np.random.default_rng(seed)
  if num_categories == 1:
    mode, mesh, slots, loop = "single", None, 1, None
    host = synthetic_batch(method, config, 1, np_rng)
    batch = jax.device_put({k: v[0] for k, v in host.items()})
    args = (state, teacher_vars, batch, key, np.bool_(True))
    step = train.jitted_train_step(method)
    devices_used = 1
  else:
    mode = "parallel"
    mesh = parallel.make_mesh(num_categories, int(config.parallel.data_axis_size))
    slots = parallel.num_slots(num_categories, mesh)
    loop = parallel.resolve_category_loop(config.parallel.get("category_loop", "auto"), mesh)
    stacked = parallel.put_stacked(parallel.stack([state] * slots), mesh)
    batch = parallel.put_batch(synthetic_batch(method, config, slots, np_rng), mesh)
    active = np.arange(slots) < num_categories
    args = (stacked, parallel.put_replicated(teacher_vars, mesh), batch, key, active)
    step = parallel.make_parallel_train_step(method, mesh, loop)
    devices_used = mesh.devices.size
  jax.block_until_ready(args)

  t0 = time.perf_counter()
  compiled = step.lower(*args).compile()
  compile_seconds = time.perf_counter() - t0
  flops = _flops(compiled)

  def run(state):
    t0 = time.perf_counter()
    state, metrics = compiled(state, *args[1:])
    jax.block_until_ready((state, metrics))
    return state, time.perf_counter() - t0

  state, first_step_seconds = run(args[0])
  times = []
  for _ in range(steps):
    state, dt = run(state)
    times.append(dt)
  step_seconds = statistics.median(times)
  images = num_categories * int(config.train.batch_size)
  out = {
    "categories": num_categories,
    "mode": mode,
    "category_loop": loop,
    "mesh": dict(mesh.shape) if mesh is not None else None,
    "slots": slots,
    "devices_used": devices_used,
    "images_per_step": images,
    "compile_seconds": compile_seconds,
    "first_step_seconds": first_step_seconds,
    "step_seconds": step_seconds,
    "step_seconds_all": times,
    "images_per_second": images / step_seconds,
    # Cost analysis of an SPMD program describes one device's share; it counts
    # padded slots and, under 'vmap', batched-weight convolutions as XLA lowers them.
    "flops_per_step": flops,
    "flops_per_step_counts": "per device" if devices_used > 1 else "whole step",
    "peak_memory_bytes": peak_memory_bytes(jax.local_devices()),
  }
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  import jax

  from skrd4ad_jax import methods, teachers

  config = FLAGS.config
  ks = sorted({int(k) for k in FLAGS.categories})
  if not ks or ks[0] < 1:
    raise app.UsageError(f"--categories must be positive integers, got {FLAGS.categories}.")
  method = methods.build_method(config)
  # Random weights: the time does not depend on them, and no weight file is needed.
  teacher_vars = teachers.load_teacher_variables(
    config.model.teacher, "random", image_size=int(config.data.image_size), seed=FLAGS.seed
  )
  devices = jax.devices()
  platform_name = devices[0].platform
  peak = (
    FLAGS.peak_tflops
    if FLAGS.peak_tflops
    else (CPU_PEAK_TFLOPS if platform_name == "cpu" else None)
  )
  header = {
    "config_name": config.name,
    "method": method.name,
    "teacher": config.model.teacher,
    "image_size": int(config.data.image_size),
    "batch_size": int(config.train.batch_size),
    "dtype": config.model.get("dtype", "float32"),
    "cache_teacher_features": bool(config.train.get("cache_teacher_features", False)),
    "backend": platform_name,
    "device_kind": devices[0].device_kind,
    "num_devices": len(devices),
    "jax_version": jax.__version__,
    "host": platform.node(),
    "cpu_count": os.cpu_count(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "peak_tflops": peak,
  }
  print(" ".join(f"{k}={v}" for k, v in header.items()))
  runs = []
  for k in ks:
    r = time_step(config, method, teacher_vars, k, FLAGS.steps, FLAGS.seed)
    if r["flops_per_step"] and peak:
      achieved = r["flops_per_step"] * r["devices_used"] / r["step_seconds"]
      r["tflops_per_second"] = achieved / 1e12
      r["fraction_of_peak"] = achieved / (
        peak * 1e12 * (r["devices_used"] if platform_name != "cpu" else 1)
      )
    runs.append(r)
    gflop = (
      f"{r['flops_per_step'] * r['devices_used'] / r['images_per_step'] / 1e9:.1f} GFLOP/img"
      if r["flops_per_step"]
      else "FLOPs n/a"
    )
    mem = (
      f"{r['peak_memory_bytes'] / 2**30:.2f} GiB" if r["peak_memory_bytes"] is not None else "n/a"
    )
    frac = f"{r['fraction_of_peak']:.0%} of peak" if "fraction_of_peak" in r else ""
    print(
      f"K={k} ({r['mode']}{', ' + r['category_loop'] if r['category_loop'] else ''}, "
      f"{r['slots']} slots on {r['devices_used']} device(s)): compile "
      f"{r['compile_seconds']:.1f} s, first step {r['first_step_seconds']:.2f} s, "
      f"step {r['step_seconds']:.3f} s (median of {len(r['step_seconds_all'])}), "
      f"{r['images_per_second']:.2f} img/s, {gflop} {frac}, peak memory {mem}",
      flush=True,
    )
  result = {
    **header,
    "config": json.loads(config.to_json_best_effort()),
    "runs": runs,
    "modules_loaded": [m for m in EDGE_MODULES if m in sys.modules],
  }
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(result, f, indent=1)
    print(f"wrote {FLAGS.json}")


if __name__ == "__main__":
  app.run(main)
