"""The tree stays in one style: ruff's linter and formatter (pyproject.toml) pass."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ruff(*args):
  return subprocess.run(
    [sys.executable, "-m", "ruff", *args], cwd=REPO, capture_output=True, text=True, check=False
  )


def test_ruff_lint_passes():
  proc = ruff("check", ".")
  assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_format_is_applied():
  proc = ruff("format", "--check", ".")
  assert proc.returncode == 0, "run `make format`:\n" + proc.stdout + proc.stderr
