"""Blockwise (flash-style) lattice attention in plain XLA: memory linear in W*T.

The flattened lattice is processed one key block at a time with an online softmax (a
`lax.scan`), optionally one query block at a time (`lax.map`); the mask of each block is built
from column indices, thread ids and key validity, never as a [W*T, W*S] tensor. The backward
pass is written out (`jax.custom_vjp`): it recomputes each block's probabilities from the saved
log-sum-exp instead of storing them, so gradients are memory-linear too.

Shapes: see `reference.py`. Internally q is [B, C, Q, E] with Q = W*T (row = w * T + t) and
k, v are [B, C, K, E] with K = W*S padded up to a multiple of `block_k`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lace_jax.kernels.attention.reference import NEG_INF
from lace_jax.kernels.lattice_attention.mask import may_attend


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  block_k: int = 512
  block_q: int | None = None  # None: all queries of a key block at once


def _grid_ids(num_threads: int, cols: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(thread id, grid column) of every flattened position w * len(cols) + i."""
  n = cols.shape[0]
  return jnp.repeat(jnp.arange(num_threads, dtype=jnp.int32), n), jnp.tile(cols, num_threads)


def _block_mask(mode, q_thr, q_col, k_thr, k_col, k_valid):
  """[B, 1, Qb, Kb] mask of one block from ids: q_* [Qb], k_* [Kb], k_valid [B, Kb]."""
  allowed = may_attend(mode, q_thr[:, None], q_col[:, None], k_thr[None, :], k_col[None, :])
  return allowed[None, None] & k_valid[:, None, None, :]


def _prepare(q, k, v, key_valid, q_cols, k_cols, block_k):
  b, w, t, c, e = q.shape
  s = k.shape[2]
  qf = q.reshape(b, w * t, c, e).transpose(0, 2, 1, 3)  # [B, C, Q, E]
  kf = k.reshape(b, w * s, c, e).transpose(0, 2, 1, 3)  # [B, C, K, E]
  vf = v.reshape(b, w * s, c, e).transpose(0, 2, 1, 3)
  q_thr, q_col = _grid_ids(w, q_cols)
  k_thr, k_col = _grid_ids(w, k_cols)
  k_valid = key_valid.reshape(b, w * s)
  pad = (-(w * s)) % block_k
  if pad:
    kf = jnp.pad(kf, ((0, 0), (0, 0), (0, pad), (0, 0)))
    vf = jnp.pad(vf, ((0, 0), (0, 0), (0, pad), (0, 0)))
    k_thr = jnp.pad(k_thr, (0, pad))
    k_col = jnp.pad(k_col, (0, pad))
    k_valid = jnp.pad(k_valid, ((0, 0), (0, pad)))
  return qf, kf, vf, (q_thr, q_col), (k_thr, k_col, k_valid)


def _forward_rows(qf, kf, vf, q_ids, k_ids, *, mode, scale, block_k):
  """Online softmax of all rows in qf [B, C, Q, E] over key blocks -> (out f32, lse)."""
  b, c, nq, e = qf.shape
  nk = kf.shape[2] // block_k
  kb = kf.reshape(b, c, nk, block_k, e).transpose(2, 0, 1, 3, 4)  # [nk, B, C, bk, E]
  vb = vf.reshape(b, c, nk, block_k, e).transpose(2, 0, 1, 3, 4)
  k_thr, k_col, k_valid = k_ids
  idb = (k_thr.reshape(nk, block_k), k_col.reshape(nk, block_k),
         k_valid.reshape(b, nk, block_k).transpose(1, 0, 2))
  q_thr, q_col = q_ids

  def body(carry, blk):
    acc, m, l = carry
    k_blk, v_blk, (thr, col, valid) = blk
    mask = _block_mask(mode, q_thr, q_col, thr, col, valid)  # [B, 1, Q, bk]
    s = jnp.einsum("BCQE,BCKE->BCQK", qf, k_blk, preferred_element_type=jnp.float32) * scale
    s = jnp.where(mask, s, NEG_INF)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[..., None]) * mask
    l = alpha * l + jnp.sum(p, axis=-1)
    acc = acc * alpha[..., None] + jnp.einsum("BCQK,BCKE->BCQE", p.astype(v_blk.dtype), v_blk,
                                              preferred_element_type=jnp.float32)
    return (acc, m_new, l), None

  init = (jnp.zeros((b, c, nq, e), jnp.float32), jnp.full((b, c, nq), NEG_INF, jnp.float32),
          jnp.zeros((b, c, nq), jnp.float32))
  (acc, m, l), _ = jax.lax.scan(body, init, (kb, vb, idb))
  empty = l == 0
  out = acc / jnp.where(empty, 1.0, l)[..., None]
  lse = jnp.where(empty, 0.0, m + jnp.log(jnp.where(empty, 1.0, l)))
  return out, lse


