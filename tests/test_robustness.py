"""Long runs survive: the config checked up front, broken checkpoints, one writer per workdir.

Every case asserts the message the user gets and that what was written before
is intact. Nothing here trains: checkpoints are written from small states (or a
freshly initialised tiny model), and ``main`` runs in a subprocess only for its
one-line output.
"""

import glob
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

from conftest import PILLOW
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from skrd4ad_jax.config import load_config, validation
from skrd4ad_jax.data import folder
from skrd4ad_jax.teachers import recipe
from skrd4ad_jax.training import checkpoints, preflight, workdir_lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")


def tiny_config(**changes):
  """configs/tiny.py with a data root and ``changes`` ({'train.batch_size': 0, ...})."""
  cfg = load_config(TINY)
  cfg.data.root = "/data/my_line"
  for key, value in changes.items():
    section, leaf = key.split(".")
    cfg[section][leaf] = value
  return cfg


def problems_of(cfg):
  with pytest.raises(validation.ConfigError) as info:
    preflight.validate(cfg)
  assert str(info.value) == "\n".join(info.value.problems)
  return info.value.problems


def subprocess_env():
  return dict(
    os.environ,
    PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
    JAX_PLATFORMS="cpu",
    TF_CPP_MIN_LOG_LEVEL="3",
    # No subprocess here decodes an image (a run stops with an error first; the
    # others do not train).
    **PILLOW,
  )


def run_main(*args, timeout=300):
  proc = subprocess.run(
    [sys.executable, "-m", "skrd4ad_jax.main", *args],
    cwd=REPO,
    env=subprocess_env(),
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )
  return proc.returncode, proc.stdout + proc.stderr


def error_lines(out):
  return [line for line in out.splitlines() if line.startswith("error: ")]


def tree_digest(path):
  """{relative path: sha1} of every file under ``path``: proves nothing was touched."""
  out = {}
  for p in sorted(glob.glob(os.path.join(path, "**"), recursive=True)):
    if os.path.isfile(p):
      with open(p, "rb") as f:
        out[os.path.relpath(p, path)] = hashlib.sha1(f.read()).hexdigest()
  return out


# ---------------------------------------------------------------------------
# The config, checked before anything runs.


@pytest.mark.parametrize("name", ["demo", "mvtec", "visa", "vad", "folder", "tiny"])
def test_shipped_configs_are_valid(name):
  cfg = load_config(os.path.join(REPO, "configs", f"{name}.py"))
  cfg.data.root = cfg.data.root or "/data/root"
  assert preflight.problems(cfg) == []
  assert preflight.problems(recipe.resolve(cfg)) == []


