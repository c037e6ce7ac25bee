"""Fused lattice attention in Pallas (Triton backend for GPUs), forward and backward.

One program handles a block of BQ flattened queries (row = w * T + t) of one (batch, lattice
head); it walks the keys thread by thread and, for the causal modes, only up to the largest
column of its queries (half the work of a dense pass). The mask is computed in-kernel from the
rows' and keys' column indices, thread ids and key validity: no mask tensor exists in memory.
Inputs may be bf16; scores, softmax statistics and accumulators are float32.

Backward (`jax.custom_vjp`): delta = rowsum(dO * O) in XLA, then a dq kernel (grid over query
blocks, loop over keys) and a dk/dv kernel (grid over key blocks, loop over queries), both
recomputing probabilities from the saved log-sum-exp.

Contract (narrower than the reference's): grid columns are positions, q_cols = arange(T) and
k_cols = arange(S), as in training and prefill; the kernels skip key and query blocks by
position. Decoding has its own kernel (`decode.py`). Runs on CPU with `interpret=True` (tests);
lowers for CUDA on any machine.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels.lattice_attention.mask import Mode, may_attend, validate_mode

NEG_INF = -1e30


def check_block(name: str, value, minimum: int = 16) -> None:
  """Triton tiles: a power of two, at least 16 (tl.dot's smallest operand dimension)."""
  if (not isinstance(value, int) or isinstance(value, bool) or value < minimum
      or value & (value - 1)):
    raise ValueError(f"{name}={value!r}: a Pallas GPU block must be a power of two >= {minimum}")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles and launch parameters of the Triton kernels; validated on construction."""

  block_q: int = 64
  block_k: int = 64
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    check_block("block_q", self.block_q)
    check_block("block_k", self.block_k)
    if self.num_warps not in (1, 2, 4, 8, 16, 32):
      raise ValueError(f"num_warps={self.num_warps!r}: expected a power of two from 1 to 32")
    if not isinstance(self.num_stages, int) or self.num_stages < 1:
      raise ValueError(f"num_stages={self.num_stages!r}: expected an integer >= 1")


def _pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _mask(mode, q_thr, q_col, k_thr, k_col, k_ok):
  """[BQ, BK] bool from row ids [BQ] and key ids [BK]."""
  allowed = may_attend(mode, q_thr[:, None], q_col[:, None], k_thr[None, :], k_col[None, :])
  return allowed & k_ok[None, :]


def _dot(a, b, precise):
  return jnp.dot(a, b, preferred_element_type=jnp.float32,
                 precision=jax.lax.Precision.HIGHEST if precise else None)


def _load_keys(ref, start, n, rows_ok, ep):
  return pltriton.load(ref.at[pl.ds(start, n), pl.ds(0, ep)], mask=rows_ok[:, None], other=0.0)


def _query_rows(q_ref, qcol_ref, iq, bq, w, t, ep):
  """Query block iq: (q [BQ, Ep], row ok, row thread ids, row columns, largest column)."""
  rows = iq * bq + jnp.arange(bq, dtype=jnp.int32)
  row_ok = rows < w * t
  q = pltriton.load(q_ref.at[pl.ds(iq * bq, bq), pl.ds(0, ep)], mask=row_ok[:, None], other=0.0)
  q_col = pltriton.load(qcol_ref.at[pl.ds(iq * bq, bq)], mask=row_ok, other=-1)
  return q, row_ok, rows // t, q_col, jnp.max(q_col)


def _key_block(k_ref, v_ref, kcol_ref, kvalid_ref, wk, j, *, s, bk, ep, mode, q_thr, q_col):
  """Key block j of thread wk: (k, v [BK, Ep], allowed [BQ, BK]) with the mask built from ids."""
  ok = j * bk + jnp.arange(bk, dtype=jnp.int32) < s
  start = wk * s + j * bk
  k = _load_keys(k_ref, start, bk, ok, ep)
  v = _load_keys(v_ref, start, bk, ok, ep)
  k_col = pltriton.load(kcol_ref.at[pl.ds(j * bk, bk)], mask=ok, other=2**30)
  k_ok = pltriton.load(kvalid_ref.at[pl.ds(start, bk)], mask=ok, other=0) > 0
  return k, v, _mask(mode, q_thr, q_col, jnp.full((bk,), wk, jnp.int32), k_col, k_ok & ok)


def _num_key_blocks(mode, col_max, s, bk):
  """Blocks of one thread's keys that queries up to column col_max can see."""
  if mode == Mode.SAME_POSITION:
    return pl.cdiv(s, bk)
  return pl.cdiv(jnp.clip(col_max + 1, 0, s), bk)


# ---------------------------------------------------------------- forward


def _fwd_kernel(q_ref, k_ref, v_ref, qcol_ref, kcol_ref, kvalid_ref, o_ref, lse_ref, *, mode,
                scale, w, t, s, e, bq, bk, precise):
  iq = pl.program_id(0)
  ep = q_ref.shape[-1]
  q, row_ok, q_thr, q_col, col_max = _query_rows(q_ref, qcol_ref, iq, bq, w, t, ep)
  keys = functools.partial(_key_block, k_ref, v_ref, kcol_ref, kvalid_ref, s=s, bk=bk, ep=ep,
                           mode=mode, q_thr=q_thr, q_col=q_col)

  def thread_body(wk, carry):
    def block_body(j, carry):
      acc, m, l = carry
      k, v, allowed = keys(wk, j)
      sc = jnp.where(allowed, _dot(q, k.T, precise) * scale, NEG_INF)
      m_new = jnp.maximum(m, jnp.max(sc, axis=1))
      alpha = jnp.exp(m - m_new)
      p = jnp.exp(sc - m_new[:, None]) * allowed.astype(jnp.float32)
      l = alpha * l + jnp.sum(p, axis=1)
      acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, precise)
      return acc, m_new, l

    return jax.lax.fori_loop(0, _num_key_blocks(mode, col_max, s, bk), block_body, carry)

  init = (jnp.zeros((bq, ep), jnp.float32), jnp.full((bq,), NEG_INF, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  acc, m, l = jax.lax.fori_loop(0, w, thread_body, init)
  empty = l == 0.0
  out = acc / jnp.where(empty, 1.0, l)[:, None]
  lse = jnp.where(empty, 0.0, m + jnp.log(jnp.where(empty, 1.0, l)))
  pltriton.store(o_ref.at[pl.ds(iq * bq, bq), pl.ds(0, ep)], out.astype(o_ref.dtype),
                 mask=row_ok[:, None])
  pltriton.store(lse_ref.at[pl.ds(iq * bq, bq)], lse, mask=row_ok)


def _call_fwd(qf, kf, vf, q_cols, k_cols, kvalid, *, mode, scale, w, t, s, e, blocks, interpret,
              out=None):
  b, c, nq, ep = qf.shape
  bq, bk = blocks.block_q, blocks.block_k
  kernel = functools.partial(_fwd_kernel, mode=mode, scale=scale, w=w, t=t, s=s, e=e, bq=bq,
                             bk=bk, precise=qf.dtype == jnp.float32)
  full_q = pl.BlockSpec((None, None, nq, ep), lambda i, bb, cc: (bb, cc, 0, 0))
  full_k = pl.BlockSpec((None, None, kf.shape[2], ep), lambda i, bb, cc: (bb, cc, 0, 0))
  in_specs = [full_q, full_k, full_k,
              pl.BlockSpec((q_cols.shape[0],), lambda i, bb, cc: (0,)),
              pl.BlockSpec((k_cols.shape[0],), lambda i, bb, cc: (0,)),
              pl.BlockSpec((None, kvalid.shape[1]), lambda i, bb, cc: (bb, 0))]
  out_shape = [jax.ShapeDtypeStruct(qf.shape, qf.dtype),
               jax.ShapeDtypeStruct((b, c, nq), jnp.float32)]
  out_specs = [full_q, pl.BlockSpec((None, None, nq), lambda i, bb, cc: (bb, cc, 0))]
  args = [qf, kf, vf, q_cols, k_cols, kvalid]
  aliases = {}
  if out is not None:  # tests pass poisoned output buffers to prove every element is written
    in_specs += [full_q, pl.BlockSpec((None, None, nq), lambda i, bb, cc: (bb, cc, 0))]
    args += list(out)
    aliases = {6: 0, 7: 1}
    kernel = _ignore_extra(kernel, 2)
  return pl.pallas_call(
      kernel, grid=(pl.cdiv(nq, bq), b, c), in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, input_output_aliases=aliases, interpret=interpret,
      compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps,
                                              num_stages=blocks.num_stages),
      name=f"lattice_fwd_{mode.name.lower()}")(*args)


def _ignore_extra(kernel, n):
  """Wraps a kernel so n aliased input refs (placed before the outputs) are skipped."""

  def wrapped(*refs):
    ins, outs = refs[:-2 - n], refs[-2:]
    return kernel(*ins, *outs)

  return wrapped


# ---------------------------------------------------------------- backward


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qcol_ref, kcol_ref, kvalid_ref,
               dq_ref, *, mode, scale, w, t, s, bq, bk, precise):
  iq = pl.program_id(0)
  ep = q_ref.shape[-1]
  q, row_ok, q_thr, q_col, col_max = _query_rows(q_ref, qcol_ref, iq, bq, w, t, ep)
  sl = (pl.ds(iq * bq, bq), pl.ds(0, ep))
  do = pltriton.load(do_ref.at[sl], mask=row_ok[:, None], other=0.0)
  lse = pltriton.load(lse_ref.at[pl.ds(iq * bq, bq)], mask=row_ok, other=0.0)
  delta = pltriton.load(delta_ref.at[pl.ds(iq * bq, bq)], mask=row_ok, other=0.0)
  keys = functools.partial(_key_block, k_ref, v_ref, kcol_ref, kvalid_ref, s=s, bk=bk, ep=ep,
                           mode=mode, q_thr=q_thr, q_col=q_col)

  def thread_body(wk, dq):
    def block_body(j, dq):
      k, v, allowed = keys(wk, j)
      sc = jnp.where(allowed, _dot(q, k.T, precise) * scale, NEG_INF)
      p = jnp.exp(sc - lse[:, None]) * allowed.astype(jnp.float32)
      ds = p * (_dot(do, v.T, precise) - delta[:, None]) * scale
      return dq + _dot(ds.astype(k.dtype), k, precise)

    return jax.lax.fori_loop(0, _num_key_blocks(mode, col_max, s, bk), block_body, dq)

  dq = jax.lax.fori_loop(0, w, thread_body, jnp.zeros((bq, ep), jnp.float32))
  pltriton.store(dq_ref.at[sl], dq.astype(dq_ref.dtype), mask=row_ok[:, None])


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qcol_ref, kcol_ref, kvalid_ref,
                dk_ref, dv_ref, *, mode, scale, w, t, s, bq, bk, precise):
  ik = pl.program_id(0)
  keys = ik * bk + jnp.arange(bk, dtype=jnp.int32)
  key_ok = keys < w * s
  ep = k_ref.shape[-1]
  sl = (pl.ds(ik * bk, bk), pl.ds(0, ep))
  k = pltriton.load(k_ref.at[sl], mask=key_ok[:, None], other=0.0)
  v = pltriton.load(v_ref.at[sl], mask=key_ok[:, None], other=0.0)
  k_thr = keys // s
  k_col = pltriton.load(kcol_ref.at[pl.ds(ik * bk, bk)], mask=key_ok, other=2**30)
  k_ok = (pltriton.load(kvalid_ref.at[pl.ds(ik * bk, bk)], mask=key_ok, other=0) > 0) & key_ok
  col_min = jnp.min(jnp.where(key_ok, k_col, 2**30))

  def thread_body(wq, carry):
    # queries of thread wq at rows [wq*t, wq*t + t); only columns >= col_min can see these keys
    first = jnp.clip(col_min, 0, t) // bq if mode != Mode.SAME_POSITION else 0

    def block_body(j, carry):
      dk, dv = carry
      pos = j * bq + jnp.arange(bq, dtype=jnp.int32)
      ok = pos < t
      start = wq * t + j * bq
      qs = (pl.ds(start, bq), pl.ds(0, ep))
      q = pltriton.load(q_ref.at[qs], mask=ok[:, None], other=0.0)
      do = pltriton.load(do_ref.at[qs], mask=ok[:, None], other=0.0)
      lse = pltriton.load(lse_ref.at[pl.ds(start, bq)], mask=ok, other=0.0)
      delta = pltriton.load(delta_ref.at[pl.ds(start, bq)], mask=ok, other=0.0)
      q_col = pltriton.load(qcol_ref.at[pl.ds(j * bq, bq)], mask=ok, other=-1)
      allowed = _mask(mode, jnp.full((bq,), wq, jnp.int32), q_col, k_thr, k_col, k_ok)
      allowed = allowed & ok[:, None]
      sc = jnp.where(allowed, _dot(q, k.T, precise) * scale, NEG_INF)
      p = jnp.exp(sc - lse[:, None]) * allowed.astype(jnp.float32)  # [BQ, BK]
      dv = dv + _dot(p.T.astype(do.dtype), do, precise)
      dp = _dot(do, v.T, precise)
      ds = p * (dp - delta[:, None]) * scale
      dk = dk + _dot(ds.T.astype(q.dtype), q, precise)
      return dk, dv

    return jax.lax.fori_loop(first, pl.cdiv(t, bq), block_body, carry)

  zeros = jnp.zeros((bk, ep), jnp.float32)
  dk, dv = jax.lax.fori_loop(0, w, thread_body, (zeros, zeros))
  pltriton.store(dk_ref.at[sl], dk.astype(dk_ref.dtype), mask=key_ok[:, None])
  pltriton.store(dv_ref.at[sl], dv.astype(dv_ref.dtype), mask=key_ok[:, None])


