"""One writer per workdir: a lock that a second run meets at once, and a dead run leaves none.

  with workdir_lock.hold(workdir):
    train.train_and_evaluate(config, workdir)

The lock is ``fcntl.flock`` on ``<workdir>/.skrd4ad.lock``: the kernel releases
it when the holding process ends, however it ends (SIGKILL, a lost VM), so a
lock left by a killed run never blocks the next one. The file itself only
carries the holder's pid, host, start time and command for the message; it is
never deleted (deleting it would let a third run lock a new file while a
second one still holds the old one). With several processes only process 0
takes it (``main.py``). On a file system without locks (some FUSE mounts) the
run goes on with a warning.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import datetime
import errno
import fcntl
import json
import os
import shlex
import socket
import sys

from absl import logging

LOCK_FILE = ".skrd4ad.lock"

# Workdirs this process holds: a nested hold (evaluation inside a training
# run, tests) is a no-op instead of a conflict with itself.
_held: dict[str, int] = {}


class WorkdirInUseError(RuntimeError):
  """Another live process holds the workdir; the message names it and the fix."""


def _holder_description(text: str) -> str:
  try:
    info = json.loads(text)
  except ValueError:
    return "another process (it has not written its name yet)"
  parts = [f"pid {info.get('pid', '?')} on host {info.get('host', '?')}"]
  if info.get("started"):
    parts.append(f"started {info['started']}")
  description = ", ".join(parts)
  if info.get("command"):
    description += f": {info['command']}"
  return description


def _holder_record() -> str:
  return json.dumps(
    {
      "pid": os.getpid(),
      "host": socket.gethostname(),
      "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
      "command": shlex.join([os.path.basename(sys.executable), *sys.argv]),
    }
  )


def _cannot_write(workdir: str, e: OSError) -> OSError:
  return OSError(
    f"Cannot write to the workdir {workdir!r} ({e.strerror}). Choose another "
    "directory with --workdir=DIR or fix its permissions."
  )


def ensure_writable(workdir: str) -> str:
  """Creates ``workdir`` and proves it is writable; returns it absolute.

  Raises:
    OSError: it cannot be created or written (the message says how to fix it).
  """
  workdir = os.path.abspath(os.path.expanduser(workdir))
  try:
    os.makedirs(workdir, exist_ok=True)
    # One probe per process: several processes may share the workdir.
    probe = os.path.join(workdir, f".write_test.{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise _cannot_write(workdir, e) from e
  return workdir


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[str]:
  """Holds ``workdir`` for this process; creates it if needed.

  Args:
    workdir: the run's directory.

  Yields:
    The absolute workdir.

  Raises:
    WorkdirInUseError: another live process holds it (pid, host, start time,
      command in the message).
    OSError: the workdir cannot be created or written (the message says how
      to fix it).
  """
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if workdir in _held:
    yield workdir
    return
  path = os.path.join(workdir, LOCK_FILE)
  try:
    os.makedirs(workdir, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
  except OSError as e:
    raise _cannot_write(workdir, e) from e
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      locked = True
    except BlockingIOError:
      with open(path, encoding="utf-8", errors="replace") as f:
        holder = _holder_description(f.read())
      raise WorkdirInUseError(
        f"The workdir {workdir} is in use by another run ({holder}). Wait for it to "
        "finish or stop it, or choose another --workdir=DIR."
      ) from None
    except OSError as e:
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        raise
      # A file system without locks: two runs here would not be stopped.
      logging.warning(
        "The file system of %s does not support locks (%s): nothing stops a second "
        "run on this workdir.",
        workdir,
        e.strerror,
      )
      locked = False
    os.ftruncate(fd, 0)
    os.pwrite(fd, _holder_record().encode(), 0)
    _held[workdir] = fd
    try:
      yield workdir
    finally:
      del _held[workdir]
      os.ftruncate(fd, 0)  # A finished run is no one's holder.
      if locked:
        fcntl.flock(fd, fcntl.LOCK_UN)
  finally:
    os.close(fd)