def _backward_rows(qf, kf, vf, q_ids, k_ids, out, lse, do, *, mode, scale, block_k):
  """Gradients for the rows in qf: returns (dq [B,C,Q,E], dk, dv [B,C,K,E]) in float32."""
  b, c, nq, e = qf.shape
  nk = kf.shape[2] // block_k
  kb = kf.reshape(b, c, nk, block_k, e).transpose(2, 0, 1, 3, 4)
  vb = vf.reshape(b, c, nk, block_k, e).transpose(2, 0, 1, 3, 4)
  k_thr, k_col, k_valid = k_ids
  idb = (k_thr.reshape(nk, block_k), k_col.reshape(nk, block_k),
         k_valid.reshape(b, nk, block_k).transpose(1, 0, 2))
  q_thr, q_col = q_ids
  do = do.astype(jnp.float32)
  delta = jnp.sum(do * out.astype(jnp.float32), axis=-1)  # [B, C, Q]
  qf32 = qf.astype(jnp.float32)

  def body(dq, blk):
    k_blk, v_blk, (thr, col, valid) = blk
    mask = _block_mask(mode, q_thr, q_col, thr, col, valid)
    s = jnp.einsum("BCQE,BCKE->BCQK", qf, k_blk, preferred_element_type=jnp.float32) * scale
    p = jnp.exp(jnp.where(mask, s, NEG_INF) - lse[..., None]) * mask  # [B, C, Q, bk]
    dv = jnp.einsum("BCQK,BCQE->BCKE", p, do)
    dp = jnp.einsum("BCQE,BCKE->BCQK", do, v_blk.astype(jnp.float32))
    ds = p * (dp - delta[..., None]) * scale
    dq = dq + jnp.einsum("BCQK,BCKE->BCQE", ds, k_blk.astype(jnp.float32))
    dk = jnp.einsum("BCQK,BCQE->BCKE", ds, qf32)
    return dq, (dk, dv)

  dq, (dk, dv) = jax.lax.scan(body, jnp.zeros((b, c, nq, e), jnp.float32), (kb, vb, idb))
  # [nk, B, C, bk, E] -> [B, C, K, E]
  dk = dk.transpose(1, 2, 0, 3, 4).reshape(b, c, nk * block_k, e)
  dv = dv.transpose(1, 2, 0, 3, 4).reshape(b, c, nk * block_k, e)
  return dq, dk, dv


def _split_rows(x, block_q):
  """[B, C, Q, ...] -> [nq, B, C, bq, ...] (Q padded to a multiple of bq)."""
  nq = x.shape[2]
  pad = (-nq) % block_q
  if pad:
    x = jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3))
  n = x.shape[2] // block_q
  x = x.reshape(*x.shape[:2], n, block_q, *x.shape[3:])
  return jnp.moveaxis(x, 2, 0)


def _merge_rows(x, nq):
  x = jnp.moveaxis(x, 0, 2)
  return x.reshape(*x.shape[:2], -1, *x.shape[4:])[:, :, :nq]


def _pad_ids(ids, block_q):
  pad = (-ids.shape[0]) % block_q
  # padded query rows get column -1: they see no key (causal) or nothing (same_position)
  return jnp.pad(ids, (0, pad), constant_values=-1).reshape(-1, block_q)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _chunked(q, k, v, key_valid, q_cols, k_cols, mode, scale, blocks):
  out, _ = _chunked_fwd(q, k, v, key_valid, q_cols, k_cols, mode, scale, blocks)
  return out


