"""Reference lattice attention: plain jnp, float32 accumulation. This docstring is the spec.

Queries and keys live on a grid of W threads x columns (generation steps). The grid is
flattened to one sequence of W*T queries and W*S keys per lattice head:

  q: [B, W, T, C, E]   k, v: [B, W, S, C, E]   key_valid: [B, W, S] bool
  q_cols: [T] int32 grid column of each query (default arange(T))
  k_cols: [S] int32 grid column of each key   (default arange(S))
  returns [B, W, T, C, E] in q.dtype

Query (w, t) may read key (w', s) iff key_valid[w', s] and
  causal:         k_cols[s] <= q_cols[t]                  (any thread w')
  other_threads:  k_cols[s] <= q_cols[t] and w' != w
  same_position:  k_cols[s] == q_cols[t]                  (any thread w')
(every implementation takes this table from `mask.may_attend`). Scores are scaled by
E ** -0.5 unless `scale` is given. Queries with no readable key return zeros (e.g.
`other_threads` at W = 1). Columns count lockstep generation steps, so `causal` is exactly what
exists during decoding: a token at step t can see every thread's tokens up to t.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lace_jax.kernels.attention.reference import masked_softmax_weights
from lace_jax.kernels.lattice_attention.mask import may_attend


def lattice_mask(num_threads: int, q_cols: jax.Array, k_cols: jax.Array, key_valid: jax.Array,
                 mode: str) -> jax.Array:
  """[B, W*T, W*S] bool mask over the flattened grid (row = w * T + t, column = w' * S + s)."""
  w = num_threads
  t, s = q_cols.shape[0], k_cols.shape[0]
  q_thr, q_col = jnp.repeat(jnp.arange(w), t), jnp.tile(q_cols, w)  # [W*T]
  k_thr, k_col = jnp.repeat(jnp.arange(w), s), jnp.tile(k_cols, w)  # [W*S]
  allowed = may_attend(mode, q_thr[:, None], q_col[:, None], k_thr[None, :], k_col[None, :])
  b = key_valid.shape[0]
  return allowed[None] & key_valid.reshape(b, 1, w * s)


def validate(q, k, v, key_valid) -> None:
  """Shape checks shared by every implementation, with messages naming the shapes."""
  if q.ndim != 5:
    raise ValueError(f"q {q.shape}: expected [B, W, T, C, E]")
  b, w, t, c, e = q.shape
  s = k.shape[2] if k.ndim == 5 else -1
  if k.shape != (b, w, s, c, e) or v.shape != k.shape:
    raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape}: expected q = [B, W, T, C, E] and "
                     "k = v = [B, W, S, C, E]")
  if key_valid.shape != (b, w, s):
    raise ValueError(f"key_valid {key_valid.shape}: expected [B, W, S] = {(b, w, s)}")


def lattice_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *,
                                key_valid: jax.Array, mask: str = "causal",
                                q_cols: jax.Array | None = None,
                                k_cols: jax.Array | None = None,
                                scale: float | None = None) -> jax.Array:
  validate(q, k, v, key_valid)
  b, w, t, c, e = q.shape
  s = k.shape[2]
  q_cols = jnp.arange(t, dtype=jnp.int32) if q_cols is None else q_cols
  k_cols = jnp.arange(s, dtype=jnp.int32) if k_cols is None else k_cols
  scale = e**-0.5 if scale is None else scale
  qf = q.reshape(b, w * t, c, e)  # [B, W*T, C, E]
  kf = k.reshape(b, w * s, c, e)  # [B, W*S, C, E]
  vf = v.reshape(b, w * s, c, e)
  scores = jnp.einsum("BQCE,BKCE->BCQK", qf, kf, preferred_element_type=jnp.float32) * scale
  allowed = lattice_mask(w, q_cols, k_cols, key_valid, mask)  # [B, W*T, W*S]
  probs = masked_softmax_weights(scores, allowed[:, None])  # [B, C, W*T, W*S]
  out = jnp.einsum("BCQK,BKCE->BQCE", probs, vf.astype(jnp.float32))
  return out.reshape(b, w, t, c, e).astype(q.dtype)
