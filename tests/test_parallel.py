"""Many jobs in one program: equivalence, slots and queues, the category loops, resume.

Multi-device checks run in subprocesses with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (the device count is fixed
when a process first touches JAX). The subprocesses run this file as a script
(``python tests/test_parallel.py SPEC.json``); the work they do is in the
``_*_worker`` functions below, the assertions are in the tests.

The model is the tiny config (the random resnet_micro teacher, one OCE block, one
block per decoder stage) at batch 2 and 3 epochs; the category loops' step worker
uses resnet18 with the same student layout, the model its statistics were
measured on. In the full suite on 2 CPU cores, with the other worker busy, the
file takes about 5.5 minutes of one worker (equivalence ~1.6 min, category loops
~1.7, seeds ~1, the others ~35 s each). The workers share one persistent
XLA compilation cache: programs with the same HLO (the single-category runs, the
resume runs) compile once.

Note that ``parallel.make_mesh`` gives 3 jobs on 4 devices a 3-device category
axis (3 slots, one job each). With 2 devices and one slot each the plan cuts a
job in two (it continues in the other slot) and starts another mid-run in a
freed slot; with 2 devices and 2 slots each, one slot has no job.
"""

import csv
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from skrd4ad_jax.evaluation import results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_DEVICES = 4
CATEGORIES = ("brick", "grass", "gravel")
# Normal training images per category (before the 25% validation hold-out):
# 11 / 8 / 5 -> 8 / 6 / 4 training images -> 4 / 3 / 2 steps per epoch at batch 2.
NUM_TRAIN = {"brick": 11, "grass": 8, "gravel": 5}
EPOCHS = 3
EXPECTED_STEPS = {"brick": 12, "grass": 9, "gravel": 6}
SEED_CATEGORIES = ("brick", "gravel")
PARAM_ATOL = 1e-4  # float32
STEP_TEACHER = "resnet18"  # _step_worker's
METRIC_ATOL = 5e-4  # "equal to three decimals"
METRICS = results.METRIC_COLUMNS
# Dotted config overrides applied on top of configs/tiny.py.
OVERRIDES = {
  # 64 px, not less: at 32 px the OCBE output is 1x1, its BatchNorm normalises 2 values
  # per channel and some gradients are pure float noise, which Adam amplifies to
  # ~learning-rate-sized differences between any two differently compiled programs.
  "data.image_size": 64,
  "model.oce_blocks": 1,
  "model.decoder_blocks": (1, 1, 1),
  "train.batch_size": 2,
  "train.epochs": EPOCHS,
  "train.log_every_steps": 100,
  "train.checkpoint_every_epochs": 0,
  "eval.save_pictures": False,
  "eval.tensorboard_pictures": 0,
  # Not what these tests check (the seeds test turns it on to find each seed's run);
  # its writer imports TensorFlow.
  "train.tensorboard": False,
}


# -- shared helpers (test process and workers) ------------------------------


def tiny_config(categories, data_root, **overrides):
  """``configs/tiny.py`` for ``categories`` with ``OVERRIDES`` and ``overrides``."""
  from skrd4ad_jax.config import load_config

  config = load_config(os.path.join(REPO, "configs", "tiny.py") + ":" + ",".join(categories))
  config.data.root = data_root
  for key, value in {**OVERRIDES, **overrides}.items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def abstract_state(config):
  """The restore target: ``jax.eval_shape`` of the method's init."""
  import jax

  from skrd4ad_jax import methods

  method = methods.build_method(config)
  return jax.eval_shape(lambda: method.init(jax.random.PRNGKey(0), None))


def restore_final(workdir, category, config):
  """(state, meta) of the latest checkpoint of ``category`` in ``workdir``."""
  from skrd4ad_jax.training import checkpoints

  manager = checkpoints.make_manager(workdir, category, read_only=True)
  restored = checkpoints.restore(manager, abstract_state(config))
  assert restored is not None, f"no checkpoint for {category} in {workdir}"
  return restored


def max_abs_diff(a, b):
  import jax

  diffs = jax.tree.map(
    lambda x, y: float(
      np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)), initial=0.0)
    ),
    a,
    b,
  )
  return max(jax.tree.leaves(diffs), default=0.0)


def tree_digest(tree):
  import jax

  h = hashlib.sha256()
  for leaf in jax.tree.leaves(tree):
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return h.hexdigest()


