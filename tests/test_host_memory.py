"""skrd4ad_jax.host_memory: with glibc, freed memory is reused without new page faults."""

import os
import subprocess
import sys
import textwrap

import pytest

from skrd4ad_jax import host_memory

# In a fresh process: 256 MiB allocated, written, freed, three times; prints whether
# malloc keeps freed memory and the minor page faults of the first and the last round.
_PROBE = textwrap.dedent(
  """
  import ctypes, resource, sys
  from skrd4ad_jax import host_memory
  kept = host_memory.keep_freed_memory()
  libc = ctypes.CDLL(None)
  libc.malloc.restype = ctypes.c_void_p
  libc.malloc.argtypes = (ctypes.c_size_t,)
  libc.free.argtypes = (ctypes.c_void_p,)
  size = 256 << 20
  faults = []
  for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    libc.free(p)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  print(kept, faults[0], faults[-1])
  """
)


def _probe(setting, **extra_env):
  env = dict(os.environ, **{host_memory.ENV: setting}, **extra_env)
  out = subprocess.run(
    [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True
  ).stdout.split()
  return out[0] == "True", int(out[1]), int(out[2])


@pytest.mark.skipif(host_memory._glibc() is None, reason="malloc options are glibc's")
def test_kept_memory_is_reused_without_page_faults():
  """'keep': the second 256 MiB buffer lands in memory already faulted in; 'system' faults again."""
  kept, first, last = _probe("keep")
  assert kept
  pages = (256 << 20) // os.sysconf("SC_PAGE_SIZE")
  assert first > pages // 2  # the first round does fault the buffer in
  assert last < pages // 20, (first, last)
  kept, first, last = _probe("system")
  assert not kept
  assert last > pages // 2, (first, last)  # glibc unmapped it and faults it in again


@pytest.mark.skipif(host_memory._glibc() is None, reason="malloc options are glibc's")
def test_auto_keeps_on_a_cpu_only_host_and_not_where_an_accelerator_may_start():
  assert _probe("auto", JAX_PLATFORMS="cpu")[0]
  assert not _probe("auto", JAX_PLATFORMS="cuda")[0]
  assert not _probe("auto", JAX_PLATFORMS="tpu,cpu")[0]
  assert _probe("keep", JAX_PLATFORMS="cuda")[0]  # forced


def test_an_installed_jax_plugin_means_an_accelerator_may_start(monkeypatch):
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  real = host_memory.importlib.util.find_spec
  monkeypatch.setattr(
    host_memory.importlib.util,
    "find_spec",
    lambda name, *a: object() if name == "jax_plugins" else real(name, *a),
  )
  assert host_memory.accelerator_possible()
  monkeypatch.setenv(host_memory.ENV, "auto")
  assert not host_memory.keep_freed_memory()


def test_a_misspelt_setting_names_the_variable(monkeypatch):
  monkeypatch.setenv(host_memory.ENV, "kept")
  with pytest.raises(
    ValueError, match="SKRD4AD_HOST_MALLOC='kept': expected one of auto, keep, system"
  ):
    host_memory.keep_freed_memory()
