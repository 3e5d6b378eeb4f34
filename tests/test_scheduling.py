"""`make test`'s scheduling: a listed module's tests share one pytest-xdist worker."""

import os
import re
import subprocess
import sys

from conftest import ONE_WORKER_MODULES, REPO, scope_of

# Four quick tests of test_core.py (whose module fixture trains a model).
QUICK_CORE_TESTS = "basic_block_layout or skip_wiring or deconv_equals or losses_against"


def test_every_listed_module_exists_and_is_one_unit():
  for module in ONE_WORKER_MODULES:
    assert os.path.isfile(os.path.join(REPO, module)), module
    assert scope_of(f"{module}::test_a[0]") == scope_of(f"{module}::test_b") == module
  other = "tests/test_metrics.py::test_a"
  assert scope_of(other) == other


def test_a_listed_module_runs_in_one_worker():
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "pytest",
      "-n",
      "2",
      "--dist",
      "loadgroup",
      "-v",
      "-p",
      "no:cacheprovider",
      "tests/test_core.py",
      "-k",
      QUICK_CORE_TESTS,
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  workers = re.findall(r"\[(gw\d+)\] \[\s*\d+%\] PASSED tests/test_core.py::", proc.stdout)
  assert len(workers) == 4 and len(set(workers)) == 1, proc.stdout[-3000:]
