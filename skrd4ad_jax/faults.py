"""Named fault points, for tests that kill or starve a real run at a chosen moment.

``SKRD4AD_FAULT`` lists ``name:count:action`` entries separated by commas, e.g.
``SKRD4AD_FAULT=checkpoint_write:2:kill``: the second time this process reaches
``point("checkpoint_write")`` it acts. Actions:

- ``kill``: SIGKILL this process (no clean-up of any kind, as a power cut).
- ``term``: send SIGTERM to this process and go on (a polite stop request); in a
  thread other than the main one, go on after a pause of ``TERM_PAUSE_SECONDS``.
- ``oserror``: raise ``OSError(ENOSPC)`` naming the point's path (a full disk).
- ``readonly``: raise ``OSError(EROFS)`` naming the point's path.

Unset (every normal run), ``point`` returns at once. The points a run passes are
listed in the README ("When something is wrong") and in ``tests/test_survival.py``.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time

ENV = "SKRD4AD_FAULT"
ACTIONS = ("kill", "term", "oserror", "readonly")
TERM_PAUSE_SECONDS = 2.0

_plan: dict[str, list[tuple[int, str]]] | None = None
_counts: dict[str, int] = {}
_lock = threading.Lock()


def parse(spec: str) -> dict[str, list[tuple[int, str]]]:
  """{point name: [(count, action), ...]} of an ``SKRD4AD_FAULT`` value."""
  plan: dict[str, list[tuple[int, str]]] = {}
  for entry in filter(None, (e.strip() for e in spec.split(","))):
    name, count, action = entry.split(":")
    if action not in ACTIONS:
      raise ValueError(f"{ENV}: unknown action {action!r} in {entry!r}; one of {ACTIONS}")
    plan.setdefault(name, []).append((int(count), action))
  return plan


def _active() -> dict[str, list[tuple[int, str]]]:
  global _plan
  if _plan is None:
    _plan = parse(os.environ.get(ENV, ""))
  return _plan


def point(name: str, path: str | os.PathLike | None = None) -> None:
  """Acts as ``SKRD4AD_FAULT`` says when this is the chosen pass of point ``name``."""
  plan = _plan if _plan is not None else _active()
  if not plan or name not in plan:
    return
  with _lock:
    _counts[name] = _counts.get(name, 0) + 1
    count = _counts[name]
  for when, action in plan[name]:
    if when != count:
      continue
    where = os.fspath(path) if path is not None else name
    if action == "kill":
      os.kill(os.getpid(), signal.SIGKILL)
    elif action == "term":
      os.kill(os.getpid(), signal.SIGTERM)
      if threading.current_thread() is not threading.main_thread():
        # The main thread handles the signal; this thread's work (a checkpoint
        # write) stays in progress meanwhile, as on a slow disk, so that a test
        # sees the signal land during it and not after it.
        time.sleep(TERM_PAUSE_SECONDS)
    elif action == "oserror":
      raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected at {name})", where)
    elif action == "readonly":
      raise OSError(errno.EROFS, f"{os.strerror(errno.EROFS)} (injected at {name})", where)
