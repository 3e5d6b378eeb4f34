r"""The 3x3 convolutions of the WRN50-2 student per pass: ours, lax.conv and torch.

  python scripts/bench_layers.py                    # batch 16, 256 px input
  python scripts/bench_layers.py --json=layers.json --repeats=5

For each 3x3 convolution shape of the SK-RD4AD / RD4AD student (the OCBE
bottleneck's strided ones and the decoder's), times the forward pass, the input
gradient and the kernel gradient separately (median of ``--repeats`` after a
warm-up):

- ``ours``: ``skrd4ad_jax.models.layers.conv2d`` as the trainer uses it
  (``impl='auto'``: on the CPU the forward convolution of XLA with gradients
  made of GEMMs), each pass jitted alone (XLA drops the other gradient);
- ``xla``: ``impl='xla'``, ``lax.conv`` forward and backward;
- ``torch``: ``F.conv2d`` and ``aten.convolution_backward`` with one output
  mask each (oneDNN on the CPU), in a process of its own (the test oracle of
  ``pip install -e ".[test]"``; the library never imports torch).

Each side runs in its own process, one after the other. To time an older
version of the library, run this file with ``PYTHONPATH`` pointing at that
checkout (``--sides=ours,xla``). Compare ratios within one run.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, spatial size of the input, in channels, out channels, stride) at batch 16,
# 256 px: the bottleneck's strided 3x3 convolutions, then the decoder's.
LAYERS = (
  ("bn 64x64 256->512 s2", 64, 256, 512, 2),
  ("bn 16x16 1024->1024 s2", 16, 1024, 1024, 2),
  ("bn 8x8 1024->1024", 8, 1024, 1024, 1),
  ("dec 16x16 512->512", 16, 512, 512, 1),
  ("dec 32x32 256->256", 32, 256, 256, 1),
  ("dec 64x64 128->128", 64, 128, 128, 1),
)
PASSES = ("forward", "input_grad", "kernel_grad")


def _median(fn, repeats):
  fn()  # warm-up (compiles)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def time_jax(impl, batch, repeats):
  """{layer: {pass: seconds}} for conv2d(impl)."""
  try:
    from skrd4ad_jax import host_memory

    host_memory.keep_freed_memory()  # as the trainer does, before JAX starts
  except ImportError:  # an older checkout on PYTHONPATH
    pass
  import jax
  import jax.numpy as jnp

  from skrd4ad_jax.models import layers

  conv_impl = "auto" if impl == "ours" else "xla"
  out = {}
  for name, size, cin, cout, stride in LAYERS:
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (batch, size, size, cin), jnp.float32)
    k = jax.random.normal(key, (3, 3, cin, cout), jnp.float32) * 0.05
    g = jax.random.normal(key, (batch, size // stride, size // stride, cout), jnp.float32)

    def conv(x, k, stride=stride):
      return layers.conv2d(x, k, stride, impl=conv_impl)

    passes = {
      "forward": jax.jit(conv),
      "input_grad": jax.jit(lambda x, k, g, conv=conv: jax.vjp(lambda x: conv(x, k), x)[1](g)[0]),
      "kernel_grad": jax.jit(lambda x, k, g, conv=conv: jax.vjp(lambda k: conv(x, k), k)[1](g)[0]),
    }
    args = {"forward": (x, k), "input_grad": (x, k, g), "kernel_grad": (x, k, g)}
    out[name] = {
      p: _median(lambda f=passes[p], a=args[p]: f(*a).block_until_ready(), repeats) for p in PASSES
    }
    print(f"{impl:6s} {name:26s} " + " ".join(f"{out[name][p]:7.3f}" for p in PASSES), flush=True)
  return out


def time_torch(batch, repeats):
  """{layer: {pass: seconds}} for torch's CPU convolution."""
  import torch
  import torch.nn.functional as F

  torch.manual_seed(0)
  out = {}
  with torch.no_grad():
    for name, size, cin, cout, stride in LAYERS:
      x = torch.randn(batch, cin, size, size)
      w = torch.randn(cout, cin, 3, 3) * 0.05
      g = torch.randn(batch, cout, size // stride, size // stride)

      def backward(mask, x=x, w=w, g=g, stride=stride):
        return torch.ops.aten.convolution_backward(
          g, x, w, None, [stride] * 2, [1, 1], [1, 1], False, [0, 0], 1, mask
        )

      passes = {
        "forward": lambda x=x, w=w, stride=stride: F.conv2d(x, w, stride=stride, padding=1),
        "input_grad": lambda backward=backward: backward([True, False, False]),
        "kernel_grad": lambda backward=backward: backward([False, True, False]),
      }
      out[name] = {p: _median(passes[p], repeats) for p in PASSES}
      print(f"torch  {name:26s} " + " ".join(f"{out[name][p]:7.3f}" for p in PASSES), flush=True)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--sides", default="ours,xla,torch", help="comma-separated: ours, xla, torch")
  parser.add_argument("--json", default=None, help="also write the figures to this file")
  parser.add_argument("--side", default=None, help=argparse.SUPPRESS)  # a child: one side
  args = parser.parse_args()
  if args.side:
    figures = (
      time_torch(args.batch, args.repeats)
      if args.side == "torch"
      else time_jax(args.side, args.batch, args.repeats)
    )
    print(json.dumps(figures), flush=True)
    return
  sides = [s.strip() for s in args.sides.split(",") if s.strip()]
  unknown = set(sides) - {"ours", "xla", "torch"}
  if unknown:
    parser.error(f"unknown sides {sorted(unknown)}: expected ours, xla, torch.")
  print(f"seconds per call, batch {args.batch}, median of {args.repeats}: " + "  ".join(PASSES))
  results = {}
  for side in sides:
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", REPO)
    proc = subprocess.run(
      [sys.executable, os.path.abspath(__file__), f"--side={side}"]
      + [f"--batch={args.batch}", f"--repeats={args.repeats}"],
      stdout=subprocess.PIPE,
      text=True,
      env=env,
      check=True,
    )
    lines = proc.stdout.strip().splitlines()
    print("\n".join(lines[:-1]), flush=True)
    results[side] = json.loads(lines[-1])
  if "ours" in results and "torch" in results:
    for name, *_ in LAYERS:
      ratios = "  ".join(
        f"{p} {results['torch'][name][p] / results['ours'][name][p]:.2f}x" for p in PASSES
      )
      print(f"torch / ours  {name:26s} {ratios}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(
        dict(
          machine=platform.processor() or platform.machine(),
          cpu_count=os.cpu_count(),
          load_average=os.getloadavg(),
          batch=args.batch,
          repeats=args.repeats,
          layers=[dict(zip(("name", "size", "cin", "cout", "stride"), layer)) for layer in LAYERS],
          seconds=results,
        ),
        f,
        indent=1,
      )
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
