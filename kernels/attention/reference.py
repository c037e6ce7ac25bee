"""Reference grouped-query attention: plain jnp, float32 softmax. This docstring is the spec.

  q: [B, T, N, H]   k, v: [B, S, K, H]   mask: [B, T, S] bool (True = query t may see key s)
  returns [B, T, N, H] in q.dtype

Query head n reads kv head n // G with G = N / K (Hugging Face `repeat_kv` order). Scores are
scaled by `scale` (default H ** -0.5). A query row with no visible key returns zeros, and its
gradient is zero, so fully padded rows are harmless.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite: keeps exp() and its gradient NaN-free on fully masked rows


def masked_softmax_weights(scores: jax.Array, mask: jax.Array) -> jax.Array:
  """Softmax over the last axis restricted to `mask`; all-masked rows give zeros (float32)."""
  scores = jnp.where(mask, scores.astype(jnp.float32), NEG_INF)
  m = jnp.max(scores, axis=-1, keepdims=True)
  p = jnp.exp(scores - jax.lax.stop_gradient(m)) * mask
  denom = jnp.sum(p, axis=-1, keepdims=True)
  return p / jnp.where(denom == 0, 1.0, denom)


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                        scale: float | None = None) -> jax.Array:
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  if n % kv_heads:
    raise ValueError(f"query heads N={n} must be a multiple of kv heads K={kv_heads}")
  if k.shape != v.shape or k.shape[0] != b or k.shape[3] != h:
    raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape}: expected k = v = [B, S, K, H]")
  if mask.shape != (b, t, k.shape[1]):
    raise ValueError(f"mask {mask.shape}: expected [B, T, S] = {(b, t, k.shape[1])}")
  scale = h**-0.5 if scale is None else scale
  qg = q.reshape(b, t, kv_heads, n // kv_heads, h)  # [B, T, K, G, H]
  scores = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32) * scale
  probs = masked_softmax_weights(scores, mask[:, None, None, :, :])  # [B, K, G, T, S]
  out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v.astype(jnp.float32))
  return out.reshape(b, t, n, h).astype(q.dtype)
