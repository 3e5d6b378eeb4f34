"""The layer rules of ARCHITECTURE.md hold: the import-linter contracts of
pyproject.toml are kept, and every core module imports with TensorFlow, tfds and
clu blocked (as on an accelerator image without them)."""

import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str, **env) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-c", code],
    cwd=REPO,
    env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", **env},
    capture_output=True,
    text=True,
    timeout=600,
  )


def test_import_contracts_are_kept():
  """`lint-imports` (as `make lint` runs it) finds every contract kept."""
  proc = _python("from importlinter.cli import lint_imports_command; lint_imports_command()")
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-4000:]
  assert "BROKEN" not in out and "0 broken" in out, out[-4000:]
  # Every rule of ARCHITECTURE.md is a contract, not only some.
  for name in (
    "Layers:",
    "no TensorFlow, tfds or clu",
    "Deployment imports no JAX",
    "data_pipelines",
  ):
    assert name in out, out[-4000:]


def test_a_broken_rule_is_reported(tmp_path):
  """The contracts can fail: a model that imports the loop breaks the layers contract."""
  import shutil

  copy = tmp_path / "repo"
  shutil.copytree(
    REPO,
    copy,
    ignore=shutil.ignore_patterns(".venv", ".git", "runs", "tests", "*.pyc", "__pycache__"),
  )
  target = copy / "skrd4ad_jax" / "models" / "layers.py"
  target.write_text(target.read_text() + "\nfrom skrd4ad_jax.training import schedule  # noqa\n")
  proc = subprocess.run(
    [
      sys.executable,
      "-c",
      "from importlinter.cli import lint_imports_command; lint_imports_command()",
    ],
    cwd=copy,
    env={**os.environ, "PYTHONPATH": str(copy)},
    capture_output=True,
    text=True,
    timeout=600,
  )
  out = proc.stdout + proc.stderr
  assert proc.returncode != 0, out[-4000:]
  assert "skrd4ad_jax.models.layers -> skrd4ad_jax.training.schedule" in out, out[-4000:]


CORE_IMPORTS = textwrap.dedent(
  """
  import importlib, pkgutil, sys
  for name in ("tensorflow", "tensorflow_datasets", "clu"):
    sys.modules[name] = None  # `import tensorflow` raises ImportError
  import skrd4ad_jax
  # The entry points and the TensorFlow side are not core.
  skipped = ("skrd4ad_jax.main", "skrd4ad_jax.predict", "skrd4ad_jax.import_checkpoint",
             "skrd4ad_jax.export.__main__")
  names = [m.name for m in pkgutil.walk_packages(skrd4ad_jax.__path__, "skrd4ad_jax.")]
  for name in names:
    if name not in skipped:
      importlib.import_module(name)
  assert not [m for m in sys.modules if m.split(".")[0] in ("tensorflow", "clu") and sys.modules[m]]
  print("imported", len(names) - len(skipped))
  """
)


def test_core_modules_import_without_tensorflow_tfds_and_clu():
  proc = _python(CORE_IMPORTS)
  assert proc.returncode == 0, proc.stderr[-4000:]
  count = int(proc.stdout.split("imported")[-1])
  assert count >= 60, proc.stdout  # the whole package, not an early stop
