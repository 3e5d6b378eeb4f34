r"""Scores the non-learned colour-statistics baseline on the offline demo data.

Generates (once) the demo data set of `skrd4ad_jax.data.demo_data` and prints, per
category and per defect kind, the image AUROC and pixel AUROC of
`skrd4ad_jax.baseline.colour_statistics_baseline`. A benchmark is only useful if
this baseline does NOT solve it.

Usage:
  python scripts/demo_baseline.py [--root DIR] [--seed 0] [--window 11]
"""

import argparse
import os
import time

import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score

from skrd4ad_jax.data import demo_data
from skrd4ad_jax.evaluation import baseline


def _load_dir(path):
  files = sorted(f for f in os.listdir(path) if f.endswith(".png"))
  return files, np.stack(
    [np.asarray(Image.open(os.path.join(path, f)).convert("RGB")) for f in files]
  )


def load_category(root, category):
  """Returns train images, test images, labels, masks and defect names."""
  base = os.path.join(root, category)
  _, train = _load_dir(os.path.join(base, "train", "good"))
  images, labels, masks, kinds = [], [], [], []
  for kind in sorted(os.listdir(os.path.join(base, "test"))):
    files, imgs = _load_dir(os.path.join(base, "test", kind))
    for f, img in zip(files, imgs):
      images.append(img)
      kinds.append(kind)
      labels.append(int(kind != "good"))
      if kind == "good":
        masks.append(np.zeros(img.shape[:2], bool))
      else:
        stem = os.path.splitext(f)[0]
        m = Image.open(os.path.join(base, "ground_truth", kind, f"{stem}_mask.png"))
        masks.append(np.asarray(m) > 127)
  return (train, np.stack(images), np.asarray(labels), np.stack(masks), np.asarray(kinds))


def auroc_table(maps, labels, masks, kinds):
  """{subset: (image_auroc, pixel_auroc)} for 'all' and every defect kind.

  A defect kind's subset is that kind plus the good test images.
  """
  scores = baseline.image_scores(maps)
  out = {}
  for kind in ["all"] + sorted(set(kinds) - {"good"}):
    sel = np.ones_like(labels, bool) if kind == "all" else ((kinds == kind) | (kinds == "good"))
    img_auc = roc_auc_score(labels[sel], scores[sel])
    pix_auc = roc_auc_score(masks[sel].ravel(), maps[sel].ravel())
    out[kind] = (img_auc, pix_auc)
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--root", default=None)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--window", type=int, nargs="+", default=[11], help="one or more box sizes (pixels at 128 px)"
  )
  args = parser.parse_args(argv)

  t0 = time.time()
  root = demo_data.ensure_demo_dataset(args.root, seed=args.seed)
  print(f"data set: {root} (ready in {time.time() - t0:.1f} s)")
  for window in args.window:
    print(f"\ncolour-statistics baseline, window={window} (image AUROC / pixel AUROC)")
    header = ["category", "all"] + list(demo_data.DEFECT_KINDS)
    print(" ".join(f"{h:>14s}" for h in header))
    means = {}
    t1 = time.time()
    for category in demo_data.DEMO_CATEGORIES:
      train, test, labels, masks, kinds = load_category(root, category)
      maps = baseline.colour_statistics_baseline(train, test, window=window)
      table = auroc_table(maps, labels, masks, kinds)
      cells = [
        f"{table[k][0]:.3f}/{table[k][1]:.3f}" for k in ["all"] + list(demo_data.DEFECT_KINDS)
      ]
      print(" ".join(f"{c:>14s}" for c in [category] + cells))
      for k, v in table.items():
        means.setdefault(k, []).append(v)
    cells = [
      f"{np.mean([v[0] for v in means[k]]):.3f}/{np.mean([v[1] for v in means[k]]):.3f}"
      for k in ["all"] + list(demo_data.DEFECT_KINDS)
    ]
    print(" ".join(f"{c:>14s}" for c in ["mean"] + cells))
    print(f"(baseline time {time.time() - t1:.1f} s for 3 categories)")


if __name__ == "__main__":
  main()
