r"""The training step side by side: the official PyTorch RD4AD step vs ours, in one run.

  python scripts/bench_vs_official.py                          # WRN50-2, 256 px, batch 16
  python scripts/bench_vs_official.py --steps=5 --json=vs_official.json
  python scripts/bench_vs_official.py --config.train.cache_teacher_features=True

A measuring tool like the tests: it imports torch (the CPU test oracle of
``pip install -e ".[test]"``) and the official modules restated in
``tests/official_torch.py``; the library never imports torch.

The official step is ``hq-deng/RD4AD main.py:train``: the frozen ImageNet
encoder in eval mode (its parameters still require gradients, so the backward
pass runs through it, as in the official code), the OCBE ``bn`` and the
decoder in train mode, ``loss_fucntion`` (flattened cosine), Adam(0.005,
(0.5, 0.999)) over ``bn`` + ``decoder``; torch uses every core. Ours is the
trainer's jitted single-job step of the config (default ``configs/mvtec.py``:
SK-RD4AD, WRN50-2, 256 px, batch 16, float32): teacher under
``stop_gradient`` (or, with ``cache_teacher_features``, precomputed teacher
features: the trainer's real step then, and the figure says so). Both with
random weights (the time does not depend on them) on random images.

One command runs both sides one after the other, each in a process of its own
(in one process torch's and XLA's thread pools and allocators slowed both by
~40 %): one warm-up step, then ``--steps`` timed steps, the median counts.
Compare the ratio of one run, not absolute times across days. Prints
both images/s and the ratio; ``--json`` writes them with the machine's load.
"""

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags
from ml_collections import config_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config", os.path.join(REPO, "configs", "mvtec.py"), "Our side's configuration.", lock_config=True
)
flags.DEFINE_integer("steps", 3, "Timed steps per side after one warm-up step; the median counts.")
flags.DEFINE_string("json", None, "Also write the figures to this JSON file.")
flags.DEFINE_enum(
  "conv_impl",
  "auto",
  ["auto", "gemm", "xla"],
  "Our convolutions (skrd4ad_jax.models.layers.conv2d); 'xla' is lax.conv forward and backward.",
)
flags.DEFINE_enum(
  "official_malloc",
  "system",
  ["system", "keep"],
  "The official side's host malloc: 'system' as its users run it, 'keep' as ours "
  "(skrd4ad_jax.host_memory: freed memory stays in the process). Ours follows "
  "SKRD4AD_HOST_MALLOC (default 'auto': keep on a CPU-only host), as the trainer does.",
)
flags.DEFINE_enum(
  "side",
  None,
  ["official", "ours"],
  "Time one side in this process (what the default run starts, once per side).",
)


def official_step(config):
  """A closure running one official RD4AD training step on a fixed random batch."""
  if FLAGS.official_malloc == "keep":
    from skrd4ad_jax import host_memory

    os.environ[host_memory.ENV] = "keep"
    host_memory.keep_freed_memory()  # before torch allocates anything
  import official_torch as ot
  import torch

  from skrd4ad_jax.teachers.recipe import student_layout

  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(0)
  b, s = int(config.train.batch_size), int(config.data.image_size)
  encoder = ot.Encoder(config.model.teacher).eval()  # parameters require grad, as official
  models = ot.official_models("rd4ad", student_layout(config.model), config.model.teacher)
  bn, decoder = models["bn"].train(), models["decoder"].train()
  optimizer = torch.optim.Adam(
    list(decoder.parameters()) + list(bn.parameters()), lr=0.005, betas=(0.5, 0.999)
  )
  images = torch.randn(b, 3, s, s)

  def step():
    inputs = encoder(images)
    outputs = decoder(bn(inputs))
    loss = ot.loss_fucntion(inputs, outputs)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss)

  return step