def _enable_compilation_cache(cache_dir):
  import jax

  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _counting_step_factory(record, make):
  """Wraps ``make`` (``parallel.make_parallel_train_step``): counts steps, notes the sharding."""
  import jax

  from skrd4ad_jax.training import parallel

  def factory(method, mesh, category_loop="auto"):
    step = make(method, mesh, category_loop)
    record["loop"] = parallel.resolve_category_loop(category_loop, mesh)
    record["mesh"] = dict(mesh.shape)
    record["steps"] = 0

    def counted(stacked, *args):
      out = step(stacked, *args)
      if record["steps"] == 0:
        leaf = jax.tree.leaves(out[0].params)[0]
        record["state_spec"] = str(leaf.sharding.spec)
        record["state_devices"] = len(leaf.sharding.device_set)
        record["slots"] = int(leaf.shape[0])
        record["slots_per_shard"] = sorted({int(s.data.shape[0]) for s in leaf.addressable_shards})
      record["steps"] += 1
      return out

    return counted

  return factory


# -- workers (run in subprocesses) ------------------------------------------


def _train_worker(spec):
  """Trains the categories in parallel, then each alone; notes meshes and shardings."""
  import functools

  import jax

  from skrd4ad_jax.training import parallel, slots, train

  out = {
    "device_count": jax.device_count(),
    "mesh_3": dict(parallel.make_mesh(3).shape),
    "runs": {},
  }
  make_mesh, make_step = parallel.make_mesh, parallel.make_parallel_train_step
  make_plan = slots.make_plan
  for name, categories, devices, slots_per_device in spec["runs"]:
    record = {}
    parallel.make_parallel_train_step = _counting_step_factory(record, make_step)
    if devices:  # a smaller mesh: a job continues or starts in a freed slot
      parallel.make_mesh = functools.partial(make_mesh, devices=jax.devices()[:devices])
    config = tiny_config(
      categories, spec["data_root"], **{"parallel.slots_per_device": slots_per_device}
    )

    def recording_plan(*args, record=record, **kwargs):
      plan = make_plan(*args, **kwargs)
      record["plan"] = [[(g.job, g.start, g.stop, g.begin) for g in q] for q in plan.segments]
      return plan

    slots.make_plan = recording_plan
    try:
      train.train_and_evaluate(config, os.path.join(spec["base"], name))
    finally:
      parallel.make_mesh, parallel.make_parallel_train_step = make_mesh, make_step
      slots.make_plan = make_plan
    out["runs"][name] = record
  return out


def diff_stats(a, b, start):
  """How far tree ``a`` is from ``b``: max abs, and the L2 norm relative to ``b - start``.

  Leaf by leaf on the host's float32 arrays (resnet18's student holds 8M numbers:
  float64 copies of whole trees were half of the step worker's time). A float32
  difference is 0 exactly where the two values are equal.
  """
  import jax

  max_abs, over, size, moved, travelled = 0.0, 0, 0, 0.0, 0.0
  for x, y, z in zip(*(jax.tree.leaves(t) for t in (a, b, start)), strict=True):
    x, y, z = (np.ravel(np.asarray(v, np.float32)) for v in (x, y, z))
    d = x - y
    ad = np.abs(d)
    max_abs = max(max_abs, float(ad.max(initial=0.0)))
    over += int(np.count_nonzero(ad > 1e-4))
    size += d.size
    moved += float(np.dot(d, d))
    travelled += float(np.dot(y - z, y - z))
  return {
    "max_abs": max_abs,
    "rel_l2": float(np.sqrt(moved) / max(np.sqrt(travelled), 1e-30)),
    "frac_over_1e-4": over / max(size, 1),
  }


