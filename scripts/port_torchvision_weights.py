r"""Ports a torchvision ResNet checkpoint to the project's teacher format (.npz).

Usage:
  # With network: download IMAGENET1K_V1, verify its hash, port it into the cache.
  python scripts/port_torchvision_weights.py --arch wide_resnet50_2 --download
  # Offline: port a file downloaded by hand (.pth or .safetensors; neither needs torch).
  python scripts/port_torchvision_weights.py --arch wide_resnet50_2 \
      --input wide_resnet50_2-95faca4d.pth --output ~/.cache/skrd4ad_jax/teachers

The output is ``<output>/<arch>.npz``, which ``teachers.load_teacher(arch)``
finds by default when ``--output`` is the cache dir (``$SKRD4AD_CACHE/teachers``).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from skrd4ad_jax import teachers
from skrd4ad_jax.teachers import porting


def main(argv: list[str] | None = None) -> pathlib.Path:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--arch", required=True, choices=teachers.registry.TORCHVISION_TEACHERS)
  parser.add_argument("--input", help="torchvision .pth/.pt or .safetensors state dict")
  parser.add_argument(
    "--output", default=None, help="output folder (default: $SKRD4AD_CACHE/teachers)"
  )
  parser.add_argument(
    "--download",
    action="store_true",
    help="download the official IMAGENET1K_V1 checkpoint into --output",
  )
  args = parser.parse_args(argv)
  if bool(args.input) == args.download:
    parser.error("give exactly one of --input FILE and --download")
  output = pathlib.Path(args.output).expanduser() if args.output else teachers.cache_dir()
  source = (
    porting.download_torchvision_weights(args.arch, output)
    if args.download
    else pathlib.Path(args.input).expanduser()
  )
  variables = porting.torchvision_to_flax(porting.read_state_dict(source), args.arch)
  path = porting.save_teacher_variables(output / f"{args.arch}.npz", variables, args.arch)
  print(f"Ported {source} -> {path}")
  return path


if __name__ == "__main__":
  try:
    main()
  except (RuntimeError, ValueError, ImportError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