@pytest.mark.parametrize(
  "changes, expected",
  [
    ({"train.batch_size": 0}, ["config.train.batch_size=0 must be >= 1"]),
    ({"train.batch_size": -1}, ["config.train.batch_size=-1 must be >= 1"]),
    ({"eval.batch_size": 0}, ["config.eval.batch_size=0 must be >= 1"]),
    (
      {"train.epochs": 0},
      ["config.train.epochs=0 trains nothing", "untrained", "config.train.num_steps > 0"],
    ),
    ({"data.image_size": 30}, ["config.data.image_size=30", "multiple of 32", "use 32"]),
    ({"data.image_size": 257}, ["config.data.image_size=257", "use 256 or 288"]),
    ({"train.learning_rate": 0.0}, ["config.train.learning_rate=0.0 must be in (0, inf]"]),
    ({"train.b2": 1.0}, ["config.train.b2=1.0 must be in [0, 1)", "0.999"]),
    ({"data.val_fraction": 1.0}, ["config.data.val_fraction=1.0 must be in [0, 1)"]),
    ({"eval.fpr_limit": 0.0}, ["config.eval.fpr_limit=0.0 must be in (0, 1]"]),
    ({"thresholds.normal_quantile": 1.0}, ["config.thresholds.normal_quantile=1.0", "(0, 1)"]),
    ({"anomaly_map.sigma": -1.0}, ["config.anomaly_map.sigma=-1.0 must be in [0, inf]"]),
    ({"model.name": "rd5ad"}, ["config.model.name='rd5ad' is not one of", "'sk_rd4ad'"]),
    ({"model.teacher": "vgg19"}, ["config.model.teacher='vgg19'", "'wide_resnet50_2'"]),
    ({"model.dtype": "float16"}, ["config.model.dtype='float16'", "'bfloat16'"]),
    ({"loss.kind": "cosine"}, ["config.loss.kind='cosine'", "'flat_cosine'"]),
    ({"anomaly_map.mode": "max"}, ["config.anomaly_map.mode='max'", "'add'"]),
    ({"anomaly_map.blur_mode": "wrap"}, ["config.anomaly_map.blur_mode='wrap'", "'mirror'"]),
    ({"anomaly_map.levels": (0, 4)}, ["config.anomaly_map.levels=(0, 4)", "subset of 1..3"]),
    ({"anomaly_map.levels": ()}, ["config.anomaly_map.levels=()", "non-empty"]),
    ({"data.source": "s3"}, ["config.data.source='s3'", "'folder'"]),
    ({"parallel.category_loop": "pmap"}, ["config.parallel.category_loop='pmap'", "'unroll'"]),
    ({"thresholds.source": "train"}, ["config.thresholds.source='train'", "'val'"]),
    (
      {"thresholds.source": "val", "data.val_fraction": 0.0},
      ["config.thresholds.source='val' needs config.data.val_fraction > 0"],
    ),
    (
      {"model.name": "mrkd", "train.cache_teacher_features": True},
      ["config.train.cache_teacher_features=True needs a method without input augmentation"],
    ),
    (
      {"parallel.category_loop": "unroll", "parallel.data_axis_size": 2},
      ["category_loop='unroll' needs config.parallel.data_axis_size=1"],
    ),
    ({"mrkd.mask_ratio": 1.0}, ["config.mrkd.mask_ratio=1.0 must be in [0, 1)"]),
    ({"rd_expert.foreground": "grabcut"}, ["config.rd_expert.foreground='grabcut'", "'otsu'"]),
    ({"train.category_epochs": "carpet=10"}, ["Cannot parse config.train.category_epochs"]),
    ({"train.category_epochs": "carpet:0"}, ["gives 'carpet' 0 epochs", "untrained"]),
    ({"model.decoder_blocks": (1, 1)}, ["config.model.decoder_blocks=(1, 1)", "three integers"]),
    ({"data.root": ""}, ["config.data.root is empty", "--config.data.root="]),
  ],
)
def test_each_mistake_is_named_with_its_fix(changes, expected):
  found = problems_of(tiny_config(**changes))
  assert len(found) == 1, found
  for words in expected:
    assert words in found[0], (words, found[0])


def test_all_problems_are_reported_at_once():
  cfg = tiny_config(**{"train.batch_size": 0, "data.image_size": 257, "loss.kind": "l2"})
  with cfg.unlocked():
    cfg.train.epoch = 3
  found = problems_of(cfg)
  assert len(found) == 4
  assert found[0].startswith("Unknown config key config.train.epoch.")
  assert "Did you mean config.train.epochs?" in found[0]
  assert any("train.batch_size=0" in p for p in found)
  assert any("image_size=257" in p for p in found)
  assert any("loss.kind='l2'" in p for p in found)


@pytest.mark.parametrize(
  "key, suggestion",
  [
    ("train.epoch", "config.train.epochs"),
    ("traning", "config.train"),
    ("eval.fpr", "config.eval.fpr_limit"),
    ("model.teacher_weight", "config.model.teacher_weights"),
    ("data.batch_size", "config.eval.batch_size or config.train.batch_size"),
  ],
)
def test_unknown_keys_say_what_was_meant(key, suggestion):
  cfg = tiny_config()
  section, _, leaf = key.rpartition(".")
  with cfg.unlocked():
    (cfg[section] if section else cfg)[leaf] = 1
  (found,) = problems_of(cfg)
  assert f"Unknown config key config.{key}. Did you mean {suggestion}?" in found
  assert "skrd4ad_jax/config/defaults.py" in found


def test_wrong_types_are_reported_once():
  cfg = ml_collections.ConfigDict(tiny_config().to_dict())  # a plain copy: no type safety
  with cfg.unlocked():
    cfg.train = ml_collections.ConfigDict(dict(cfg.train.to_dict(), batch_size="16"))
  (found,) = problems_of(cfg)
  assert found == "config.train.batch_size='16' must be an integer, not str."