def _chunked_fwd(q, k, v, key_valid, q_cols, k_cols, mode, scale, blocks):
  b, w, t, c, e = q.shape
  qf, kf, vf, q_ids, k_ids = _prepare(q, k, v, key_valid, q_cols, k_cols, blocks.block_k)
  fwd = functools.partial(_forward_rows, kf=kf, vf=vf, k_ids=k_ids, mode=mode, scale=scale,
                          block_k=blocks.block_k)
  if blocks.block_q is None:
    out, lse = fwd(qf, q_ids=q_ids)
  else:
    bq = blocks.block_q
    qs = _split_rows(qf, bq)
    ids = (_pad_ids(q_ids[0], bq), _pad_ids(q_ids[1], bq))
    out, lse = jax.lax.map(lambda a: fwd(a[0], q_ids=(a[1], a[2])), (qs, *ids))
    out, lse = _merge_rows(out, w * t), _merge_rows(lse, w * t)
  result = out.transpose(0, 2, 1, 3).reshape(b, w, t, c, e).astype(q.dtype)
  return result, (q, k, v, key_valid, q_cols, k_cols, out, lse)


def _chunked_bwd(mode, scale, blocks, res, g):
  q, k, v, key_valid, q_cols, k_cols, out, lse = res
  b, w, t, c, e = q.shape
  s = k.shape[2]
  qf, kf, vf, q_ids, k_ids = _prepare(q, k, v, key_valid, q_cols, k_cols, blocks.block_k)
  do = g.reshape(b, w * t, c, e).transpose(0, 2, 1, 3)
  bwd = functools.partial(_backward_rows, kf=kf, vf=vf, k_ids=k_ids, mode=mode, scale=scale,
                          block_k=blocks.block_k)
  if blocks.block_q is None:
    dq, dk, dv = bwd(qf, q_ids=q_ids, out=out, lse=lse, do=do)
  else:
    bq = blocks.block_q
    ids = (_pad_ids(q_ids[0], bq), _pad_ids(q_ids[1], bq))

    def one(carry, a):
      dk_acc, dv_acc = carry
      dq_i, dk_i, dv_i = bwd(a[0], q_ids=(a[1], a[2]), out=a[3], lse=a[4], do=a[5])
      return (dk_acc + dk_i, dv_acc + dv_i), dq_i

    zeros = jnp.zeros(kf.shape, jnp.float32)
    (dk, dv), dq = jax.lax.scan(one, (zeros, zeros), (
        _split_rows(qf, bq), *ids, _split_rows(out, bq), _split_rows(lse, bq),
        _split_rows(do, bq)))
    dq = _merge_rows(dq, w * t)
  dq = dq.transpose(0, 2, 1, 3).reshape(b, w, t, c, e).astype(q.dtype)
  unflat = lambda x: x[:, :, :w * s].transpose(0, 2, 1, 3).reshape(b, w, s, c, e)
  return dq, unflat(dk).astype(k.dtype), unflat(dv).astype(v.dtype), None, None, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def lattice_attention_chunked(q, k, v, *, key_valid, mask="causal", q_cols=None, k_cols=None,
                              scale=None, block_sizes: BlockSizes = BlockSizes()):
  b, w, t, c, e = q.shape
  s = k.shape[2]
  q_cols = jnp.arange(t, dtype=jnp.int32) if q_cols is None else q_cols.astype(jnp.int32)
  k_cols = jnp.arange(s, dtype=jnp.int32) if k_cols is None else k_cols.astype(jnp.int32)
  scale = e**-0.5 if scale is None else float(scale)
  block_k = min(block_sizes.block_k, _round_up(w * s, 8))
  blocks = dataclasses.replace(block_sizes, block_k=block_k)
  return _chunked(q, k, v, key_valid, q_cols, k_cols, mask, scale, blocks)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m
