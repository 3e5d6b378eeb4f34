"""The wheel holds everything the package reads, and an installed wheel runs on its own.

The expected contents come from the source tree: every module and package
(directory with ``__init__.py``) of the top-level packages, and every non-Python
file there whose name the code mentions (``published_results.csv`` is read
through ``os.path.dirname(__file__)``). The slow test installs the wheel into a
fresh directory and trains the tiny config from there, with the source tree out
of reach, so a file that only the editable install can see fails it.
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The top-level packages setup.py ships (data_pipelines once it exists).
TOP_LEVEL = ("skrd4ad_jax", "data_pipelines")
# What a source tree may hold besides packaged files.
IGNORED_DIRS = {"__pycache__"}
IGNORED_SUFFIXES = (".pyc", ".pyo", ".so")


def package_files():
  """Relative paths of every file under the top-level packages, by kind.

  Returns:
    ``(modules, data)``: ``.py`` files, and the other files.
  """
  modules, data = [], []
  for top in TOP_LEVEL:
    for dirpath, dirnames, filenames in os.walk(os.path.join(REPO, top)):
      dirnames[:] = sorted(d for d in dirnames if d not in IGNORED_DIRS)
      for name in sorted(filenames):
        rel = os.path.relpath(os.path.join(dirpath, name), REPO).replace(os.sep, "/")
        if name.endswith(".py"):
          modules.append(rel)
        elif not name.endswith(IGNORED_SUFFIXES):
          data.append(rel)
  return modules, data


def referenced_data_files():
  """The non-Python package files whose name appears in the package's code."""
  modules, data = package_files()
  code = ""
  for rel in modules:
    with open(os.path.join(REPO, rel), encoding="utf-8") as f:
      code += f.read()
  return [rel for rel in data if re.search(r"[\"']" + re.escape(os.path.basename(rel)), code)]