def test_zero_epochs_are_fine_with_a_step_budget():
  assert preflight.problems(tiny_config(**{"train.epochs": 0, "train.num_steps": 5})) == []
  # RD with Expert counts its own iterations (config.rd_expert.num_steps).
  assert preflight.problems(tiny_config(**{"train.epochs": 0, "model.name": "rd_expert"})) == []


def test_new_fields_are_checked_when_present_and_tolerated_when_absent():
  cfg = tiny_config()
  assert "seeds" not in cfg.train or preflight.problems(cfg) == []
  with cfg.unlocked():
    cfg.train.seeds = 0
    cfg.eval.protocol = "paper"
    cfg.parallel.slots_per_device = -1
    cfg.data.host_workers = -2
  found = validation.Checks(cfg, skip=set())
  for section in preflight.SECTIONS:
    section(found)
  text = "\n".join(found.problems)
  assert "config.train.seeds=0 must be >= 1" in text
  assert "config.eval.protocol='paper'" in text
  assert "config.parallel.slots_per_device=-1 must be >= 0" in text
  assert "config.data.host_workers=-2 must be >= 0" in text


def test_image_size_rule_is_what_the_network_takes():
  """validation's multiple-of-32 rule against jax.eval_shape of a real method's step."""
  from skrd4ad_jax import methods, teachers

  for size in (48, 64, 80, 96):
    cfg = tiny_config(**{"data.image_size": size, "train.batch_size": 2})
    method = methods.build_method(cfg)
    images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    key = jax.random.PRNGKey(0)
    teacher_vars = jax.eval_shape(teachers.build_teacher(cfg.model.teacher).init, key, images)
    try:
      state = jax.eval_shape(method.init, key, teacher_vars)
      jax.eval_shape(method.train_step, state, teacher_vars, {"image": images}, key)
      jax.eval_shape(method.anomaly_maps, state, teacher_vars, images, key)
      works = True
    except TypeError:
      works = False
    assert works == (preflight.problems(cfg) == []), size


def test_unknown_category_after_the_colon_is_a_config_error():
  with pytest.raises(validation.ConfigError, match=r"Unknown categories \['bottel'\].*bottle"):
    load_config(os.path.join(REPO, "configs", "mvtec.py") + ":bottel")


# ---------------------------------------------------------------------------
# main: one line per problem, within seconds, never a traceback.


@pytest.mark.parametrize(
  "args, expected",
  [
    (
      ["--config.train.epoch=3"],
      ["error: Unknown config key --config.train.epoch. Did you mean --config.train.epochs?"],
    ),
    (
      [
        "--config.train.batch_size=0",
        "--config.train.epochs=0",
        "--config.data.image_size=257",
        "--config.eval.batch_size=0",
      ],
      [
        "error: config.train.batch_size=0 must be >= 1.",
        "error: config.train.epochs=0 trains nothing",
        "error: config.data.image_size=257 must be a positive multiple of 32",
        "error: config.eval.batch_size=0 must be >= 1.",
      ],
    ),
    (["--config.data.image_size=30"], ["error: config.data.image_size=30 must be a positive"]),
  ],
)
def test_main_prints_one_line_per_config_problem(tmp_path, args, expected):
  workdir = tmp_path / "run"
  code, out = run_main(
    f"--config={TINY}", f"--config.data.root={tmp_path}", f"--workdir={workdir}", *args
  )
  assert code == 1
  assert "Traceback" not in out
  lines = error_lines(out)
  assert len(lines) == len(expected), out
  for line, words in zip(lines, expected):
    assert words in line, (words, out)
  assert not os.path.exists(workdir)  # stopped before anything was written


def test_main_names_a_missing_config_file():
  code, out = run_main("--config=configs/tinyy.py")
  assert code == 1 and "Traceback" not in out
  (line,) = error_lines(out)
  assert "Config file not found: configs/tinyy.py" in line and "tiny.py" in line


def test_main_names_an_unknown_category_after_the_colon():
  code, out = run_main("--config=configs/mvtec.py:bottel")
  assert code == 1 and "Traceback" not in out
  (line,) = error_lines(out)
  assert "Unknown categories ['bottel']" in line and "bottle" in line


# ---------------------------------------------------------------------------
# Checkpoints: a broken latest step falls back; another model is named; writes are atomic.


def small_state(value, shape=(256, 96)):
  """Noise in [value, value + 1): incompressible, so its chunks are files of their own."""
  noise = np.random.default_rng(value).random(shape, np.float32)
  return {"params": {"w": jnp.asarray(value + noise), "b": jnp.arange(shape[-1]) * value}}


