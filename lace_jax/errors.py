"""Errors whose message says all a user needs: the cause, where it happened, what to do.

`python -m lace_jax.main` prints a `RunError` as one `error: ...` line (no traceback) and exits
1; library callers catch it like any RuntimeError.
"""

from __future__ import annotations


class RunError(RuntimeError):
  """A run stopped for a reason its message states in full (printed without a traceback)."""
