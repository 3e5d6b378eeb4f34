"""The project's own error types that end a run with one line (no traceback).

A bottom module (no JAX, no TensorFlow): ``main.py`` lists these as the user's
to fix; any other ``RuntimeError`` (XLA's included) is a bug or a resource
problem and keeps its traceback.
"""


class UserError(RuntimeError):
  """A problem the user can fix, stated in one line with the fix."""


class TrainingFailed(UserError):
  """Some jobs stopped (a non-finite loss); the others finished and were written."""


class DownloadError(UserError):
  """A file could not be downloaded or is not the expected one; says what to do by hand."""
