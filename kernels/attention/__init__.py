"""Backbone attention behind one switch.

`implementation`: None (auto: the best available on the current backend) or "reference".
Faster backends (cuDNN via `jax.nn.dot_product_attention`, Pallas splash on TPU) join this
switch with the same reference test; until then "reference" is the only implementation.
"""

from __future__ import annotations

import jax

from kernels.attention.reference import attention_reference

IMPLEMENTATIONS = ("reference",)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
              scale: float | None = None, implementation: str | None = None) -> jax.Array:
  """Grouped-query attention: q [B, T, N, H], k/v [B, S, K, H], mask [B, T, S] -> [B, T, N, H]."""
  impl = implementation or "reference"
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation={impl!r}; available: {IMPLEMENTATIONS}")
  return attention_reference(q, k, v, mask, scale=scale)
