r"""Times the training step: real model sizes, synthetic in-memory data, honest figures.

For each K (jobs trained at once, i.e. slots), the config's step is compiled and
timed on whatever devices exist: K=1 is the single-job step, K>1 the parallel
step over K slots (the config's category loop, slots spread over the devices).
The teacher is randomly initialised (the weights do not change the time) and
the data are random, so no weight file or data set is needed. Imports JAX only:
no TensorFlow, tfds or clu (the GPU machine has none).

  python scripts/benchmark.py --config=configs/mvtec.py --categories=1,3 --steps=3
  python scripts/benchmark.py --config=configs/demo.py --categories=1,3 --json=bench.json
  python scripts/benchmark.py --config=configs/demo.py --config.model.name=mrkd \
      --config.train.cache_teacher_features=False
  python scripts/benchmark.py --plan_only            # the slot plan of MVTec AD, no timing

Reported per K: compile seconds, first (warm-up) step, median of ``--steps``
timed steps, images per second, FLOPs per image from XLA's cost analysis, MFU
against ``--peak_tflops`` (default: the 2-core CPU figure of PERFORMANCE.md on
CPU, none elsewhere), peak device memory where the backend exposes it, the host
time per step (the trainer's batch makers: indexing, normalisation, the method's
augmentation, with ``config.data.host_workers`` threads) beside the device time
per step, and the useful-work fraction of the plan the trainer would make for
MVTec AD's 15 categories on K slots. Before a K runs, XLA's memory analysis of
the compiled step is compared with the memory available; a K that cannot fit is
skipped with a message, never run into an out-of-memory crash.
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
  ["1", "3", "15"],
  "Jobs trained at once (slots) to time; K=1 uses the single-job step, K>1 the parallel step.",
)
flags.DEFINE_string("json", None, "Also write the figures to this JSON file.")
flags.DEFINE_float(
  "peak_tflops",
  None,
  "Peak of the machine in TFLOP/s for MFU (default: 0.19 on CPU, from PERFORMANCE.md; "
  "none elsewhere; an H100/H200 does about 790 in bf16).",
)
flags.DEFINE_integer("seed", 0, "Seed of the random teacher, student and images.")
flags.DEFINE_integer("host_steps", 4, "Steps of batches made to time the host side.")
flags.DEFINE_bool("plan_only", False, "Only print the slot plan of MVTec AD (no config needed).")
flags.DEFINE_float(
  "memory_margin",
  0.9,
  "Run a K only when its estimated memory is below this share of what is free.",
)

CPU_PEAK_TFLOPS = 0.19  # 2 cores of the CPU machine (PERFORMANCE.md)
# Modules the benchmark must not need; listed in the JSON when something imported them.
EDGE_MODULES = ("tensorflow", "tensorflow_datasets", "clu", "torch")


def plan_rows(slot_counts=(1, 2, 4, 8)):
  """The useful-work table of MVTec AD's plan (200 epochs, batch 16, 10 % held out)."""
  from skrd4ad_jax.training import schedule

  rows = schedule.plan_table(schedule.mvtec_loads(), slot_counts)
  for row in rows:
    row.pop("plan")
  return rows


def host_seconds_per_step(method, config, num_slots, steps, workers):
  """Wall time the trainer's batch makers need per step of ``num_slots`` jobs.

  The batches come from uint8 images in memory (or cached features), are
  normalised and augmented by ``method.make_batch`` exactly as in training,
  ``workers`` threads making them (``batches.Prefetcher``).
  """
  import numpy as np

  from skrd4ad_jax.training import batches

  b, s = int(config.train.batch_size), int(config.data.image_size)
  rng = np.random.default_rng(0)
  category = (tuple(config.data.categories) or ("synthetic",))[0]
  n = 4 * b
  inputs = []
  for k in range(num_slots):
    if config.train.get("cache_teacher_features", False):
      feats = [
        rng.standard_normal((n, *shape[1:]), np.float32) for shape in method.feature_shapes()
      ]
      job = batches.JobInput(f"j{k}", category, k, b, method, features=feats)
    else:
      images = rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8)
      job = batches.JobInput(f"j{k}", category, k, b, method, images=images)
    inputs.append(job)
  prefetcher = batches.Prefetcher(workers)
  t0 = time.perf_counter()
  for step in range(steps):
    for job in inputs:
      prefetcher.ask(job, step)
  for step in range(steps):
    for job in inputs:
      prefetcher.get(job, step)
  elapsed = time.perf_counter() - t0
  prefetcher.close()
  return elapsed / steps