def _call_bwd(qf, kf, vf, do, lse, delta, q_cols, k_cols, kvalid, *, mode, scale, w, t, s,
              blocks, interpret):
  b, c, nq, ep = qf.shape
  nk = kf.shape[2]
  bq, bk = blocks.block_q, blocks.block_k
  precise = qf.dtype == jnp.float32
  full = lambda n: pl.BlockSpec((None, None, n, ep), lambda i, bb, cc: (bb, cc, 0, 0))
  rowvec = pl.BlockSpec((None, None, nq), lambda i, bb, cc: (bb, cc, 0))
  in_specs = [full(nq), full(nk), full(nk), full(nq), rowvec, rowvec,
              pl.BlockSpec((q_cols.shape[0],), lambda i, bb, cc: (0,)),
              pl.BlockSpec((k_cols.shape[0],), lambda i, bb, cc: (0,)),
              pl.BlockSpec((None, kvalid.shape[1]), lambda i, bb, cc: (bb, 0))]
  args = (qf, kf, vf, do, lse, delta, q_cols, k_cols, kvalid)
  params = pltriton.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)
  common = dict(mode=mode, scale=scale, w=w, t=t, s=s, bq=bq, bk=bk, precise=precise)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, **common), grid=(pl.cdiv(nq, bq), b, c), in_specs=in_specs,
      out_specs=full(nq), out_shape=jax.ShapeDtypeStruct(qf.shape, qf.dtype),
      interpret=interpret, compiler_params=params,
      name=f"lattice_dq_{mode.name.lower()}")(*args)
  kcol_full = jnp.tile(k_cols, w)  # the dk/dv kernel indexes keys by flattened position
  in_specs[7] = pl.BlockSpec((kcol_full.shape[0],), lambda i, bb, cc: (0,))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, **common), grid=(pl.cdiv(nk, bk), b, c),
      in_specs=in_specs, out_specs=[full(nk), full(nk)],
      out_shape=[jax.ShapeDtypeStruct(kf.shape, kf.dtype)] * 2, interpret=interpret,
      compiler_params=params,
      name=f"lattice_dkv_{mode.name.lower()}")(*args[:7], kcol_full, args[8])
  return dq, dk, dv


