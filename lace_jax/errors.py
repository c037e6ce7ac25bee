"""Errors whose message says all a user needs: the cause, where it happened, what to do.

`python -m lace_jax.main` prints either as one `error: ...` line, with no traceback:
- `ConfigError`, exit code 2: the config (or a file or value it names) is wrong; nothing ran.
  It is a ValueError, so library callers catch it as before.
- `RunError`, exit code 1: a run stopped for a reason its message states in full (a corrupt
  checkpoint with no intact one, non-finite weights, a lost host, a full disk, ...).
"""

from __future__ import annotations


class ConfigError(ValueError):
  """A config value, or an input it names, is invalid; the message names the key (or the file
  and field), the value and what is expected."""


class RunError(RuntimeError):
  """A run stopped for a reason its message states in full (printed without a traceback)."""


class NonFiniteError(RunError, FloatingPointError):
  """A loss or the weights became NaN or infinite: the run stopped before saving them."""
