"""Host work off the training loop, and stop requests (SIGTERM / SIGINT) the loop polls.

``HostWork`` runs evaluations' host part (metrics, pictures, files) and
checkpoint writes in one background thread with one process, in submission
order; with several processes inline, since checkpoint writes are collective
and every process must reach them at the same step. No exception of the
background work is lost: every submitted piece is kept until it is waited for,
``wait`` re-raises the first failure, and leaving the ``with`` block waits for
everything (re-raising the first failure, or, when the loop itself failed,
logging the host failures and noting them on the loop's exception).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent import futures
import signal
import threading

from absl import logging

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(RuntimeError):
  """Training stopped on a signal after checkpointing every job in a slot."""

  def __init__(self, signum: int, message: str):
    super().__init__(message)
    self.signum = signum


class StoppedAtOnce(KeyboardInterrupt):
  """A second stop signal: the run ends now, without a last checkpoint.

  A ``KeyboardInterrupt`` so that no ``except Exception`` on the way catches it.
  Checkpoints are written to a temporary folder and renamed when complete, so
  the newest complete one stays as it is; a write still in flight is dropped.
  """

  def __init__(self, signum: int):
    name = signal.Signals(signum).name
    super().__init__(
      f"Stopped at once by a second {name}: the work since the newest complete checkpoint "
      "is lost. Rerun the same command to resume from that checkpoint."
    )
    self.signum = signum


class HostWork:
  """Host-side work in submission order: a background thread (one process) or inline."""

  def __init__(self, background: bool):
    self._pool = futures.ThreadPoolExecutor(1, "host-work") if background else None
    # Every submitted piece until it is waited for: (job name, future), in order.
    self._pending: list[tuple[str, futures.Future]] = []

  def submit(self, job_name: str, fn: Callable[[], None]) -> None:
    """Runs ``fn`` for ``job_name`` after the work submitted before it."""
    if self._pool is None:
      fn()
      return
    self._pending.append((job_name, self._pool.submit(fn)))

  def wait(self, job_name: str | None = None) -> None:
    """Waits for ``job_name``'s work (or all of it); re-raises the first failure."""
    waited = [f for name, f in self._pending if job_name in (None, name)]
    self._pending = [(name, f) for name, f in self._pending if job_name not in (None, name)]
    failures = [e for e in (f.exception() for f in waited) if e is not None]
    for later in failures[1:]:
      logging.error("Host work also failed: %r", later, exc_info=later)
    if failures:
      raise failures[0]

  def __enter__(self) -> HostWork:
    return self

  def _abandon(self) -> None:
    """Stop now: nothing queued starts, nothing running is waited for."""
    for _, future in self._pending:
      future.cancel()
    self._pending = []
    if self._pool is not None:
      self._pool.shutdown(wait=False, cancel_futures=True)

  def __exit__(self, exc_type, exc, tb) -> bool:
    if isinstance(exc, StoppedAtOnce):
      self._abandon()
      return False
    abandoned = False
    try:
      if exc is None:
        self.wait()
      else:
        # The loop's exception goes on; the host work's failures are told, not dropped.
        for name, future in self._pending:
          failure = future.exception()
          if failure is not None:
            logging.error("[%s] host work failed: %r", name, failure, exc_info=failure)
            exc.add_note(f"[{name}] host work failed as well: {failure!r}")
        self._pending = []
    except StoppedAtOnce:
      # A second stop signal while the last host work is waited for (``StopRequest``
      # encloses this block): as in the loop, the write in flight is dropped.
      abandoned = True
      self._abandon()
      raise
    finally:
      if self._pool is not None and not abandoned:
        self._pool.shutdown(wait=True)
    return False


class StopRequest:
  """Turns SIGTERM / SIGINT into a request the loop polls (main thread only)."""

  def __init__(self):
    self.signum: int | None = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in STOP_SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None:  # a second signal: stop now
      raise StoppedAtOnce(signum)
    self.signum = signum
    logging.warning("%s received: checkpointing at the current step", signal.Signals(signum).name)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False