def value_of(state):
  return int(np.floor(np.asarray(state["params"]["w"])).min())


def write_steps(workdir, steps, shape=(256, 96), config=None):
  manager = checkpoints.make_manager(str(workdir), "brick")
  for step in steps:
    meta = {"step": step, "config": config or {"model": {"name": "sk_rd4ad"}}}
    checkpoints.save(manager, step, small_state(step, shape), meta)
  return manager


def abstract(shape=(256, 96)):
  return jax.eval_shape(lambda: small_state(0, shape))


def step_dir(workdir, step):
  return os.path.join(checkpoints.checkpoint_dir(str(workdir), "brick"), str(step))


def truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def remove(path):
  if os.path.isdir(path):
    import shutil

    shutil.rmtree(path)
  else:
    os.remove(path)


def truncate_array_files(step):
  files = glob.glob(os.path.join(step, "state", "ocdbt.process_*", "d", "*"))
  assert files
  for path in files:
    truncate(path)


BREAKS = {
  "truncated array data": (truncate_array_files, "arrays cannot be read"),
  "truncated manifest": (
    lambda d: truncate(os.path.join(d, "state", "manifest.ocdbt")),
    "manifest",
  ),
  "deleted manifest": (lambda d: remove(os.path.join(d, "state", "manifest.ocdbt")), "manifest"),
  "deleted state": (lambda d: remove(os.path.join(d, "state")), "state/ folder is missing"),
  "deleted meta": (lambda d: remove(os.path.join(d, "meta")), "meta/metadata is missing"),
  "truncated meta": (lambda d: truncate(os.path.join(d, "meta", "metadata")), "truncated"),
  "truncated tree metadata": (
    lambda d: truncate(os.path.join(d, "state", "_METADATA")),
    "_METADATA",
  ),
}


@pytest.mark.parametrize("case", sorted(BREAKS))
def test_broken_latest_checkpoint_falls_back_and_is_kept(tmp_path, case):
  write_steps(tmp_path, [2, 4])
  breaker, words = BREAKS[case]
  breaker(step_dir(tmp_path, 4))
  before = tree_digest(step_dir(tmp_path, 4))
  reports = []
  manager = checkpoints.make_manager(str(tmp_path), "brick", read_only=True)
  state, meta = checkpoints.restore(manager, abstract(), report=reports.append)
  assert meta["step"] == 2
  assert value_of(state) == 2
  (message,) = reports
  assert f"Checkpoint step 4 in {checkpoints.checkpoint_dir(str(tmp_path), 'brick')}" in message
  assert words in message and "trying step 2" in message and "left on disk" in message
  assert "tensorstore_spec" not in message and len(message) < 500
  assert tree_digest(step_dir(tmp_path, 4)) == before  # the broken step is left as it was
  if case in ("deleted meta", "truncated meta"):
    assert checkpoints.restore_meta(manager, report=reports.append)["step"] == 2
  else:
    assert checkpoints.restore_meta(manager)["step"] == 4  # only the state is damaged


def test_no_readable_checkpoint_means_a_fresh_start_and_a_named_step_raises(tmp_path):
  write_steps(tmp_path, [2, 4])
  for step in (2, 4):
    truncate(os.path.join(step_dir(tmp_path, step), "state", "manifest.ocdbt"))
  reports = []
  manager = checkpoints.make_manager(str(tmp_path), "brick", read_only=True)
  assert checkpoints.restore(manager, abstract(), report=reports.append) is None
  assert len(reports) == 3 and "no older checkpoint is left" in reports[1]
  assert "can be read" in reports[2]
  with pytest.raises(checkpoints.CheckpointError, match="step 4 .* cannot be read"):
    checkpoints.restore(manager, abstract(), step=4)
  assert sorted(manager.all_steps()) == [2, 4]


