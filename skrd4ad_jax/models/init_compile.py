"""Initialisation programs compile without LLVM optimisation on CPU.

A model's or a random teacher's init is one program of a few thousand small
operations (threefry rounds, the truncated normal's inverse error function),
run once per process. XLA:CPU spends most of its compile time optimising their
machine code: 4.0-8.9 s for an SK-RD4AD init (resnet_micro to WideResNet-50-2)
and 3-5 s for a random teacher's, against 1.5-4.1 s and 0.7-3.0 s at
``xla_backend_optimization_level=0``. Every process that starts cold pays it,
and so does every process but the first of a multi-process run, whose programs
the persistent compilation cache does not share.

The values are the same distribution's; the last bit of some elements may differ
from an optimised compile (measured: 1.8e-7 relative, in 20 of 210 leaves), so
runs, resumes and parallel jobs, which all initialise through here, agree bit for
bit. Accelerators keep XLA's defaults.
"""

from collections.abc import Callable
from typing import Any

import jax

CPU_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def jit_init(fn: Callable[..., Any]) -> Callable[..., Any]:
  """``jax.jit(fn)``, compiled without LLVM optimisation when the backend is the CPU."""
  options = CPU_INIT_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
  return jax.jit(fn, compiler_options=options)