# ---------------------------------------------------------------- wrapper


def _flatten(q, k, v, key_valid, ep):
  b, w, t, c, e = q.shape
  s = k.shape[2]
  pad = [(0, 0)] * 3 + [(0, ep - e)]
  qf = jnp.pad(q.reshape(b, w * t, c, e).transpose(0, 2, 1, 3), pad)  # [B, C, Q, Ep]
  kf = jnp.pad(k.reshape(b, w * s, c, e).transpose(0, 2, 1, 3), pad)
  vf = jnp.pad(v.reshape(b, w * s, c, e).transpose(0, 2, 1, 3), pad)
  return qf, kf, vf, key_valid.reshape(b, w * s).astype(jnp.int32)


def _unflatten(x, b, w, n, c, e):
  return x[..., :e].transpose(0, 2, 1, 3).reshape(b, w, n, c, e)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _attn(q, k, v, key_valid, q_cols, k_cols, mode, scale, blocks, interpret):
  return _attn_fwd(q, k, v, key_valid, q_cols, k_cols, mode, scale, blocks, interpret)[0]


def _attn_fwd(q, k, v, key_valid, q_cols, k_cols, mode, scale, blocks, interpret):
  b, w, t, c, e = q.shape
  s = k.shape[2]
  ep = max(16, _pow2(e))
  qf, kf, vf, kvalid = _flatten(q, k, v, key_valid, ep)
  qcol_rows = jnp.tile(q_cols, w)
  out, lse = _call_fwd(qf, kf, vf, qcol_rows, k_cols, kvalid, mode=mode, scale=scale, w=w,
                       t=t, s=s, e=e, blocks=blocks, interpret=interpret)
  return _unflatten(out, b, w, t, c, e), (q, k, v, key_valid, q_cols, k_cols, out, lse)


