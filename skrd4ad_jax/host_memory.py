"""Host memory on the CPU backend: freed buffers stay in the process for the next step.

XLA:CPU allocates a step's buffers (activations and gradients, gigabytes for
WideResNet-50-2 at 256 px) with ``malloc`` and frees them when the step ends.
glibc serves allocations above its mmap threshold as mappings of their own and
gives them back to the kernel on ``free``, and trims the heap's free top, so
every step page-faults and zero-fills all of that memory again: on the 2-core
machine the kernel's ``clear_page_erms`` took 27 % of the training step's CPU
samples (``perf record``), and the WRN50-2 step ran at about 28 s instead of
15 s (README, Speed). ``keep_freed_memory`` tells glibc's malloc to keep what is
freed, as an accelerator's allocator does on its device:

- ``M_MMAP_MAX = 0``: no allocation gets a mapping of its own; all come from
  the heap, so a freed buffer is reused by the next step's allocation.
- ``M_TRIM_THRESHOLD = SIZE_MAX``: the heap's free top is never returned.
- ``M_ARENA_MAX = 1``: one heap for all threads (XLA's pool threads would
  otherwise each keep an arena, and their arenas are mappings again).

The price: the process's resident memory stays at its peak until it exits.
It must be set before JAX starts its backend (its thread pools): set after it,
the same step took 22.5 s. So the entry points (``main``, ``predict``, the
benchmarks) call it first, before JAX has chosen a backend, and decide from
what can be known then: ``SKRD4AD_HOST_MALLOC=auto`` (the default) keeps freed
memory only where JAX can start nothing but its CPU backend (``JAX_PLATFORMS``
names only ``cpu``, or neither a JAX plugin nor libtpu is installed). An
accelerator host keeps its system allocator: there the step's buffers are the
device allocator's, and nothing was measured. ``keep`` forces the setting,
``system`` leaves malloc alone. Other C libraries than glibc (macOS, musl) are
left as they are.
"""

from __future__ import annotations

import ctypes
from importlib import metadata
import importlib.util
import os

ENV = "SKRD4AD_HOST_MALLOC"
CHOICES = ("auto", "keep", "system")
# glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def choice() -> str:
  """``SKRD4AD_HOST_MALLOC`` (default ``auto``), checked."""
  value = os.environ.get(ENV, "auto").strip().lower() or "auto"
  if value not in CHOICES:
    raise ValueError(f"{ENV}={value!r}: expected one of {', '.join(CHOICES)}.")
  return value


def _glibc():
  """The process's C library if it is glibc (it has ``mallopt``), else None."""
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version  # noqa: B018  (raises AttributeError elsewhere)
    return libc
  except (OSError, AttributeError):
    return None


def accelerator_possible() -> bool:
  """Whether JAX may start a GPU or TPU backend in this process (before it starts)."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return any(p.strip() not in ("", "cpu") for p in platforms.split(","))
  # JAX finds accelerator backends as plugins (jax_plugins, e.g. the CUDA ones) or libtpu.
  if importlib.util.find_spec("libtpu") or importlib.util.find_spec("jax_plugins"):
    return True
  return bool(metadata.entry_points(group="jax_plugins"))


def keep_freed_memory() -> bool:
  """Makes glibc's malloc keep freed memory (module docstring); True if it now does.

  False without glibc, with ``SKRD4AD_HOST_MALLOC=system``, or with ``auto``
  where an accelerator backend may start. Call it before JAX (or torch)
  starts; safe to call more than once.
  """
  setting = choice()
  if setting == "system" or (setting == "auto" and accelerator_possible()):
    return False
  libc = _glibc()
  if libc is None:
    return False
  libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  # mallopt takes an int; glibc stores the trim threshold as a size_t, so -1 is SIZE_MAX.
  results = [
    libc.mallopt(_M_ARENA_MAX, 1),
    libc.mallopt(_M_MMAP_MAX, 0),
    libc.mallopt(_M_TRIM_THRESHOLD, -1),
  ]
  return all(r == 1 for r in results)
