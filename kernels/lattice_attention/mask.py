"""The lattice mask modes: the one definition every lattice kernel builds its mask from.

Queries and keys live on a grid of W threads x columns (lockstep generation steps). A query at
(thread w, column t) may read a key at (thread w', column s) when

  causal:         s <= t and any thread w'
  other_threads:  s <= t and w' != w
  same_position:  s == t and any thread w'

and the key is valid (not padding, not after its thread finished); validity is left to the
callers, because each kernel holds it in its own layout (a [B, W*S] array, a loaded block, a
cache length).

`may_attend` is written with comparisons and `&` on arrays only, so the same function runs in
plain XLA (reference, xla_chunked, XLA decode) and inside the Pallas kernels (forward, backward,
decode). The kernels take the mode as a static `Mode` (an int): they specialise on it at trace
time, e.g. to skip key blocks at later columns in the causal modes.
"""

from __future__ import annotations

import enum


class Mode(enum.IntEnum):
  CAUSAL = 0
  OTHER_THREADS = 1
  SAME_POSITION = 2


MASK_MODES = tuple(m.name.lower() for m in Mode)  # ("causal", "other_threads", "same_position")


def validate_mode(mode: str | Mode) -> Mode:
  """The `Mode` of a mode name (a `Mode` passes through); ValueError for anything else."""
  if isinstance(mode, Mode):
    return mode
  if not isinstance(mode, str) or mode not in MASK_MODES:
    raise ValueError(f"lattice mask mode {mode!r}; expected one of {MASK_MODES}")
  return Mode[mode.upper()]


def may_attend(mode: str | Mode, q_thr, q_col, k_thr, k_col):
  """Bool: whether a query (thread q_thr, column q_col) may read a key (thread k_thr, column
  k_col), ignoring key validity.

  The four id arrays (or scalars) broadcast against each other, e.g. q_* [W*T, 1] and
  k_* [1, W*S] for a [W*T, W*S] mask, or q_col [B, 1, 1, 1] against k_col [W*S] for one decode
  step per batch row. `mode` is static. The result broadcasts against the full query x key
  shape but may be smaller: modes that ignore threads never read q_thr, k_thr.
  """
  mode = validate_mode(mode)
  if mode == Mode.SAME_POSITION:
    return k_col == q_col
  allowed = k_col <= q_col
  if mode == Mode.OTHER_THREADS:
    allowed = allowed & (k_thr != q_thr)
  return allowed