def _attn_bwd(mode, scale, blocks, interpret, res, g):
  q, k, v, key_valid, q_cols, k_cols, out, lse = res
  b, w, t, c, e = q.shape
  s = k.shape[2]
  ep = out.shape[-1]
  qf, kf, vf, kvalid = _flatten(q, k, v, key_valid, ep)
  do = jnp.pad(g.reshape(b, w * t, c, e).transpose(0, 2, 1, 3), [(0, 0)] * 3 + [(0, ep - e)])
  delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, C, Q]
  dq, dk, dv = _call_bwd(qf, kf, vf, do.astype(qf.dtype), lse, delta, jnp.tile(q_cols, w),
                         k_cols, kvalid, mode=mode, scale=scale, w=w, t=t, s=s,
                         blocks=blocks, interpret=interpret)
  return (_unflatten(dq, b, w, t, c, e), _unflatten(dk, b, w, s, c, e),
          _unflatten(dv, b, w, s, c, e), None, None, None)


_attn.defvjp(_attn_fwd, _attn_bwd)


def lattice_attention_pallas(q, k, v, *, key_valid, mask="causal", q_cols=None, k_cols=None,
                             scale=None, block_sizes: BlockSizes = BlockSizes(),
                             interpret: bool = False):
  """`reference.lattice_attention_reference` with grid columns = positions (see module doc)."""
  if q_cols is not None or k_cols is not None:
    raise ValueError("the Pallas lattice kernel takes grid columns = positions (q_cols and "
                     "k_cols None); use implementation='xla_chunked' or 'reference' for others")
  b, w, t, c, e = q.shape
  s = k.shape[2]
  q_cols = jnp.arange(t, dtype=jnp.int32)
  k_cols = jnp.arange(s, dtype=jnp.int32)
  scale = e**-0.5 if scale is None else float(scale)
  return _attn(q, k, v, key_valid, q_cols, k_cols, validate_mode(mask), scale, block_sizes,
               interpret)


def forward_into_buffers(q, k, v, *, key_valid, mask, o_buffer, lse_buffer,
                         block_sizes: BlockSizes = BlockSizes(), interpret: bool = False):
  """The forward kernel writing into given (aliased) flattened buffers, o [B, C, W*T, Ep] and
  lse [B, C, W*T]: tests pass NaN-filled buffers to prove every output element is written."""
  b, w, t, c, e = q.shape
  s = k.shape[2]
  ep = o_buffer.shape[-1]
  qf, kf, vf, kvalid = _flatten(q, k, v, key_valid, ep)
  return _call_fwd(qf, kf, vf, jnp.tile(jnp.arange(t, dtype=jnp.int32), w),
                   jnp.arange(s, dtype=jnp.int32), kvalid, mode=validate_mode(mask), scale=e**-0.5,
                   w=w, t=t, s=s, e=e, blocks=block_sizes, interpret=interpret,
                   out=(o_buffer, lse_buffer))


def padded_head_dim(e: int) -> int:
  return max(16, _pow2(e))