def test_another_model_names_the_settings_that_differ(tmp_path):
  stored = {"model": {"name": "sk_rd4ad", "oce_blocks": 0, "dtype": "float32"}, "seed": 0}
  write_steps(tmp_path, [2], shape=(4, 3), config=stored)
  before = tree_digest(tmp_path)
  current = {"model": {"name": "sk_rd4ad", "oce_blocks": 3, "dtype": "bfloat16"}, "seed": 1}
  manager = checkpoints.make_manager(str(tmp_path), "brick", read_only=True)
  with pytest.raises(checkpoints.CheckpointError) as info:
    checkpoints.restore(manager, abstract((4, 5)), config=ml_collections.ConfigDict(current))
  message = str(info.value)
  assert "holds another model than this config" in message
  assert "config.model.oce_blocks is 0 there, 3 now" in message
  assert "--config.model.oce_blocks=0" in message and "another --workdir" in message
  assert "dtype" not in message and "seed" not in message  # they do not shape the state
  assert "partial_restore" not in message and len(message.splitlines()) == 1
  # Without the config: the first array that differs, and where the stored config is.
  with pytest.raises(checkpoints.CheckpointError, match=r"params.b is \(3,\) there, \(5,\) now"):
    checkpoints.restore(manager, abstract((4, 5)))
  assert tree_digest(tmp_path) == before


def test_a_save_interrupted_midway_is_never_picked_up(tmp_path, monkeypatch):
  import orbax.checkpoint as ocp

  write_steps(tmp_path, [2])

  def killed(*args, **kwargs):
    raise KeyboardInterrupt("killed while writing the JSON item")

  monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "save", killed)
  monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "async_save", killed)
  manager = checkpoints.make_manager(str(tmp_path), "brick")
  with pytest.raises(KeyboardInterrupt):
    checkpoints.save(manager, 4, small_state(4), {"step": 4})
  monkeypatch.undo()
  leftovers = os.listdir(checkpoints.checkpoint_dir(str(tmp_path), "brick"))
  assert any("tmp" in name for name in leftovers), leftovers  # the half-written step
  manager = checkpoints.make_manager(str(tmp_path), "brick", read_only=True)
  assert manager.all_steps() == [2]
  _, meta = checkpoints.restore(manager, abstract())
  assert meta["step"] == 2


SAVER = textwrap.dedent(
  """
  import sys
  import jax.numpy as jnp
  from skrd4ad_jax.training import checkpoints
  manager = checkpoints.make_manager(sys.argv[1], "brick")
  for step in range(1, 1000):
    state = {"params": {"w": jnp.full((512, 1024), float(step)), "b": jnp.arange(1024) * step}}
    checkpoints.save(manager, step, state, {"step": step})
  """
)


