"""Lattice attention for one decoding step: each thread's new query against the lattice cache
plus the W entries written at this step.

  q:            [B, W, C, E]      this step's query of every thread
  k_cache, v_cache: [B, W*S, C, E]  keys/values of earlier steps, row w * S + s (after RoPE)
  cache_valid:  [B, W*S] bool     False for padding and for steps after a thread finished
  length:       [B] int32         columns filled so far; cache rows with s >= length are unread
  k_new, v_new: [B, W, C, E]      this step's entries (grid column = length)
  new_valid:    [B, W] bool       False for threads that have finished
  returns       [B, W, C, E]

Mask (grid columns: cache entries are earlier than this step, new entries are this step):
  causal         every valid cache entry and every valid new entry
  other_threads  the same, without the query's own thread
  same_position  the new entries only
`decode_reference` states this as the full reference with the new entries appended as column
S; the other implementations are tested against it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels.attention.reference import NEG_INF
from kernels.lattice_attention.mask import Mode, may_attend, validate_mode
from kernels.lattice_attention.pallas_gpu import check_block
from kernels.lattice_attention.reference import lattice_attention_reference


def _cache_mask(cache_valid, length, w, s):
  live = jnp.arange(s)[None, :] < length[:, None]  # [B, S]
  return cache_valid & jnp.tile(live, (1, w))


def decode_reference(q, k_cache, v_cache, cache_valid, length, k_new, v_new, new_valid, *,
                     mask="causal", scale=None):
  b, w, c, e = q.shape
  s = k_cache.shape[1] // w
  k_full = jnp.concatenate([k_cache.reshape(b, w, s, c, e), k_new[:, :, None]], axis=2)
  v_full = jnp.concatenate([v_cache.reshape(b, w, s, c, e), v_new[:, :, None]], axis=2)
  valid = jnp.concatenate([_cache_mask(cache_valid, length, w, s).reshape(b, w, s),
                           new_valid[:, :, None]], axis=2)
  out = lattice_attention_reference(q[:, :, None], k_full, v_full, key_valid=valid, mask=mask,
                                    q_cols=jnp.array([s], jnp.int32),
                                    k_cols=jnp.arange(s + 1, dtype=jnp.int32), scale=scale)
  return out[:, :, 0]


def decode_xla(q, k_cache, v_cache, cache_valid, length, k_new, v_new, new_valid, *,
               mask="causal", scale=None):
  """Direct XLA form: scores [B, C, W, W*S] against the cache and [B, C, W, W] against the
  new entries, one softmax over both."""
  b, w, c, e = q.shape
  s = k_cache.shape[1] // w
  scale = e**-0.5 if scale is None else scale
  # query and new entries sit at grid column `length`, cache row w * S + s at column s
  q_thr, q_col = jnp.arange(w)[:, None], length[:, None, None, None]  # [W, 1], [B, 1, 1, 1]
  k_thr, k_col = jnp.repeat(jnp.arange(w), s), jnp.tile(jnp.arange(s), w)  # [W*S]
  cache_ok = (may_attend(mask, q_thr, q_col, k_thr, k_col)
              & _cache_mask(cache_valid, length, w, s)[:, None, None, :])  # [B, 1, 1 or W, W*S]
  new_ok = (may_attend(mask, q_thr, q_col, jnp.arange(w), q_col)
            & new_valid[:, None, None, :])  # [B, 1, 1 or W, W]
  sc = jnp.einsum("BWCE,BKCE->BCWK", q, k_cache, preferred_element_type=jnp.float32) * scale
  sn = jnp.einsum("BWCE,BVCE->BCWV", q, k_new, preferred_element_type=jnp.float32) * scale
  sc = jnp.where(cache_ok, sc, NEG_INF)
  sn = jnp.where(new_ok, sn, NEG_INF)
  # one softmax over cache + new keys, without concatenating the cache (no per-step copy)
  m = jnp.maximum(jnp.max(sc, axis=-1, keepdims=True), jnp.max(sn, axis=-1, keepdims=True))
  pc = jnp.exp(sc - m) * cache_ok
  pn = jnp.exp(sn - m) * new_ok
  denom = jnp.sum(pc, axis=-1, keepdims=True) + jnp.sum(pn, axis=-1, keepdims=True)
  denom = jnp.where(denom == 0, 1.0, denom)
  out = (jnp.einsum("BCWK,BKCE->BWCE", pc, v_cache.astype(jnp.float32))
         + jnp.einsum("BCWV,BVCE->BWCE", pn, v_new.astype(jnp.float32)))
  return (out / jnp.moveaxis(denom, 1, 2)).astype(q.dtype)  # denom [B, C, W, 1] -> [B, W, C, 1]


def _decode_kernel(q_ref, kc_ref, vc_ref, cvalid_ref, len_ref, kn_ref, vn_ref, nvalid_ref, o_ref,
                   *, mode, scale, w, s, e, wp, ep, bk, precise):
  """One (batch, head): all W queries [Wp, Ep] against the cache, read once."""
  rows = jnp.arange(wp, dtype=jnp.int32)
  row_ok = rows < w
  dims_ok = jnp.arange(ep, dtype=jnp.int32) < e
  qmask = row_ok[:, None] & dims_ok[None, :]
  q = pltriton.load(q_ref.at[pl.ds(0, wp), pl.ds(0, ep)], mask=qmask, other=0.0)
  length = len_ref[...]
  dot = lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32,
                             precision=jax.lax.Precision.HIGHEST if precise else None)

  def update(carry, k, v, allowed):
    acc, m, l = carry
    sc = jnp.where(allowed, dot(q, k.T) * scale, NEG_INF)
    m_new = jnp.maximum(m, jnp.max(sc, axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(sc - m_new[:, None]) * allowed.astype(jnp.float32)
    return acc * alpha[:, None] + dot(p.astype(v.dtype), v), m_new, alpha * l + jnp.sum(p, 1)

  def thread_body(wk, carry):
    def block_body(j, carry):
      pos = j * bk + jnp.arange(bk, dtype=jnp.int32)
      ok = pos < jnp.minimum(length, s)
      start = wk * s + j * bk
      kv_mask = ok[:, None] & dims_ok[None, :]
      k = pltriton.load(kc_ref.at[pl.ds(start, bk), pl.ds(0, ep)], mask=kv_mask, other=0.0)
      v = pltriton.load(vc_ref.at[pl.ds(start, bk), pl.ds(0, ep)], mask=kv_mask, other=0.0)
      valid = pltriton.load(cvalid_ref.at[pl.ds(start, bk)], mask=ok, other=0) > 0
      allowed = (may_attend(mode, rows[:, None], length, wk, pos[None, :])
                 & (valid & ok)[None, :] & row_ok[:, None])
      return update(carry, k, v, allowed)

    return jax.lax.fori_loop(0, pl.cdiv(jnp.minimum(length, s), bk), block_body, carry)

  carry = (jnp.zeros((wp, ep), jnp.float32), jnp.full((wp,), NEG_INF, jnp.float32),
           jnp.zeros((wp,), jnp.float32))
  if mode != Mode.SAME_POSITION:  # every cache entry is at an earlier column than the query
    carry = jax.lax.fori_loop(0, w, thread_body, carry)
  kn = pltriton.load(kn_ref.at[pl.ds(0, wp), pl.ds(0, ep)], mask=qmask, other=0.0)
  vn = pltriton.load(vn_ref.at[pl.ds(0, wp), pl.ds(0, ep)], mask=qmask, other=0.0)
  nvalid = pltriton.load(nvalid_ref.at[pl.ds(0, wp)], mask=row_ok, other=0) > 0
  # the new entries sit at the query's own column, `length`
  allowed = (may_attend(mode, rows[:, None], length, rows[None, :], length)
             & nvalid[None, :] & row_ok[:, None])
  acc, m, l = update(carry, kn, vn, allowed)
  out = acc / jnp.where(l == 0.0, 1.0, l)[:, None]
  pltriton.store(o_ref.at[pl.ds(0, wp), pl.ds(0, ep)], out.astype(o_ref.dtype), mask=qmask)


def decode_pallas(q, k_cache, v_cache, cache_valid, length, k_new, v_new, new_valid, *,
                  mask="causal", scale=None, block_k: int = 64, interpret: bool = False):
  check_block("block_k", block_k)
  b, w, c, e = q.shape
  s = k_cache.shape[1] // w
  ep = max(16, 1 << (e - 1).bit_length())
  wp = max(16, 1 << (w - 1).bit_length())
  scale = e**-0.5 if scale is None else float(scale)
  kernel = functools.partial(_decode_kernel, mode=validate_mode(mask), scale=scale, w=w, s=s, e=e,
                             wp=wp, ep=ep, bk=block_k, precise=q.dtype == jnp.float32)
  per_thread = pl.BlockSpec((None, w, None, e), lambda bb, cc: (bb, 0, cc, 0))
  cache = pl.BlockSpec((None, w * s, None, e), lambda bb, cc: (bb, 0, cc, 0))
  return pl.pallas_call(
      kernel, grid=(b, c),
      in_specs=[per_thread, cache, cache,
                pl.BlockSpec((None, w * s), lambda bb, cc: (bb, 0)),
                pl.BlockSpec((None,), lambda bb, cc: (bb,)),
                per_thread, per_thread,
                pl.BlockSpec((None, w), lambda bb, cc: (bb, 0))],
      out_specs=per_thread, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      interpret=interpret, compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
      name=f"lattice_decode_{mask}")(
          q, k_cache, v_cache, cache_valid.astype(jnp.int32), length.astype(jnp.int32), k_new,
          v_new, new_valid.astype(jnp.int32))