def our_step(config):
  """A closure running one of the trainer's jitted single-job steps of ``config``."""
  import jax
  import numpy as np

  from skrd4ad_jax import methods, teachers
  from skrd4ad_jax.models import layers
  from skrd4ad_jax.training import batches, steps

  if FLAGS.conv_impl != "auto":
    impl = FLAGS.conv_impl
    layers.auto_conv_impl = lambda: impl

  method = methods.build_method(config)
  teacher_vars = teachers.load_teacher_variables(
    config.model.teacher, "random", image_size=int(config.data.image_size)
  )
  key = jax.random.PRNGKey(0)
  state = jax.jit(method.init)(key, teacher_vars)
  host = batches.synthetic_batch(method, config, 1, np.random.default_rng(0))
  batch = jax.device_put({k: v[0] for k, v in host.items()})
  compiled = (
    steps.jitted_train_step(method).lower(state, teacher_vars, batch, key, np.bool_(True)).compile()
  )
  holder = {"state": state}

  def step():
    holder["state"], metrics = compiled(holder["state"], teacher_vars, batch, key, np.bool_(True))
    return float(jax.block_until_ready(metrics["loss"]))

  return step


def timed(fn):
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def time_side(side: str, config) -> dict:
  """Builds one side's step, runs one warm-up step and ``--steps`` timed ones."""
  t0 = time.perf_counter()
  step = official_step(config) if side == "official" else our_step(config)
  build_seconds = time.perf_counter() - t0
  warm = timed(step)
  times = [timed(step) for _ in range(FLAGS.steps)]
  return {
    "build_seconds": build_seconds,  # ours: tracing and compiling
    "warm_up_seconds": warm,
    "step_seconds_all": times,
    "step_seconds": statistics.median(times),
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  from skrd4ad_jax import host_memory
  from skrd4ad_jax.teachers import recipe

  config = recipe.resolve(FLAGS.config)
  if FLAGS.side == "ours":
    host_memory.keep_freed_memory()  # as the trainer does, before JAX starts
  if FLAGS.side:  # a child: one side, figures as JSON on the last line of stdout
    print(json.dumps(time_side(FLAGS.side, config)), flush=True)
    return
  from importlib import metadata

  b = int(config.train.batch_size)
  load_before = os.getloadavg()
  result = {
    "config_name": config.name,
    "method": config.model.name,
    "teacher": config.model.teacher,
    "image_size": int(config.data.image_size),
    "batch_size": b,
    "cache_teacher_features": bool(config.train.get("cache_teacher_features", False)),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "conv_impl": FLAGS.conv_impl,
    "official_malloc": FLAGS.official_malloc,
    "ours_malloc": host_memory.choice(),
    # Versions without importing either into this parent process (the sides run
    # in children; torch uses cpu_count threads there).
    "jax_version": metadata.version("jax"),
    "torch_version": metadata.version("torch"),
    "cpu_count": os.cpu_count(),
    "load_average_before": load_before,
  }
  # Each side in a process of its own, one after the other: in one process the
  # two thread pools and allocators slowed both sides by ~40 %.
  overrides = [a for a in sys.argv[1:] if a.startswith("--config")]
  for side in ("official", "ours"):
    proc = subprocess.run(
      [sys.executable, os.path.abspath(__file__), f"--side={side}", f"--steps={FLAGS.steps}"]
      + [f"--conv_impl={FLAGS.conv_impl}", f"--official_malloc={FLAGS.official_malloc}"]
      + overrides,
      capture_output=True,
      text=True,
      check=False,
    )
    if proc.returncode != 0:
      raise SystemExit(f"The {side} side failed:\n{proc.stderr[-3000:]}")
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    for key, value in figures.items():
      result[f"{side}_{key}"] = value
    result[f"{side}_images_per_second"] = b / figures["step_seconds"]
  result["load_average_after"] = os.getloadavg()
  result["ratio_ours_over_official"] = (
    result["ours_images_per_second"] / result["official_images_per_second"]
  )
  print(
    f"official RD4AD (PyTorch, {result['cpu_count']} threads): "
    f"{result['official_step_seconds']:.2f} s/step, "
    f"{result['official_images_per_second']:.3f} img/s | ours ({config.model.name}"
    f"{', cached teacher features' if result['cache_teacher_features'] else ''}): "
    f"{result['ours_step_seconds']:.2f} s/step, {result['ours_images_per_second']:.3f} img/s | "
    f"ratio {result['ratio_ours_over_official']:.2f}x | load before/after "
    f"{load_before[0]:.2f}/{result['load_average_after'][0]:.2f}",
    flush=True,
  )
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(result, f, indent=1)
    print(f"wrote {FLAGS.json}")


if __name__ == "__main__":
  app.run(main)