def _flops(compiled):
  """FLOPs of a compiled program from XLA's cost analysis, or None."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001  (backends without cost analysis)
    return None
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def memory_estimate_bytes(compiled):
  """Bytes a compiled program needs per device (arguments + outputs + temporaries), or None."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001
    return None
  if m is None:
    return None
  total = 0
  for name in (
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "temp_size_in_bytes",
    "generated_code_size_in_bytes",
  ):
    total += int(getattr(m, name, 0) or 0)
  # Donated arguments alias their outputs.
  total -= int(getattr(m, "alias_size_in_bytes", 0) or 0)
  return total or None


def available_bytes(device):
  """Free memory of ``device`` (accelerators: its allocator's limit; CPU: MemAvailable)."""
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001
    stats = None
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def peak_memory_bytes(devices):
  """Largest ``peak_bytes_in_use`` over ``devices``; None where not exposed (CPU)."""
  peaks = []
  for d in devices:
    try:
      stats = d.memory_stats()
    except Exception:  # noqa: BLE001
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def time_step(config, method, teacher_vars, num_jobs, num_steps, seed, margin):
  """Compiles and (when it fits) times the step of ``num_jobs`` jobs; returns figures."""
  import jax
  import numpy as np

  from skrd4ad_jax.training import batches as batches_lib
  from skrd4ad_jax.training import parallel, steps

  key = jax.random.PRNGKey(seed)
  state = jax.jit(method.init)(key, teacher_vars)
  np_rng = np.random.default_rng(seed)
  devices_all = jax.devices()
  if num_jobs == 1:
    mode, mesh, slots, loop = "single", None, 1, None
    host = batches_lib.synthetic_batch(method, config, 1, np_rng)
    batch = jax.device_put({k: v[0] for k, v in host.items()})
    args = (state, teacher_vars, batch, key, np.bool_(True))
    step = steps.jitted_train_step(method)
    devices_used = 1
  else:
    mode = "parallel"
    mesh = parallel.make_mesh(num_jobs, int(config.parallel.data_axis_size))
    per_device = -(-num_jobs // mesh.shape[parallel.CATEGORY_AXIS])
    slots = parallel.num_slots(mesh, per_device)
    loop = parallel.resolve_category_loop(config.parallel.get("category_loop", "auto"), mesh)
    stacked = parallel.put_stacked(parallel.stack([state] * slots), mesh)
    batch = parallel.put_batch(batches_lib.synthetic_batch(method, config, slots, np_rng), mesh)
    active = np.arange(slots) < num_jobs
    rngs = np.stack([np.asarray(jax.random.PRNGKey(seed + i)) for i in range(slots)])
    args = (stacked, parallel.put_replicated(teacher_vars, mesh), batch, rngs, active)
    step = parallel.make_parallel_train_step(method, mesh, loop)
    devices_used = mesh.devices.size
  del state
  jax.block_until_ready(args)

  t0 = time.perf_counter()
  compiled = step.lower(*args).compile()
  compile_seconds = time.perf_counter() - t0
  flops = _flops(compiled)
  need = memory_estimate_bytes(compiled)
  free = available_bytes(devices_all[0])
  out = {
    "categories": num_jobs,
    "mode": mode,
    "category_loop": loop,
    "mesh": dict(mesh.shape) if mesh is not None else None,
    "slots": slots,
    "devices_used": devices_used,
    "images_per_step": num_jobs * int(config.train.batch_size),
    "compile_seconds": compile_seconds,
    "memory_estimate_bytes": need,
    "memory_available_bytes": free,
    # Cost analysis of an SPMD program describes one device's share; it counts
    # idle slots and, under 'vmap', batched-weight convolutions as XLA lowers them.
    "flops_per_step": flops,
    "flops_per_step_counts": "per device" if devices_used > 1 else "whole step",
  }
  if need and free and need > margin * free:
    out["skipped"] = (
      f"needs ~{need / 2**30:.1f} GiB per device by XLA's memory analysis, "
      f"{free / 2**30:.1f} GiB free: not run"
    )
    return out

  def run(state):
    t0 = time.perf_counter()
    state, metrics = compiled(state, *args[1:])
    jax.block_until_ready((state, metrics))
    return state, time.perf_counter() - t0

  state, first_step_seconds = run(args[0])
  times = []
  for _ in range(num_steps):
    state, dt = run(state)
    times.append(dt)
  step_seconds = statistics.median(times)
  out.update(
    first_step_seconds=first_step_seconds,
    step_seconds=step_seconds,
    step_seconds_all=times,
    images_per_second=out["images_per_step"] / step_seconds,
    peak_memory_bytes=peak_memory_bytes(jax.local_devices()),
  )
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  plan = plan_rows()
  print(
    "MVTec AD slot plan (200 epochs, batch 16): "
    + ", ".join(f"{r['slots']} slot(s) {100 * r['useful_fraction']:.1f} % useful" for r in plan)
  )
  if FLAGS.plan_only:
    if FLAGS.json:
      with open(FLAGS.json, "w") as f:
        json.dump({"plan": plan}, f, indent=1)
    return
  if FLAGS.config is None:
    raise app.UsageError("--config is required (or --plan_only).")
  from skrd4ad_jax import host_memory

  kept_freed_memory = host_memory.keep_freed_memory()  # as the trainer does, before JAX starts
  import jax

  from skrd4ad_jax import methods, teachers
  from skrd4ad_jax.teachers import recipe
  from skrd4ad_jax.training import schedule

  config = recipe.resolve(FLAGS.config)
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
  peak = FLAGS.peak_tflops or (CPU_PEAK_TFLOPS if platform_name == "cpu" else None)
  workers = int(config.data.get("host_workers", 0)) or min(4, os.cpu_count() or 1)
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
    "host_workers": workers,
    "host_malloc_keeps_freed_memory": kept_freed_memory,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "peak_tflops": peak,
  }
  print(" ".join(f"{k}={v}" for k, v in header.items()))
  mvtec = {job: (0, n) for job, n in schedule.mvtec_loads().items()}
  runs = []
  for k in ks:
    r = time_step(config, method, teacher_vars, k, FLAGS.steps, FLAGS.seed, FLAGS.memory_margin)
    r["mvtec_plan_useful_fraction"] = schedule.useful_fraction(schedule.plan_slots(mvtec, k))
    runs.append(r)
    if "skipped" in r:
      print(f"K={k}: skipped: {r['skipped']}", flush=True)
      continue
    host = host_seconds_per_step(method, config, k, FLAGS.host_steps, workers)
    r["host_seconds_per_step"] = host
    r["host_share"] = host / (host + r["step_seconds"])
    if r["flops_per_step"]:
      total_flops = r["flops_per_step"] * r["devices_used"]
      r["gflop_per_image"] = total_flops / r["images_per_step"] / 1e9
      if peak:
        r["tflops_per_second"] = total_flops / r["step_seconds"] / 1e12
        scale = r["devices_used"] if platform_name != "cpu" else 1
        r["mfu"] = r["tflops_per_second"] / (peak * scale)
    gflop = f"{r['gflop_per_image']:.1f} GFLOP/img" if "gflop_per_image" in r else "FLOPs n/a"
    mem = (
      f"{r['peak_memory_bytes'] / 2**30:.2f} GiB"
      if r.get("peak_memory_bytes") is not None
      else "n/a"
    )
    mfu = f", MFU {100 * r['mfu']:.1f} %" if "mfu" in r else ""
    print(
      f"K={k} ({r['mode']}{', ' + r['category_loop'] if r['category_loop'] else ''}, "
      f"{r['slots']} slots on {r['devices_used']} device(s)): compile "
      f"{r['compile_seconds']:.1f} s, step {r['step_seconds']:.3f} s (median of "
      f"{len(r['step_seconds_all'])}), {r['images_per_second']:.2f} img/s, {gflop}{mfu}, "
      f"peak memory {mem}, host {r['host_seconds_per_step']:.3f} s/step "
      f"({100 * r['host_share']:.1f} % of host + device), MVTec plan on {k} slot(s) "
      f"{100 * r['mvtec_plan_useful_fraction']:.1f} % useful",
      flush=True,
    )
  result = {
    **header,
    "config": json.loads(config.to_json_best_effort()),
    "plan": plan,
    "runs": runs,
    "modules_loaded": [m for m in EDGE_MODULES if m in sys.modules],
  }
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(result, f, indent=1)
    print(f"wrote {FLAGS.json}")


if __name__ == "__main__":
  app.run(main)
