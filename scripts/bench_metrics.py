r"""Times the host-side metrics on a realistic synthetic MVTec-like category.

100 test images of 256x256, 60 of them anomalous with 1-5 elliptical defects of
several sizes; anomaly maps = Gaussian-smoothed noise plus a smoothed signal
inside the defects (float32, like the model's output). Prints the median of a
few repeats per metric and, with --json, writes them to a file.

  python scripts/bench_metrics.py
  python scripts/bench_metrics.py --repeats=7 --json=/tmp/bench_metrics.json
  python scripts/bench_metrics.py --sklearn   # also time sklearn's AUROC / AP
"""

import argparse
import json
import platform
import statistics
import time

import numpy as np
from scipy import ndimage

from skrd4ad_jax.evaluation import metrics


def make_category(num_images=100, num_anomalous=60, size=256, seed=0):
  """Returns (labels [N], masks uint8 [N, H, W], maps float32 [N, H, W])."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size].astype(np.float32)
  masks = np.zeros((num_images, size, size), dtype=np.uint8)
  for i in range(num_anomalous):
    for _ in range(rng.integers(1, 6)):
      cy, cx = rng.uniform(0, size, 2)
      ry, rx = rng.uniform(2, 30, 2)
      angle = rng.uniform(0, np.pi)
      dy, dx = yy - cy, xx - cx
      u = dy * np.cos(angle) + dx * np.sin(angle)
      v = -dy * np.sin(angle) + dx * np.cos(angle)
      masks[i] |= ((u / ry) ** 2 + (v / rx) ** 2 <= 1).astype(np.uint8)
  noise = rng.standard_normal((num_images, size, size)).astype(np.float32)
  maps = ndimage.gaussian_filter(noise, sigma=(0, 4, 4)) * 8.0
  signal = ndimage.gaussian_filter(masks.astype(np.float32), sigma=(0, 2, 2))
  maps += signal * rng.uniform(0.5, 2.0, (num_images, 1, 1)).astype(np.float32)
  labels = masks.reshape(num_images, -1).max(axis=1)
  return labels, masks, maps.astype(np.float32)


def median_time(fn, repeats):
  """Times `repeats` calls after a warm-up.

  Args:
    fn: the call to time.
    repeats: number of timed calls.

  Returns:
    (median wall seconds, median CPU seconds, last result). On a shared
    machine the CPU time (the metrics run on one thread) is the steadier one.
  """
  result = fn()
  wall, cpu = [], []
  for _ in range(repeats):
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    result = fn()
    wall.append(time.perf_counter() - start_wall)
    cpu.append(time.process_time() - start_cpu)
  return statistics.median(wall), statistics.median(cpu), result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--json", default=None, help="write the figures to this file (default: print)."
  )
  parser.add_argument(
    "--sklearn",
    action="store_true",
    help="also time sklearn roc_auc_score / average_precision_score on the same pixels.",
  )
  args = parser.parse_args()

  labels, masks, maps = make_category(seed=args.seed)
  scores = maps.reshape(len(maps), -1).max(axis=1)
  cases = {
    "pixel_aupro (mvtec)": lambda: metrics.aupro(masks, maps),
    "pixel_aupro_rd4ad": lambda: metrics.aupro(masks, maps, protocol="rd4ad"),
    "pixel_auroc": lambda: metrics.pixel_auroc(masks, maps),
    "pixel_ap": lambda: metrics.pixel_ap(masks, maps),
    "compute_metrics (all)": lambda: metrics.compute_metrics(labels, scores, masks, maps)[
      "pixel_aupro"
    ],
  }
  if args.sklearn:
    # Imported here so that the default run needs nothing beyond the library.
    from sklearn import metrics as skm

    flat_masks, flat_maps = masks.ravel(), maps.ravel()
    cases["sklearn roc_auc_score"] = lambda: skm.roc_auc_score(flat_masks, flat_maps)
    cases["sklearn average_precision"] = lambda: skm.average_precision_score(flat_masks, flat_maps)

  rows = []
  print(
    f"{len(maps)} maps of {maps.shape[1]}x{maps.shape[2]}, "
    f"{int(labels.sum())} anomalous, median of {args.repeats}"
  )
  print(f"{'metric':<28}{'wall s':>10}{'cpu s':>10}{'value':>10}")
  for name, fn in cases.items():
    wall, cpu, value = median_time(fn, args.repeats)
    rows.append(dict(metric=name, wall_seconds=wall, cpu_seconds=cpu, value=float(value)))
    print(f"{name:<28}{wall:>10.4f}{cpu:>10.4f}{value:>10.4f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(
        dict(
          machine=platform.processor() or platform.machine(),
          num_images=len(maps),
          size=maps.shape[1],
          num_anomalous=int(labels.sum()),
          repeats=args.repeats,
          results=rows,
        ),
        f,
        indent=1,
      )
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
