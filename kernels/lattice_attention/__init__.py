"""Lattice (cross-thread) attention behind one `implementation=` switch.

`implementation`: None (auto: the best available on the current backend) or "reference".
Memory-linear chunked XLA and fused Pallas implementations join this switch, tested against
`reference.py`; until they land, asking for them raises an error naming what is available.
"""

from __future__ import annotations

import jax

from kernels.lattice_attention.reference import MASK_MODES, lattice_attention_reference, lattice_mask

IMPLEMENTATIONS = ("reference",)
PLANNED = ("xla_chunked", "pallas")


def lattice_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, key_valid: jax.Array,
                      mask: str = "causal", q_cols: jax.Array | None = None,
                      k_cols: jax.Array | None = None, scale: float | None = None,
                      implementation: str | None = None) -> jax.Array:
  """Cross-thread attention over the flattened W*T grid; see `reference.py` for the spec.

  q: [B, W, T, C, E], k/v: [B, W, S, C, E], key_valid: [B, W, S] -> [B, W, T, C, E].
  """
  impl = implementation or "reference"
  if impl in PLANNED:
    raise NotImplementedError(f"lattice attention implementation {impl!r} is not available yet;"
                              f" available: {IMPLEMENTATIONS}")
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"lattice attention implementation={impl!r}; available: {IMPLEMENTATIONS}")
  return lattice_attention_reference(q, k, v, key_valid=key_valid, mask=mask, q_cols=q_cols,
                                     k_cols=k_cols, scale=scale)


__all__ = ["IMPLEMENTATIONS", "MASK_MODES", "lattice_attention", "lattice_attention_reference",
           "lattice_mask"]
