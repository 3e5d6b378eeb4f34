"""Shared fixtures: a tiny trained run, made once per test session.

``tiny_run`` writes a small MVTec-layout demo tree (64 px, 8 training images
per category) and trains ``configs/tiny.py`` on two of its categories with
``train.train_and_evaluate``: about half a minute on 2 CPU cores, paid only by the
sessions that use it, and once per session also under pytest-xdist (the first
worker that needs it makes it under a file lock; the others wait and read it).
Tests must treat the run as read-only (write into their own ``tmp_path``).

To iterate on tests without retraining, set ``SKRD4AD_TINY_RUN_DIR=DIR``: the
run is made there once and reused while ``DIR/run/results.csv`` exists (delete
``DIR`` after changing the training loop).
"""

import fcntl
import os
import shutil
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One persistent XLA compilation cache per session, for this process and every
# `python -m skrd4ad_jax.main` a test starts: the tiny model compiles once, not
# once per subprocess (about half of a tiny run's 35 s on 2 cores).
# SKRD4AD_TEST_XLA_CACHE=DIR keeps it between sessions; =off disables it.
CACHE_ENV = "SKRD4AD_TEST_XLA_CACHE"
_session_cache: list[str] = []

# The suite compiles with LLVM at -O1 on the CPU (XLA's backend default is -O3).
# Its programs are small and each is compiled once or a few times, so compiling is
# a large part of its CPU time: a cold tiny run takes 21 instead of 35 CPU-seconds,
# the whole suite 12.2 instead of 13.8 minutes (19.3 instead of 23.4 CPU-minutes).
# The level changes how kernels are optimised, not what they compute: results move
# by float32 rounding, which every parity tolerance covers, and every bit-identity
# test compares programs compiled alike. This process and every run a test starts
# inherit it through XLA_FLAGS. SKRD4AD_TEST_XLA_OPT=default keeps XLA's own level
# (the suite passes at both); an XLA_FLAGS that names a level is left alone, and
# accelerators keep their own.
OPT_ENV = "SKRD4AD_TEST_XLA_OPT"
OPT_FLAG = "--xla_backend_optimization_level"


def set_test_opt_level() -> None:
  """Adds the suite's LLVM level to ``XLA_FLAGS`` (see above) where it applies."""
  from skrd4ad_jax import host_memory

  level = os.environ.get(OPT_ENV, "1")
  flags = os.environ.get("XLA_FLAGS", "")
  if level == "default" or OPT_FLAG in flags or host_memory.accelerator_possible():
    return
  os.environ["XLA_FLAGS"] = f"{flags} {OPT_FLAG}={level}".strip()


# Modules whose tests share a costly module-scoped fixture (a trained model, every
# export, compiled estimates): with `--dist loadgroup` (make test) all tests of one
# of them run in the same worker, so the fixture is made once; every other test is
# scheduled on its own. This replaces pytest-xdist's `xdist_group` marks, which
# pytest 9 ignores (xdist 3.8 renames the items' node ids through an attribute
# pytest 9 no longer reads, so marked tests were spread over the workers).
ONE_WORKER_MODULES = ("tests/test_core.py", "tests/test_export.py", "tests/test_memory.py")


def scope_of(nodeid: str) -> str:
  """The unit of scheduling of a test: its module if listed above, else the test itself."""
  module = nodeid.split("::", 1)[0]
  return module if module in ONE_WORKER_MODULES else nodeid


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  if config.getvalue("dist") != "loadgroup":
    return None
  from xdist.scheduler import LoadScopeScheduling

  class ModuleGroupScheduling(LoadScopeScheduling):
    def _split_scope(self, nodeid: str) -> str:
      return scope_of(nodeid)

  return ModuleGroupScheduling(config, log)


def pytest_configure(config):
  # As the entry points do, before JAX starts: a step's freed buffers stay in
  # the process (skrd4ad_jax/host_memory.py).
  from skrd4ad_jax import host_memory

  host_memory.keep_freed_memory()
  set_test_opt_level()
  wanted = os.environ.get(CACHE_ENV, "")
  if wanted == "off" or "JAX_COMPILATION_CACHE_DIR" in os.environ:
    return
  if not wanted:
    wanted = tempfile.mkdtemp(prefix="skrd4ad_xla_cache_")
    _session_cache.append(wanted)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = wanted
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


def pytest_unconfigure(config):
  for path in _session_cache:
    shutil.rmtree(path, ignore_errors=True)


# The environment of a run whose checks do not depend on the decoder: Pillow gives
# tf.data's arrays (test_data_sources) without TensorFlow's import (~3 s a run).
# Runs that must meet the default decoder, tf.data, leave it out.
PILLOW = {"SKRD4AD_DECODER": "pillow"}

TINY_CATEGORIES = ("brick", "grass")


def tiny_config_path(categories=()):
  """``configs/tiny.py[:a,b]`` as ``--config=`` takes it."""
  path = os.path.join(REPO, "configs", "tiny.py")
  return f"{path}:{','.join(categories)}" if categories else path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """(config, workdir, data_root) of a finished tiny-config run.

  ``config.data.categories`` are ``TINY_CATEGORIES``; ``workdir`` holds one
  checkpoint folder per category, ``results.csv`` and the test pictures.
  """
  from skrd4ad_jax.config import load_config
  from skrd4ad_jax.data import demo_data
  from skrd4ad_jax.training import train

  cached = os.environ.get("SKRD4AD_TINY_RUN_DIR")
  if cached:
    base = cached
  else:
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
      root = root.parent  # the session's folder, shared by its workers
    base = os.path.join(str(root), "tiny_run_shared")
  os.makedirs(base, exist_ok=True)
  config = load_config(tiny_config_path(TINY_CATEGORIES))
  workdir = os.path.join(base, "run")
  with open(os.path.join(base, ".lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    data_root = demo_data.ensure_demo_dataset(
      os.path.join(base, "data"),
      seed=0,
      image_size=64,
      num_train=8,
      num_test_good=3,
      num_test_per_defect=1,
    )
    config.data.root = data_root
    if not os.path.exists(os.path.join(workdir, "results.csv")):
      shutil.rmtree(workdir, ignore_errors=True)  # what a failed attempt left
      train.train_and_evaluate(config, workdir)
  return config, workdir, data_root