def build_wheel(out_dir):
  """Builds the wheel from a clean copy of the tree (no stale build/ leaks in).

  Returns:
    The wheel's path.
  """
  src = os.path.join(out_dir, "src")
  os.makedirs(src)
  for name in ("setup.py", "README.md", "MANIFEST.in", "pyproject.toml"):
    if os.path.exists(os.path.join(REPO, name)):
      shutil.copy(os.path.join(REPO, name), src)
  for top in TOP_LEVEL:
    if os.path.isdir(os.path.join(REPO, top)):
      shutil.copytree(
        os.path.join(REPO, top),
        os.path.join(src, top),
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
      )
  dist = os.path.join(out_dir, "dist")
  proc = subprocess.run(
    [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    + ["--disable-pip-version-check", "-w", dist, src],
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  (wheel,) = glob.glob(os.path.join(dist, "skrd4ad_jax-*.whl"))
  return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  return build_wheel(str(tmp_path_factory.mktemp("wheel")))


def test_the_code_reads_data_files_and_they_exist():
  # Guards the scan below: the published numbers are read at run time.
  assert "skrd4ad_jax/evaluation/published_results.csv" in referenced_data_files()


def test_wheel_holds_every_package_module_and_data_file(wheel):
  with zipfile.ZipFile(wheel) as zf:
    names = set(zf.namelist())
  modules, _ = package_files()
  missing_modules = [m for m in modules if m not in names]
  assert not missing_modules, f"modules missing from the wheel: {missing_modules}"
  # A directory of modules without __init__.py is a namespace package that
  # find_packages skips: its modules would be missing above, say why here.
  package_dirs = sorted({os.path.dirname(m) for m in modules})
  no_init = [d for d in package_dirs if f"{d}/__init__.py" not in modules]
  assert not no_init, f"directories with modules but no __init__.py: {no_init}"
  missing_data = [d for d in referenced_data_files() if d not in names]
  assert not missing_data, (
    f"data files the code reads are missing from the wheel: {missing_data}; "
    "add their pattern to package_data in setup.py"
  )
  # Tests and development files stay out.
  assert not [n for n in names if n.startswith(("tests/", "configs/", "scripts/"))]


# Runs `python -m skrd4ad_jax.main` with the editable install's import hook
# removed (it would serve any module missing from the installed copy from the
# source tree) and records where every module of ours came from.
_RUNNER = """
import atexit, json, runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in repr(h).lower()]
sys.path_importer_cache.clear()
TOPS = {tops!r}

def record():
  files = {{n: getattr(m, "__file__", None) for n, m in list(sys.modules.items())
           if n.split(".")[0] in TOPS}}
  from skrd4ad_jax.evaluation import results
  with open({out!r}, "w") as f:
    json.dump({{"modules": files, "published": results.published_datasets()}}, f)

atexit.register(record)
sys.argv = ["skrd4ad_jax.main"] + sys.argv[1:]
runpy.run_module("skrd4ad_jax.main", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
def test_installed_wheel_trains_the_tiny_config_outside_the_tree(wheel, tmp_path):
  from skrd4ad_jax.data import demo_data

  site = tmp_path / "site"
  proc = subprocess.run(
    [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "-q"]
    + ["--target", str(site), wheel],
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  data_root = demo_data.ensure_demo_dataset(
    str(tmp_path / "data"),
    image_size=64,
    num_train=4,
    num_test_good=2,
    num_test_per_defect=1,
    crop_size=128,
  )
  cwd = tmp_path / "elsewhere"
  cwd.mkdir()
  workdir = tmp_path / "run"
  record = tmp_path / "modules.json"
  env = dict(os.environ, PYTHONPATH=str(site), TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run(
    [sys.executable, "-c", _RUNNER.format(tops=TOP_LEVEL, out=str(record))]
    + [f"--config={os.path.join(REPO, 'configs', 'tiny.py')}:brick"]
    + [f"--config.data.root={data_root}", "--config.data.dataset=mvtec_ad"]
    + ["--config.train.epochs=1", f"--workdir={workdir}"],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
    check=False,
  )
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-4000:]
  with open(record) as f:
    loaded = json.load(f)
  assert "skrd4ad_jax.training.train" in loaded["modules"]
  outside = {n: p for n, p in loaded["modules"].items() if p and not p.startswith(str(site))}
  assert not outside, f"modules imported from outside the installed copy: {outside}"
  assert "mvtec_ad" in loaded["published"]
  assert (workdir / "results.csv").exists()
  md = (workdir / "results.md").read_text()
  # The published numbers beside ours: read from the installed package data.
  assert "# Results: mvtec_ad" in md and "Published numbers:" in md
  assert "(RD4AD published)" in md


def _install_env():
  """scripts/install_env.py as a module (make setup's installer)."""
  import importlib.util

  path = os.path.join(REPO, "scripts", "install_env.py")
  spec = importlib.util.spec_from_file_location("install_env", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_setup_passes_pip_configuration_on_to_uv():
  """uv reads no pip configuration: make setup hands on what `pip config list` shows."""
  listing = "\n".join(
    [
      ":env:.default-timeout='180'",
      ":env:.find-links='/opt/wheels'",
      "global.find-links='/elsewhere'",  # the environment wins, as in pip
      "global.extra-index-url='file:///a/simple file:///b/simple'",
      "install.index-url='https://mirror.example/simple'",
      "global.index-url='https://ignored.example/simple'",  # install wins over global
      "global.constraint='/etc/pip/constraints.txt'",
      "global.cert='/etc/ssl/certs/ca.crt'",  # not about where packages come from
    ]
  )
  translate = _install_env().uv_args_from_pip_config
  assert translate(listing) == [
    "--index-url",
    "https://mirror.example/simple",
    "--extra-index-url",
    "file:///a/simple",
    "--extra-index-url",
    "file:///b/simple",
    "--find-links",
    "/opt/wheels",
    "--constraint",
    "/etc/pip/constraints.txt",
  ]
  assert translate("") == []