def _step_worker(spec):
  """The parallel step against the single-category step, for both category loops."""
  import jax

  from skrd4ad_jax import methods, teachers
  from skrd4ad_jax.training import parallel, steps

  # resnet18 and its one-block student, the model the 'vmap' statistics in
  # test_category_loops_match_single_step were measured on (how many elements
  # sit at the gradient noise level depends on the model).
  config = tiny_config(("brick",), "", **{"model.teacher": STEP_TEACHER})
  method = methods.build_method(config)
  teacher_vars = teachers.load_teacher_variables(
    config.model.teacher, "random", image_size=int(config.data.image_size), seed=0
  )
  k, num_steps, b, s = (
    len(CATEGORIES),
    spec["steps"],
    int(config.train.batch_size),
    int(config.data.image_size),
  )
  init = jax.jit(method.init)
  # Different initial states and data per category, so a mixed-up slot shows.
  states = [jax.device_get(init(jax.random.PRNGKey(i), teacher_vars)) for i in range(k)]
  images = np.random.default_rng(0).normal(size=(num_steps, k, b, s, s, 3)).astype(np.float32)
  active = np.ones((num_steps, k), bool)
  active[-1, 1] = False  # category 1 sits out the last step: its state must not move
  keys = [np.asarray(jax.random.PRNGKey(100 + c)) for c in range(k)]  # each job its own

  single = steps.jitted_train_step(method)
  reference, ref_after_1, ref_losses = [], [], np.zeros((num_steps, k))
  for c in range(k):
    state = states[c]
    for t in range(num_steps):
      state, metrics = single(state, teacher_vars, {"image": images[t, c]}, keys[c], active[t, c])
      ref_losses[t, c] = float(metrics["loss"])
      if t == 0:
        ref_after_1.append(jax.device_get(state))
    reference.append(jax.device_get(state))

  devices = jax.devices()
  variants = {  # (loop, mesh, slots per device)
    "unroll_3dev": ("unroll", parallel.make_mesh(k), 1),
    "unroll_2dev_padded": ("unroll", parallel.make_mesh(k, devices=devices[:2]), 2),
    "vmap_2x2_data_axis": ("vmap", parallel.make_mesh(k, data_axis_size=2), 2),
  }
  out = {"device_count": len(devices), "variants": {}}
  finals = {}
  for name, (loop, mesh, per_device) in variants.items():
    slots = parallel.num_slots(mesh, per_device)
    rngs = np.stack(keys + [np.zeros(2, np.uint32)] * (slots - k))
    padded = states + [states[0]] * (slots - k)  # padding = a fresh state, as the trainer does
    stacked = parallel.put_stacked(parallel.stack(padded), mesh)
    step = parallel.make_parallel_train_step(method, mesh, loop)
    tv = parallel.put_replicated(teacher_vars, mesh)
    losses = np.zeros((num_steps, k))
    for t in range(num_steps):
      batch = np.zeros((slots, b, s, s, 3), np.float32)
      batch[:k] = images[t]
      act = np.zeros(slots, bool)
      act[:k] = active[t]
      stacked, metrics = step(stacked, tv, parallel.put_batch({"image": batch}, mesh), rngs, act)
      losses[t] = np.asarray(metrics["loss"])[:k]
      if t == 0:
        after_1 = jax.device_get(stacked)
      if t == num_steps - 2:
        before_last = jax.device_get(stacked)
    host = jax.device_get(stacked)
    finals[name] = host
    leaf = jax.tree.leaves(stacked.params)[0]
    out["variants"][name] = {
      "loop": loop,
      "mesh": dict(mesh.shape),
      "slots": slots,
      "state_devices": len(leaf.sharding.device_set),
      # Only active steps: 'unroll' skips an inactive slot's step (its metrics are zeros).
      "loss_rel_diff": float(np.max((np.abs(losses - ref_losses) / np.abs(ref_losses))[active])),
      "params_after_1_step": [
        diff_stats(parallel.unstack(after_1, c).params, ref_after_1[c].params, states[c].params)
        for c in range(k)
      ],
      "params": [
        diff_stats(parallel.unstack(host, c).params, reference[c].params, states[c].params)
        for c in range(k)
      ],
      "batch_stats": [
        diff_stats(
          parallel.unstack(host, c).batch_stats, reference[c].batch_stats, states[c].batch_stats
        )
        for c in range(k)
      ],
      "steps": [int(host.step[c]) for c in range(slots)],
      "inactive_untouched": tree_digest(parallel.unstack(host, 1))
      == tree_digest(parallel.unstack(before_last, 1)),
      "padding_untouched": all(
        tree_digest(parallel.unstack(host, c)) == tree_digest(states[0]) for c in range(k, slots)
      ),
    }
  out["vmap_vs_unroll"] = [
    diff_stats(
      parallel.unstack(finals["vmap_2x2_data_axis"], c).params,
      parallel.unstack(finals["unroll_3dev"], c).params,
      states[c].params,
    )
    for c in range(k)
  ]
  return out