def test_a_process_killed_while_saving_leaves_only_complete_steps(tmp_path):
  proc = subprocess.Popen(
    [sys.executable, "-c", SAVER, str(tmp_path)],
    env=subprocess_env(),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  try:
    deadline = time.time() + 120
    while not os.path.isdir(step_dir(tmp_path, 3)) and time.time() < deadline:
      time.sleep(0.05)
    time.sleep(0.3)  # somewhere inside a later save
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  manager = checkpoints.make_manager(str(tmp_path), "brick", read_only=True)
  steps = sorted(manager.all_steps())
  assert len(steps) >= 1
  # The newest listed step is whole: a half-written one is never listed.
  state, meta = checkpoints.restore(manager, abstract((512, 1024)), report=pytest.fail)
  assert meta["step"] == steps[-1]
  assert float(state["params"]["w"][-1, -1]) == steps[-1] == int(state["params"]["b"][1])
  # An older one may be half deleted (orbax's clean-up of old steps is not atomic):
  # then it is reported, never restored with wrong content.
  for step in steps[:-1]:
    try:
      state, meta = checkpoints.restore(manager, abstract((512, 1024)), step=step)
    except checkpoints.CheckpointError as e:
      assert f"step {step}" in str(e)
    else:
      assert float(state["params"]["w"][-1, -1]) == step == int(state["params"]["b"][1])


def test_rewriting_a_step_keeps_the_old_one_until_the_new_one_is_complete(tmp_path, monkeypatch):
  manager = write_steps(tmp_path, [2])
  checkpoints.save(manager, 2, small_state(7), {"step": 2, "rewritten": True})
  state, meta = checkpoints.restore(manager, abstract())
  assert meta["rewritten"] and value_of(state) == 7
  directory = checkpoints.checkpoint_dir(str(tmp_path), "brick")
  assert sorted(os.listdir(directory)) == ["2"]

  # Killed while the new step is written: the old one comes back.
  def killed(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(manager, "save", killed)
  with pytest.raises(KeyboardInterrupt):
    checkpoints.save(manager, 2, small_state(9), {"step": 2})
  assert sorted(os.listdir(directory)) == ["2" + checkpoints.REPLACED_SUFFIX]
  manager = checkpoints.make_manager(str(tmp_path), "brick")
  assert sorted(os.listdir(directory)) == ["2"]
  state, meta = checkpoints.restore(manager, abstract())
  assert meta["rewritten"] and value_of(state) == 7

  # Killed after the new step was complete but before the old one was deleted.
  os.rename(os.path.join(directory, "2"), os.path.join(directory, "2.replaced"))
  write_steps(tmp_path, [2])
  checkpoints.make_manager(str(tmp_path), "brick")
  assert sorted(os.listdir(directory)) == ["2"]
  state, _ = checkpoints.restore(checkpoints.make_manager(str(tmp_path), "brick"), abstract())
  assert value_of(state) == 2


# ---------------------------------------------------------------------------
# One writer per workdir.

HOLDER = textwrap.dedent(
  """
  import sys, time
  from skrd4ad_jax.training import workdir_lock
  try:
    with workdir_lock.hold(sys.argv[1]):
      print("held", flush=True)
      time.sleep(float(sys.argv[2]))
  except workdir_lock.WorkdirInUseError as e:
    print(e, flush=True)
    sys.exit(3)
  """
)


def start_holder(workdir, seconds):
  return subprocess.Popen(
    [sys.executable, "-c", HOLDER, str(workdir), str(seconds)],
    env=subprocess_env(),
    stdout=subprocess.PIPE,
    text=True,
  )


def test_second_run_on_a_workdir_stops_naming_the_holder(tmp_path):
  with workdir_lock.hold(str(tmp_path / "run")) as held:
    with workdir_lock.hold(str(tmp_path / "run")):  # the same process: no conflict
      pass
    other = start_holder(held, 0)
    out, _ = other.communicate(timeout=60)
  assert other.returncode == 3
  assert f"The workdir {held} is in use by another run (pid {os.getpid()} on host" in out
  assert "choose another --workdir" in out
  # Released: the next run gets it.
  other = start_holder(held, 0)
  assert other.communicate(timeout=60)[0].strip() == "held" and other.returncode == 0


def test_a_killed_run_does_not_block_the_next(tmp_path):
  holder = start_holder(tmp_path, 600)
  assert holder.stdout.readline().strip() == "held"
  with pytest.raises(workdir_lock.WorkdirInUseError, match=f"pid {holder.pid} on host"):
    with workdir_lock.hold(str(tmp_path)):
      pass
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  assert json.loads(open(tmp_path / workdir_lock.LOCK_FILE).read())["pid"] == holder.pid
  with workdir_lock.hold(str(tmp_path)):  # the kernel dropped the dead run's lock
    assert json.loads(open(tmp_path / workdir_lock.LOCK_FILE).read())["pid"] == os.getpid()


def test_main_refuses_a_workdir_in_use_at_once(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "results.csv").write_text("category,image_auroc\nbrick,0.9\n")
  before = tree_digest(workdir)
  with workdir_lock.hold(str(workdir)):
    code, out = run_main(
      f"--config={TINY}", f"--config.data.root={tmp_path}", f"--workdir={workdir}"
    )
    assert tree_digest(workdir) == before  # nothing written by the refused run
  assert code == 1 and "Traceback" not in out
  (line,) = error_lines(out)
  assert f"The workdir {workdir} is in use by another run (pid {os.getpid()}" in line


# ---------------------------------------------------------------------------
# No silent surprises in the data.


def write_png(path, size=8):
  from PIL import Image

  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.full((size, size, 3), 128, np.uint8)).save(path)


def test_a_folder_that_is_not_a_category_is_reported(tmp_path, caplog):
  write_png(str(tmp_path / "bottle" / "train" / "good" / "000.png"))
  write_png(str(tmp_path / "cable" / "training" / "good" / "000.png"))  # misnamed
  (tmp_path / ".cache").mkdir()
  with caplog.at_level("WARNING", logger="absl"):
    assert folder.discover_categories(str(tmp_path)) == ["bottle"]
  (record,) = [r for r in caplog.records if "not a category" in r.getMessage()]
  message = record.getMessage()
  assert str(tmp_path / "cable") in message and os.path.join("train", "good") in message


def test_predict_input_folder_is_searched_recursively(tmp_path):
  from skrd4ad_jax import predict

  test_dir = tmp_path / "brick" / "test"
  for name in ("good/000.png", "crack/000.png", "crack/001.png", "scratch/deep/000.png"):
    write_png(str(test_dir / name))
  out = test_dir / "predictions"  # a previous run's output inside the input folder
  write_png(str(out / "good_000.png"))
  found = predict.input_images(str(test_dir), str(out))
  assert [os.path.relpath(p, test_dir) for p in found] == [
    "crack/000.png",
    "crack/001.png",
    "good/000.png",
    "scratch/deep/000.png",
  ]
  assert predict.input_images(str(test_dir / "crack" / "*.png"), str(out)) == found[:2]
  with pytest.raises(folder.DatasetError, match="No image found"):
    predict.input_images(str(tmp_path / "empty*"), str(out))


def test_predict_help_says_folders_are_searched_recursively():
  proc = subprocess.run(
    [sys.executable, "-m", "skrd4ad_jax.predict", "--helpshort"],
    cwd=REPO,
    env=subprocess_env(),
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert "searched recursively" in proc.stdout + proc.stderr


# ---------------------------------------------------------------------------
# predict survives a broken latest checkpoint too.


@pytest.fixture(scope="module")
def untrained_run(tmp_path_factory):
  """A workdir with a zero state of the tiny model at steps 2 and 4 (nothing compiled)."""
  from skrd4ad_jax import methods, teachers

  workdir = str(tmp_path_factory.mktemp("untrained"))
  # A slim student (one block per stage) keeps the checkpoint small.
  cfg = recipe.resolve(tiny_config(**{"model.oce_blocks": 1, "model.decoder_blocks": (1, 1, 1)}))
  method = methods.build_method(cfg)
  key = jax.random.PRNGKey(0)
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  teacher_vars = jax.eval_shape(teachers.build_teacher(cfg.model.teacher).init, key, images)
  abstract_state = jax.eval_shape(method.init, key, teacher_vars)
  state = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract_state)
  manager = checkpoints.make_manager(workdir, "brick")
  for step in (2, 4):
    thresholds = {"image_threshold": float(step), "pixel_threshold": 1.0, "source": "val"}
    meta = {"step": step, "config": json.loads(cfg.to_json()), "thresholds": thresholds}
    checkpoints.save(manager, step, state, meta)
  return workdir


def test_predict_falls_back_to_the_newest_readable_checkpoint(untrained_run, tmp_path):
  import shutil

  from skrd4ad_jax import predict

  workdir = str(tmp_path / "run")
  shutil.copytree(untrained_run, workdir)
  truncate(os.path.join(step_dir(workdir, 4), "state", "manifest.ocdbt"))
  before = tree_digest(workdir)
  with pytest.warns(RuntimeWarning, match="Checkpoint step 4 .* cannot be read") as record:
    predictor = predict.Predictor(workdir, "brick")
  assert len([w for w in record if "step 4" in str(w.message)]) == 1
  assert predictor.step == 2 and predictor.thresholds["image_threshold"] == 2.0
  assert tree_digest(workdir) == before
  for step in (2, 4):
    remove(os.path.join(step_dir(workdir, step), "meta"))
  with pytest.warns(RuntimeWarning), pytest.raises(predict.PredictError, match="No readable"):
    predict.Predictor(workdir, "brick")


@pytest.mark.parametrize("suffix", [".npz", ".pth", ".safetensors"])
def test_main_names_a_teacher_weight_file_that_is_not_one(tmp_path, suffix):
  from skrd4ad_jax.data import demo_data

  root = demo_data.ensure_demo_dataset(
    str(tmp_path / "data"),
    seed=0,
    image_size=64,
    num_train=4,
    num_test_good=1,
    num_test_per_defect=1,
  )
  weights = tmp_path / f"resnet18{suffix}"
  weights.write_text("not weights\n")
  code, out = run_main(
    f"--config={TINY}:brick",
    f"--config.data.root={root}",
    # A teacher with published weights: each format's reader meets the file.
    "--config.model.teacher=resnet18",
    f"--config.model.teacher_weights={weights}",
    f"--workdir={tmp_path / 'run'}",
  )
  assert code == 1 and "Traceback" not in out, out
  (line,) = error_lines(out)
  assert str(weights) in line and "not a" in line, line
