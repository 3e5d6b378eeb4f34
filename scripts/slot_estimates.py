r"""Device memory of one training slot and the slots per device each card size allows.

Compiles (never runs) the config's parallel training step at 1 and 2 slots and
its evaluation step at two batch sizes, reads XLA's memory analysis
(``skrd4ad_jax/training/memory.py``, what the trainer does at start-up), and
lists how many slots fit on cards of the given sizes with the trainer's margin,
and how many the automatic choice gives MVTec AD's 15 categories there. Runs on
CPU in minutes (no accelerator, no weights, no data: a random teacher).

  python scripts/slot_estimates.py --config=configs/mvtec.py --json=slots.json

The category loop is 'vmap', as on accelerators (``--category_loop=unroll``: each
slot's own single-job program). XLA:CPU's analysis
approximates a GPU's (other fusions, no cuDNN workspaces; bfloat16 convolutions
may be computed in float32 on CPU); a run on the device measures its own.
"""

import json
import platform

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/mvtec.py", "Training configuration file.")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes to estimate.")
flags.DEFINE_list("cards_gb", ["16", "24", "40", "80", "141"], "Card memory sizes (GB) to list.")
flags.DEFINE_float(
  "mem_fraction",
  0.75,
  "Share of a card JAX may use (XLA_PYTHON_CLIENT_MEM_FRACTION; 0.75 is JAX's default "
  "preallocation, what device.memory_stats()['bytes_limit'] then reports).",
)
flags.DEFINE_string("json", None, "Also write the figures to this JSON file.")
flags.DEFINE_enum(
  "category_loop",
  "vmap",
  ["vmap", "unroll"],
  "How the step advances its slots: 'vmap' as on accelerators; 'unroll' compiles each "
  "slot's own single-job program (XLA:CPU's default).",
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  import dataclasses
  import time

  import jax
  import numpy as np

  from skrd4ad_jax import methods, teachers
  from skrd4ad_jax.teachers import recipe
  from skrd4ad_jax.training import memory, schedule

  loads = schedule.mvtec_loads()
  out = {"jax_version": jax.__version__, "host": platform.node(), "margin": memory.MARGIN}
  out["mem_fraction"] = FLAGS.mem_fraction
  out["estimates"] = []
  for dtype in FLAGS.dtypes:
    config = recipe.resolve(FLAGS.config)
    config.model.dtype = dtype
    config.parallel.category_loop = FLAGS.category_loop
    method = methods.build_method(config)
    size, bs = int(config.data.image_size), int(config.train.batch_size)
    teacher_vars = teachers.load_teacher_variables(config.model.teacher, "random", image_size=size)
    images = np.zeros((bs, size, size, 3), np.float32)
    template = method.make_batch(images, np.random.default_rng(0), "")
    t0 = time.perf_counter()
    mem = memory.estimate(method, config, teacher_vars, template)
    seconds = time.perf_counter() - t0
    row = {
      "method": method.name,
      "teacher": config.model.teacher,
      "image_size": size,
      "batch_size": bs,
      "eval_batch_size": int(config.eval.batch_size),
      "dtype": dtype,
      "category_loop": FLAGS.category_loop,
      "measured_bytes": {
        "train_1_slot": mem.measured_bytes[0],
        "train_2_slots": mem.measured_bytes[1],
        "eval_batch_1": mem.measured_bytes[2],
        f"eval_batch_{max(2, int(config.eval.batch_size))}": mem.measured_bytes[3],
      },
      "compile_seconds": seconds,
      **{k: v for k, v in dataclasses.asdict(mem).items() if k.endswith("bytes")},
      "cards": [],
    }
    print(
      f"{method.name} {config.model.teacher} {size} px batch {bs} {dtype}: "
      f"{mem.per_slot_bytes / 2**30:.2f} GiB per slot + {mem.fixed_bytes / 2**30:.2f} GiB fixed, "
      f"state {mem.state_bytes / 2**30:.2f} GiB, evaluation {mem.eval_fixed_bytes / 2**30:.2f} "
      f"GiB + {mem.eval_bytes_per_image / 2**20:.0f} MiB per image ({seconds:.0f} s of compiles)",
      flush=True,
    )
    for card in FLAGS.cards_gb:
      limit = int(float(card) * 1e9 * FLAGS.mem_fraction)
      m = dataclasses.replace(mem, limit_bytes=limit)
      most = m.max_slots()
      auto = schedule.auto_slots_per_device(loads, 1, "gpu", max_slots=most) if most else 0
      eval_batch = m.max_eval_batch(auto) if auto else 0
      row["cards"].append(
        {
          "card_gb": float(card),
          "limit_bytes": limit,
          "max_slots": most,
          "auto_slots_mvtec": auto,
          "eval_batch_cap": min(eval_batch, int(config.eval.batch_size)),
        }
      )
      print(
        f"  {card:>4} GB card (limit {limit / 2**30:.1f} GiB): at most {most} slot(s); auto for "
        f"MVTec AD's 15 categories {auto}; evaluation batch {row['cards'][-1]['eval_batch_cap']}",
        flush=True,
      )
    out["estimates"].append(row)
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(out, f, indent=1)
    print(f"wrote {FLAGS.json}")


if __name__ == "__main__":
  app.run(main)