def _resume_worker(spec):
  """One category: N epochs, then more epochs (resume), then the same again (re-evaluate)."""
  from skrd4ad_jax.training import checkpoints, parallel, train

  out = []
  make_step = parallel.make_parallel_train_step
  for epochs in spec["epochs"]:
    record = {}
    parallel.make_parallel_train_step = _counting_step_factory(record, make_step)
    config = tiny_config(
      (spec["category"],),
      spec["data_root"],
      **{"train.epochs": epochs, "train.checkpoint_every_epochs": 1},
    )
    train.train_and_evaluate(config, spec["workdir"])
    manager = checkpoints.make_manager(spec["workdir"], spec["category"], read_only=True)
    state, meta = checkpoints.restore(manager, abstract_state(config))
    out.append(
      {
        "epochs": epochs,
        "train_steps": record.get("steps", 0),
        "all_steps": sorted(manager.all_steps()),
        "state_step": int(state.step),
        "meta_step": meta["step"],
        "train_seconds": meta["train_seconds"],
        "digest": tree_digest(state.params),
        "metrics": meta["metrics"],
      }
    )
  return out


def _seeds_worker(spec):
  """Two seeds of two categories on 2 devices, then each seed alone (single-seed runs)."""
  import functools

  import jax

  from skrd4ad_jax.training import parallel, train

  make_mesh = parallel.make_mesh
  base_seed = tiny_config(SEED_CATEGORIES, spec["data_root"]).seed
  runs = [
    ("seeds", 2, base_seed, 2, {"eval.save_pictures": True, "train.tensorboard": True}),
    ("seed_0_alone", 1, base_seed, 1, {}),
    ("seed_1_alone", 1, base_seed + 1, 1, {}),
  ]
  for name, seeds, seed, devices, extra in runs:
    parallel.make_mesh = functools.partial(make_mesh, devices=jax.devices()[:devices])
    try:
      config = tiny_config(SEED_CATEGORIES, spec["data_root"], **{"train.seeds": seeds, **extra})
      config.seed = seed
      train.train_and_evaluate(config, os.path.join(spec["base"], name))
    finally:
      parallel.make_mesh = make_mesh
  return {}


WORKERS = {
  "train": _train_worker,
  "step": _step_worker,
  "resume": _resume_worker,
  "seeds": _seeds_worker,
}


def cpu_env(num_devices, **extra):
  """The environment of a subprocess with ``num_devices`` simulated CPU devices."""
  flags = os.environ.get("XLA_FLAGS", "")
  return dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    TF_CPP_MIN_LOG_LEVEL="2",
    XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={num_devices}".strip(),
    PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
    **extra,
  )


def run_worker(kind, spec, tmp_path, cache_dir, num_devices=NUM_DEVICES, timeout=900):
  """Runs ``WORKERS[kind](spec)`` in a subprocess with ``num_devices`` CPU devices."""
  spec = {
    **spec,
    "kind": kind,
    "cache_dir": cache_dir,
    "output": str(tmp_path / f"{kind}_result.json"),
  }
  spec_path = tmp_path / f"{kind}_spec.json"
  spec_path.write_text(json.dumps(spec))
  proc = subprocess.run(
    [sys.executable, os.path.abspath(__file__), str(spec_path)],
    cwd=REPO,
    env=cpu_env(num_devices),
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  assert proc.returncode == 0, (
    f"{kind} worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
  )
  with open(spec["output"]) as f:
    return json.load(f)


def _main(spec_path):
  with open(spec_path) as f:
    spec = json.load(f)
  _enable_compilation_cache(spec["cache_dir"])
  result = WORKERS[spec["kind"]](spec)
  with open(spec["output"], "w") as f:
    json.dump(result, f, indent=1)


# -- fixtures ---------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("xla_cache"))


def make_data_root(tmp_path_factory):
  """A 64 px demo tree whose categories have 11 / 8 / 5 normal training images."""
  from skrd4ad_jax.data import demo_data

  root = demo_data.ensure_demo_dataset(
    str(tmp_path_factory.mktemp("parallel_data") / "demo"),
    seed=0,
    image_size=64,
    num_train=max(NUM_TRAIN.values()),
    num_test_good=2,
    num_test_per_defect=1,
  )
  for category, keep in NUM_TRAIN.items():
    for path in sorted(glob.glob(os.path.join(root, category, "train", "good", "*.png")))[keep:]:
      os.remove(path)
  return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  return make_data_root(tmp_path_factory)


# -- tests ------------------------------------------------------------------


@pytest.mark.slow
def test_parallel_run_equals_categories_trained_alone(data_root, cache_dir, tmp_path):
  """3 jobs of different lengths, in slots of their own or queued, = each alone."""
  runs = [
    ["parallel", list(CATEGORIES), 0, 1],  # 3 devices, one job each
    # 2 devices, one slot each: a job is cut in two (continued in the other slot)
    # and another starts mid-run in a freed slot.
    ["queued", list(CATEGORIES), 2, 1],
    ["padded", list(CATEGORIES), 2, 2],  # 2 devices x 2 slots: one slot has no job
  ]
  runs += [[f"alone_{c}", [c], 0, 1] for c in CATEGORIES]
  out = run_worker(
    "train", {"runs": runs, "data_root": data_root, "base": str(tmp_path)}, tmp_path, cache_dir
  )
  print(json.dumps(out, indent=1))

  # The slot axis really is sharded over the simulated devices.
  assert out["device_count"] == NUM_DEVICES
  assert out["mesh_3"] == {"category": 3, "data": 1}
  par = out["runs"]["parallel"]
  assert par["mesh"] == {"category": 3, "data": 1} and par["loop"] == "unroll"
  assert par["state_spec"] in ("P('category',)", "PartitionSpec('category',)")
  assert par["state_devices"] == 3 and par["slots"] == 3 and par["slots_per_shard"] == [1]
  assert par["steps"] == max(EXPECTED_STEPS.values())
  queued = out["runs"]["queued"]
  assert queued["mesh"] == {"category": 2, "data": 1} and queued["slots"] == 2
  segments = [seg for queue in queued["plan"] for seg in queue]
  cut = [c for c in CATEGORIES if sum(seg[0] == c for seg in segments) == 2]
  late = [seg[0] for seg in segments if seg[1] == 0 and seg[3] > 0]
  assert cut and late, queued["plan"]  # a job in two slots; one that starts mid-run
  # Both slots busy until the last program step: ceil(27 / 2).
  assert queued["steps"] == -(-sum(EXPECTED_STEPS.values()) // 2)
  padded = out["runs"]["padded"]
  assert padded["slots"] == 4 and padded["slots_per_shard"] == [2]
  assert sum(len(q) == 0 for q in padded["plan"]) == 1
  for c in CATEGORIES:
    assert out["runs"][f"alone_{c}"]["steps"] == EXPECTED_STEPS[c]
    assert out["runs"][f"alone_{c}"]["mesh"] == {"category": 1, "data": 1}

  config = tiny_config(CATEGORIES, data_root)
  for c in CATEGORIES:
    alone_state, alone_meta = restore_final(str(tmp_path / f"alone_{c}"), c, config)
    for name in ("parallel", "queued", "padded"):
      state, meta = restore_final(str(tmp_path / name), c, config)
      assert int(state.step) == int(alone_state.step) == EXPECTED_STEPS[c], (name, c)
      assert meta["step"] == EXPECTED_STEPS[c] and meta["final"]
      # 'unroll' runs each job's own computation: bit for bit.
      assert tree_digest(state.params) == tree_digest(alone_state.params), (name, c)
      assert tree_digest(state.batch_stats) == tree_digest(alone_state.batch_stats), (name, c)
      for m in METRICS:
        assert meta["metrics"][m] == alone_meta["metrics"][m], (name, c, m)
      assert meta["thresholds"]["image_threshold"] == alone_meta["thresholds"]["image_threshold"]
  for name in ("parallel", "queued", "padded"):
    with open(tmp_path / name / "results.csv", newline="") as f:
      rows = [r["category"] for r in csv.DictReader(f)]
    assert set(CATEGORIES) <= set(rows), rows
    # The idle slot has no job: nothing of it is written.
    assert sorted(
      d for d in os.listdir(tmp_path / name) if os.path.isdir(tmp_path / name / d / "checkpoints")
    ) == sorted(CATEGORIES)
  # ~1 GB of checkpoints: not worth keeping in pytest's last three base temps.
  shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.slow
def test_category_loops_match_single_step(cache_dir, tmp_path):
  """'unroll' and 'vmap' steps (with padding, a data axis, an inactive slot) = alone.

  'unroll' runs each category's own single-category computation: bit for bit the
  same parameters. 'vmap' batches the student's weights (grouped convolutions),
  so its gradients differ from the single step by float32 noise (~1e-6 of their
  scale); Adam's first updates are ``lr * g / |g|`` per element, so the few
  elements whose gradient is at the noise level move by up to ~lr in either
  direction. Measured after 3 steps (lr 5e-3), on two machines: max abs
  difference ~2e-3 to 1e-2 in 1e-4 to 1e-3 of the elements, L2 norm of the
  difference 5e-4 to 2e-3 of the distance travelled, BatchNorm statistics 2e-5
  to 1.2e-4 of theirs, losses equal to 3e-7 to 3e-5. The 'vmap' checks are
  therefore on those statistics.
  """
  out = run_worker("step", {"steps": 3}, tmp_path, cache_dir)
  print(json.dumps(out, indent=1))
  assert out["device_count"] == NUM_DEVICES
  v = out["variants"]
  assert v["unroll_3dev"]["mesh"] == {"category": 3, "data": 1}
  assert v["unroll_3dev"]["state_devices"] == 3
  assert v["unroll_2dev_padded"]["slots"] == 4
  assert v["vmap_2x2_data_axis"]["mesh"] == {"category": 2, "data": 2}
  assert v["vmap_2x2_data_axis"]["state_devices"] == 4
  for name, r in v.items():
    # Category 1 sat out the last step; padded slots never step.
    assert r["steps"][:3] == [3, 2, 3], name
    assert all(s == 0 for s in r["steps"][3:]), name
    assert r["inactive_untouched"] and r["padding_untouched"], name
    if r["loop"] == "unroll":
      assert r["loss_rel_diff"] == 0.0, name
      for key in ("params", "batch_stats"):
        assert max(d["max_abs"] for d in r[key]) == 0.0, (name, key, r[key])
    else:
      assert r["loss_rel_diff"] <= 1e-4, name
      for d in r["params"]:
        assert d["rel_l2"] <= 1e-2 and d["frac_over_1e-4"] <= 2e-3, (name, r["params"])
      for d in r["batch_stats"]:
        assert d["rel_l2"] <= 1e-3, (name, r["batch_stats"])
  for d in out["vmap_vs_unroll"]:
    assert d["rel_l2"] <= 1e-2 and d["frac_over_1e-4"] <= 2e-3, out["vmap_vs_unroll"]


@pytest.mark.slow
def test_resume_continues_and_finished_run_only_reevaluates(data_root, cache_dir, tmp_path):
  """More epochs resume from the last checkpoint; a finished run is only re-evaluated."""
  category = "gravel"  # 4 training images: 2 steps per epoch at batch 2
  out = run_worker(
    "resume",
    {
      "category": category,
      "epochs": [2, 3, 3],
      "data_root": data_root,
      "workdir": str(tmp_path / "run"),
    },
    tmp_path,
    cache_dir,
    num_devices=1,
  )
  print(json.dumps(out, indent=1))
  first, resumed, again = out
  assert first["train_steps"] == 4 and first["state_step"] == 4
  assert first["all_steps"] == [2, 4]
  # Resumed at step 4: only the 2 missing steps ran; the final checkpoint is at 6.
  assert resumed["train_steps"] == 2
  assert resumed["state_step"] == resumed["meta_step"] == 6
  assert resumed["all_steps"] == [4, 6]
  assert resumed["train_seconds"] > first["train_seconds"]
  # Finished: no training step, same state, same metrics.
  assert again["train_steps"] == 0
  assert again["state_step"] == 6 and again["all_steps"] == [4, 6]
  assert again["digest"] == resumed["digest"]
  assert again["train_seconds"] == resumed["train_seconds"]
  for m in METRICS:
    assert again["metrics"][m] == pytest.approx(resumed["metrics"][m], abs=1e-6), m


@pytest.mark.slow
def test_seed_k_of_a_multi_seed_run_is_the_single_seed_run_with_seed_plus_k(
  data_root, cache_dir, tmp_path
):
  run_worker("seeds", {"data_root": data_root, "base": str(tmp_path)}, tmp_path, cache_dir)
  config = tiny_config(SEED_CATEGORIES, data_root)
  seeds = tmp_path / "seeds"
  for c in SEED_CATEGORIES:
    for k in (0, 1):
      job = c if k == 0 else f"{c}/seed_{k}"
      state, meta = restore_final(str(seeds), job, config)
      alone, alone_meta = restore_final(str(tmp_path / f"seed_{k}_alone"), c, config)
      assert meta["seed"] == config.seed + k and meta["job"] == job
      assert tree_digest(state.params) == tree_digest(alone.params), job
      assert tree_digest(state.batch_stats) == tree_digest(alone.batch_stats), job
      assert meta["metrics"] == alone_meta["metrics"], job
      assert glob.glob(str(seeds / job / "events.out.tfevents.*")), job
    # predict (and export) pick a seed's model and its own stored thresholds.
    from skrd4ad_jax import predict

    for k in (0, 1):
      job = c if k == 0 else f"{c}/seed_{k}"
      predictor = predict.Predictor(str(seeds), c, seed=k)
      _, meta = restore_final(str(seeds), job, config)
      assert predictor.category == job and predictor.step == meta["step"]
      assert predictor.thresholds["image_threshold"] == meta["thresholds"]["image_threshold"]
    with pytest.raises(predict.PredictError, match="Seed 2 of"):
      predict.Predictor(str(seeds), c, seed=2)
    # Pictures of seed 0 only (by default).
    assert glob.glob(str(seeds / c / "images" / "test" / "*" / "*.png"))
    assert not os.path.exists(seeds / c / "seed_1" / "images")
  with open(seeds / "results_per_seed.csv", newline="") as f:
    per_seed = list(csv.DictReader(f))
  assert sorted((r["category"], int(r["seed"])) for r in per_seed) == sorted(
    (c, config.seed + k) for c in SEED_CATEGORIES for k in (0, 1)
  )
  with open(seeds / "results.csv", newline="") as f:
    rows = {r["category"]: r for r in csv.DictReader(f)}
  for c in SEED_CATEGORIES:
    values = [float(r["image_auroc"]) for r in per_seed if r["category"] == c]
    assert int(rows[c]["n_seeds"]) == 2
    assert float(rows[c]["image_auroc"]) == pytest.approx(np.mean(values))
    assert float(rows[c]["image_auroc_std"]) == pytest.approx(np.std(values, ddof=1))
  # The overall spread: std over seeds of the per-seed means over categories.
  per_seed_means = [
    np.mean([float(r["pixel_auroc"]) for r in per_seed if int(r["seed"]) == config.seed + k])
    for k in (0, 1)
  ]
  assert float(rows["mean"]["pixel_auroc_std"]) == pytest.approx(np.std(per_seed_means, ddof=1))
  assert "±" in (seeds / "results.md").read_text()
  shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.slow
def test_benchmark_runs_without_tensorflow(tmp_path):
  """scripts/benchmark.py on the tiny config with ``import tensorflow`` made to fail."""
  blocker = tmp_path / "no_tf"
  for name in ("tensorflow", "tensorflow_datasets", "clu"):
    (blocker / name).mkdir(parents=True)
    (blocker / name / "__init__.py").write_text(
      f"raise ImportError('{name} is blocked: the benchmark must not import it')\n"
    )
  json_path = tmp_path / "bench.json"
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    TF_CPP_MIN_LOG_LEVEL="2",
    PYTHONPATH=os.pathsep.join([str(blocker), REPO, os.environ.get("PYTHONPATH", "")]),
  )
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(REPO, "scripts", "benchmark.py"),
      "--config=configs/tiny.py",
      *[
        f"--config.{k}={v}"
        for k, v in OVERRIDES.items()
        if k.startswith(("data.", "model.", "train.batch_size"))
      ],
      "--steps=2",
      "--categories=1,2",  # the single-job step and the parallel one
      f"--json={json_path}",
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-5000:]
  result = json.loads(json_path.read_text())
  assert result["config"]["model"]["teacher"] == "resnet_micro"
  assert [r["categories"] for r in result["runs"]] == [1, 2]
  for r in result["runs"]:
    assert r["images_per_second"] > 0 and r["step_seconds"] > 0 and r["compile_seconds"] > 0
    assert r["images_per_step"] == r["categories"] * 2
  for name in ("tensorflow", "tensorflow_datasets", "clu"):
    assert name not in result["modules_loaded"]


if __name__ == "__main__":
  _main(sys.argv[1])
