"""Fused lattice attention in Pallas (Triton backend for GPUs), forward and backward.

One program handles a block of BQ flattened queries (row = w * T + t) of one (batch, lattice
head); it walks the keys thread by thread and only over the key blocks its queries can see:
for the causal modes up to the largest column of its queries (half the work of a dense pass),
for `same_position` only the blocks holding its own columns (O(1) blocks per thread). The mask
is computed in-kernel from the rows' and keys' column indices, thread ids and key validity: no
mask tensor exists in memory. Inputs may be bf16; scores, softmax statistics and accumulators
are float32.

Layout: the kernels take head-major [B, C, W*T, E] views of q, k, v (and dO), unpadded; XLA's
layout assignment folds these transposes into the ops that produce them, so no copy is made
where it can. A head dim that is not a power of two (E = 80 in the 4B preset) is loaded as the
next power of two with the extra lanes masked to zero: no padded copy of any operand exists in
HBM (padding cannot be folded into a layout, and the padded copies cost 6.4 operands of
temporaries at E = 80). Reading the model's [B, W*T, C, E] in place by strided per-head blocks
was tried too: the kernels alone then need no transposes at all, but XLA lost the freedom to
choose the producers' layouts, and whole training steps needed more memory (sft_4b's step on
8 x H100 +0.6 GB).

Backward (`jax.custom_vjp`): delta = rowsum(dO * O) in XLA, then a dq kernel (grid over query
blocks, loop over keys) and a dk/dv kernel (grid over key blocks, loop over queries), both
recomputing probabilities from the saved log-sum-exp. Each of the three kernels has its own
tiles and launch parameters (`BlockSizes`).

Contract (narrower than the reference's): grid columns are positions, q_cols = arange(T) and
k_cols = arange(S), as in training and prefill; the kernels skip key and query blocks by
position. Decoding has its own kernel (`decode.py`). Runs on CPU with `interpret=True` (tests);
compiles for CUDA on any machine with a CUDA jaxlib (deviceless, `tests/test_gpu_compile.py`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from lace_jax.kernels.lattice_attention.mask import Mode, may_attend, validate_mode

NEG_INF = -1e30
_FAR = 2**30  # a column no query reaches


def check_block(name: str, value, minimum: int = 16) -> None:
  """Triton tiles: a power of two, at least 16 (tl.dot's smallest operand dimension)."""
  if (not isinstance(value, int) or isinstance(value, bool) or value < minimum
      or value & (value - 1)):
    raise ValueError(f"{name}={value!r}: a Pallas GPU block must be a power of two >= {minimum}")


def check_launch(name: str, num_warps, num_stages) -> None:
  if num_warps not in (1, 2, 4, 8, 16, 32) or isinstance(num_warps, bool):
    raise ValueError(f"{name}num_warps={num_warps!r}: expected a power of two from 1 to 32")
  if not isinstance(num_stages, int) or isinstance(num_stages, bool) or num_stages < 1:
    raise ValueError(f"{name}num_stages={num_stages!r}: expected an integer >= 1")


@dataclasses.dataclass(frozen=True)
class Tiles:
  """One kernel's tiles (rows of queries x rows of keys per step) and launch parameters;
  validated on construction."""

  block_q: int = 64
  block_k: int = 64
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    check_block("block_q", self.block_q)
    check_block("block_k", self.block_k)
    check_launch("", self.num_warps, self.num_stages)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles of the forward, dq and dk/dv kernels (`BlockSizes.for_head_dim` picks them from the
  padded head dim; `BlockSizes.uniform` gives all three kernels the same)."""

  fwd: Tiles = Tiles()
  dq: Tiles = Tiles()
  dkv: Tiles = Tiles()

  def __post_init__(self):
    for name in ("fwd", "dq", "dkv"):
      if not isinstance(getattr(self, name), Tiles):
        raise ValueError(f"BlockSizes.{name}={getattr(self, name)!r}: expected a Tiles")

  @classmethod
  def uniform(cls, block_q: int = 64, block_k: int = 64, num_warps: int = 4,
              num_stages: int = 2) -> BlockSizes:
    tiles = Tiles(block_q, block_k, num_warps, num_stages)
    return cls(tiles, tiles, tiles)

  @classmethod
  def for_head_dim(cls, head_dim: int) -> BlockSizes:
    """Defaults after jax's Pallas GPU flash attention (jax.experimental.pallas.ops.gpu):
    larger query tiles forward, small square tiles backward (the backward holds two
    accumulators), 8 warps from a padded head dim of 128. They fit the shared memory of the
    smallest target (RTX PRO 6000: 99 KiB per block, `tests/test_gpu_compile.py`)."""
    ep = padded_head_dim(head_dim)
    warps = 4 if ep <= 64 else 8
    return cls(fwd=Tiles(128, 64, warps, 2), dq=Tiles(64, 32, warps, 2),
               dkv=Tiles(32, 64, warps, 2))


def _pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def padded_head_dim(e: int) -> int:
  """The head dim the kernels compute with: E rounded up to a power of two >= 16 (the extra
  lanes are masked loads of zeros, never memory)."""
  return max(16, _pow2(e))


def _mask(mode, q_thr, q_col, k_thr, k_col, k_ok):
  """[BQ, BK] bool from row ids [BQ] and key ids [BK]."""
  allowed = may_attend(mode, q_thr[:, None], q_col[:, None], k_thr[None, :], k_col[None, :])
  return allowed & k_ok[None, :]


def _dot(a, b, precise):
  return jnp.dot(a, b, preferred_element_type=jnp.float32,
                 precision=jax.lax.Precision.HIGHEST if precise else None)


def _rows(ref, start, n, rows_ok, ep, e):
  """Rows [start, start + n) of a [rows, E] ref as [n, Ep]: rows not ok and lanes >= E are 0."""
  lanes = jnp.arange(ep, dtype=jnp.int32) < e
  return pltriton.load(ref.at[pl.ds(start, n), pl.ds(0, ep)],
                       mask=rows_ok[:, None] & lanes[None, :], other=0.0)


def _store_rows(ref, start, n, rows_ok, x, e):
  ep = x.shape[-1]
  lanes = jnp.arange(ep, dtype=jnp.int32) < e
  pltriton.store(ref.at[pl.ds(start, n), pl.ds(0, ep)], x.astype(ref.dtype),
                 mask=rows_ok[:, None] & lanes[None, :])


def _query_rows(q_ref, qcol_ref, iq, bq, w, t, e, ep):
  """Query block iq: (q [BQ, Ep], row ok, row thread ids, row columns, smallest and largest
  column of its rows)."""
  rows = iq * bq + jnp.arange(bq, dtype=jnp.int32)
  row_ok = rows < w * t
  q = _rows(q_ref, iq * bq, bq, row_ok, ep, e)
  q_col = pltriton.load(qcol_ref.at[pl.ds(iq * bq, bq)], mask=row_ok, other=-1)
  col_min = jnp.min(jnp.where(row_ok, q_col, _FAR))
  return q, row_ok, rows // t, q_col, col_min, jnp.max(q_col)


def _key_block(k_ref, v_ref, kcol_ref, kvalid_ref, wk, j, *, s, bk, e, ep, mode, q_thr, q_col):
  """Key block j of thread wk: (k, v [BK, Ep], allowed [BQ, BK]) with the mask built from ids."""
  ok = j * bk + jnp.arange(bk, dtype=jnp.int32) < s
  start = wk * s + j * bk
  k = _rows(k_ref, start, bk, ok, ep, e)
  v = _rows(v_ref, start, bk, ok, ep, e)
  k_col = pltriton.load(kcol_ref.at[pl.ds(j * bk, bk)], mask=ok, other=_FAR)
  k_ok = pltriton.load(kvalid_ref.at[pl.ds(start, bk)], mask=ok, other=0) > 0
  return k, v, _mask(mode, q_thr, q_col, jnp.full((bk,), wk, jnp.int32), k_col, k_ok & ok)


def _key_block_range(mode, col_min, col_max, s, bk):
  """[first, end) of the blocks of one thread's keys that queries at columns col_min..col_max
  can see (key columns are positions 0..S-1)."""
  end = pl.cdiv(jnp.clip(col_max + 1, 0, s), bk)
  if mode == Mode.SAME_POSITION:  # only the blocks holding the queries' own columns
    return jnp.minimum(jnp.clip(col_min, 0, s) // bk, end), end
  return 0, end


# ---------------------------------------------------------------- forward


def _fwd_kernel(q_ref, k_ref, v_ref, qcol_ref, kcol_ref, kvalid_ref, o_ref, lse_ref, *, mode,
                scale, w, t, s, e, ep, bq, bk, precise):
  iq = pl.program_id(0)
  q, row_ok, q_thr, q_col, col_min, col_max = _query_rows(q_ref, qcol_ref, iq, bq, w, t, e, ep)
  keys = functools.partial(_key_block, k_ref, v_ref, kcol_ref, kvalid_ref, s=s, bk=bk, e=e,
                           ep=ep, mode=mode, q_thr=q_thr, q_col=q_col)
  first, end = _key_block_range(mode, col_min, col_max, s, bk)

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

    return jax.lax.fori_loop(first, end, block_body, carry)

  init = (jnp.zeros((bq, ep), jnp.float32), jnp.full((bq,), NEG_INF, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  acc, m, l = jax.lax.fori_loop(0, w, thread_body, init)
  empty = l == 0.0
  out = acc / jnp.where(empty, 1.0, l)[:, None]
  lse = jnp.where(empty, 0.0, m + jnp.log(jnp.where(empty, 1.0, l)))
  _store_rows(o_ref, iq * bq, bq, row_ok, out, e)
  pltriton.store(lse_ref.at[pl.ds(iq * bq, bq)], lse, mask=row_ok)


def _head_spec(n, e):
  """One (batch, head)'s rows of a [B, C, N, E] array: an [N, E] block."""
  return pl.BlockSpec((None, None, n, e), lambda i, bb, cc: (bb, cc, 0, 0))


def _row_spec(n):
  """One (batch, head)'s entries of a [B, C, N] array."""
  return pl.BlockSpec((None, None, n), lambda i, bb, cc: (bb, cc, 0))


def _ids_specs(q_cols, k_cols, kvalid):
  return [pl.BlockSpec((q_cols.shape[0],), lambda i, bb, cc: (0,)),
          pl.BlockSpec((k_cols.shape[0],), lambda i, bb, cc: (0,)),
          pl.BlockSpec((None, kvalid.shape[1]), lambda i, bb, cc: (bb, 0))]


def _params(tiles: Tiles):
  return pltriton.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def _call_fwd(qf, kf, vf, q_cols, k_cols, kvalid, *, mode, scale, w, t, s, tiles, interpret):
  b, c, nq, e = qf.shape
  nk = kf.shape[2]
  ep = padded_head_dim(e)
  kernel = functools.partial(_fwd_kernel, mode=mode, scale=scale, w=w, t=t, s=s, e=e, ep=ep,
                             bq=tiles.block_q, bk=tiles.block_k,
                             precise=qf.dtype == jnp.float32)
  in_specs = [_head_spec(nq, e), _head_spec(nk, e), _head_spec(nk, e),
              *_ids_specs(q_cols, k_cols, kvalid)]
  out_shape = [jax.ShapeDtypeStruct(qf.shape, qf.dtype),
               jax.ShapeDtypeStruct((b, c, nq), jnp.float32)]
  out_specs = [_head_spec(nq, e), _row_spec(nq)]
  return pl.pallas_call(
      kernel, grid=(pl.cdiv(nq, tiles.block_q), b, c), in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, interpret=interpret, compiler_params=_params(tiles),
      name=f"lattice_fwd_{mode.name.lower()}")(qf, kf, vf, q_cols, k_cols, kvalid)


# ---------------------------------------------------------------- backward


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qcol_ref, kcol_ref, kvalid_ref,
               dq_ref, *, mode, scale, w, t, s, e, ep, bq, bk, precise):
  iq = pl.program_id(0)
  q, row_ok, q_thr, q_col, col_min, col_max = _query_rows(q_ref, qcol_ref, iq, bq, w, t, e, ep)
  do = _rows(do_ref, iq * bq, bq, row_ok, ep, e)
  lse = pltriton.load(lse_ref.at[pl.ds(iq * bq, bq)], mask=row_ok, other=0.0)
  delta = pltriton.load(delta_ref.at[pl.ds(iq * bq, bq)], mask=row_ok, other=0.0)
  keys = functools.partial(_key_block, k_ref, v_ref, kcol_ref, kvalid_ref, s=s, bk=bk, e=e,
                           ep=ep, mode=mode, q_thr=q_thr, q_col=q_col)
  first, end = _key_block_range(mode, col_min, col_max, s, bk)

  def thread_body(wk, dq):
    def block_body(j, dq):
      k, v, allowed = keys(wk, j)
      sc = jnp.where(allowed, _dot(q, k.T, precise) * scale, NEG_INF)
      p = jnp.exp(sc - lse[:, None]) * allowed.astype(jnp.float32)
      ds = p * (_dot(do, v.T, precise) - delta[:, None]) * scale
      return dq + _dot(ds.astype(k.dtype), k, precise)

    return jax.lax.fori_loop(first, end, block_body, dq)

  dq = jax.lax.fori_loop(0, w, thread_body, jnp.zeros((bq, ep), jnp.float32))
  _store_rows(dq_ref, iq * bq, bq, row_ok, dq, e)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qcol_ref, kcol_ref, kvalid_ref,
                dk_ref, dv_ref, *, mode, scale, w, t, s, e, ep, bq, bk, precise):
  ik = pl.program_id(0)
  keys = ik * bk + jnp.arange(bk, dtype=jnp.int32)
  key_ok = keys < w * s
  k = _rows(k_ref, ik * bk, bk, key_ok, ep, e)
  v = _rows(v_ref, ik * bk, bk, key_ok, ep, e)
  k_thr = keys // s
  k_col = pltriton.load(kcol_ref.at[pl.ds(ik * bk, bk)], mask=key_ok, other=_FAR)
  k_ok = (pltriton.load(kvalid_ref.at[pl.ds(ik * bk, bk)], mask=key_ok, other=0) > 0) & key_ok
  # queries at columns >= the block's smallest key column can see it (causal modes); for
  # same_position only the queries at its columns
  col_min = jnp.min(jnp.where(key_ok, k_col, _FAR))
  first = jnp.clip(col_min, 0, t) // bq
  end = pl.cdiv(t, bq)
  if mode == Mode.SAME_POSITION:
    end = pl.cdiv(jnp.clip(jnp.max(jnp.where(key_ok, k_col, -1)) + 1, 0, t), bq)

  def thread_body(wq, carry):
    def block_body(j, carry):  # queries of thread wq at rows [wq*t + j*bq, ...)
      dk, dv = carry
      pos = j * bq + jnp.arange(bq, dtype=jnp.int32)
      ok = pos < t
      start = wq * t + j * bq
      q = _rows(q_ref, start, bq, ok, ep, e)
      do = _rows(do_ref, start, bq, ok, ep, e)
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

    return jax.lax.fori_loop(first, end, block_body, carry)

  zeros = jnp.zeros((bk, ep), jnp.float32)
  dk, dv = jax.lax.fori_loop(0, w, thread_body, (zeros, zeros))
  _store_rows(dk_ref, ik * bk, bk, key_ok, dk, e)
  _store_rows(dv_ref, ik * bk, bk, key_ok, dv, e)


def _call_bwd(qf, kf, vf, do, lse, delta, q_cols, k_cols, kvalid, *, mode, scale, w, t, s,
              blocks, interpret):
  b, c, nq, e = qf.shape
  nk = kf.shape[2]
  common = dict(mode=mode, scale=scale, w=w, t=t, s=s, e=e, ep=padded_head_dim(e),
                precise=qf.dtype == jnp.float32)
  in_specs = [_head_spec(nq, e), _head_spec(nk, e), _head_spec(nk, e), _head_spec(nq, e),
              _row_spec(nq), _row_spec(nq), *_ids_specs(q_cols, k_cols, kvalid)]
  args = (qf, kf, vf, do, lse, delta, q_cols, k_cols, kvalid)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, bq=blocks.dq.block_q, bk=blocks.dq.block_k, **common),
      grid=(pl.cdiv(nq, blocks.dq.block_q), b, c), in_specs=in_specs,
      out_specs=_head_spec(nq, e), out_shape=jax.ShapeDtypeStruct(qf.shape, qf.dtype),
      interpret=interpret, compiler_params=_params(blocks.dq),
      name=f"lattice_dq_{mode.name.lower()}")(*args)
  kcol_full = jnp.tile(k_cols, w)  # the dk/dv kernel indexes keys by flattened position
  in_specs[7] = pl.BlockSpec((kcol_full.shape[0],), lambda i, bb, cc: (0,))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, bq=blocks.dkv.block_q, bk=blocks.dkv.block_k, **common),
      grid=(pl.cdiv(nk, blocks.dkv.block_k), b, c), in_specs=in_specs,
      out_specs=[_head_spec(nk, e)] * 2,
      out_shape=[jax.ShapeDtypeStruct(kf.shape, kf.dtype)] * 2, interpret=interpret,
      compiler_params=_params(blocks.dkv),
      name=f"lattice_dkv_{mode.name.lower()}")(*args[:7], kcol_full, args[8])
  return dq, dk, dv


# ---------------------------------------------------------------- wrapper


def _flatten(q, k, v, key_valid):
  """Head-major views: q [B, C, W*T, E], k, v [B, C, W*S, E], key validity [B, W*S] int32.
  Unpadded: XLA's layout assignment folds the transposes into the producers (no copy) where
  it can; a padded head dim could not be folded."""
  b, w, t, c, e = q.shape
  s = k.shape[2]
  heads = lambda x, n: x.reshape(b, w * n, c, e).transpose(0, 2, 1, 3)
  return (heads(q, t), heads(k, s), heads(v, s), key_valid.reshape(b, w * s).astype(jnp.int32))


def _unflatten(x, b, w, n, c, e):
  """[B, C, W*N, E] -> [B, W, N, C, E]."""
  return x.transpose(0, 2, 1, 3).reshape(b, w, n, c, e)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _attn(q, k, v, key_valid, q_cols, k_cols, mode, scale, blocks, interpret):
  return _attn_fwd(q, k, v, key_valid, q_cols, k_cols, mode, scale, blocks, interpret)[0]


def _attn_fwd(q, k, v, key_valid, q_cols, k_cols, mode, scale, blocks, interpret):
  b, w, t, c, e = q.shape
  s = k.shape[2]
  qf, kf, vf, kvalid = _flatten(q, k, v, key_valid)
  out, lse = _call_fwd(qf, kf, vf, jnp.tile(q_cols, w), k_cols, kvalid, mode=mode, scale=scale,
                       w=w, t=t, s=s, tiles=blocks.fwd, interpret=interpret)
  return _unflatten(out, b, w, t, c, e), (q, k, v, key_valid, q_cols, k_cols, out, lse)


def _attn_bwd(mode, scale, blocks, interpret, res, g):
  q, k, v, key_valid, q_cols, k_cols, out, lse = res
  b, w, t, c, e = q.shape
  s = k.shape[2]
  qf, kf, vf, kvalid = _flatten(q, k, v, key_valid)
  do = g.reshape(b, w * t, c, e).transpose(0, 2, 1, 3).astype(qf.dtype)  # [B, C, Q, E]
  delta = jnp.einsum("BCQE,BCQE->BCQ", do.astype(jnp.float32), out.astype(jnp.float32))
  dq, dk, dv = _call_bwd(qf, kf, vf, do, lse, delta, jnp.tile(q_cols, w), k_cols, kvalid,
                         mode=mode, scale=scale, w=w, t=t, s=s, blocks=blocks,
                         interpret=interpret)
  return (_unflatten(dq, b, w, t, c, e), _unflatten(dk, b, w, s, c, e),
          _unflatten(dv, b, w, s, c, e), None, None, None)


_attn.defvjp(_attn_fwd, _attn_bwd)


def lattice_attention_pallas(q, k, v, *, key_valid, mask="causal", q_cols=None, k_cols=None,
                             scale=None, block_sizes: BlockSizes | None = None,
                             interpret: bool = False):
  """`reference.lattice_attention_reference` with grid columns = positions (see module doc).
  block_sizes None: `BlockSizes.for_head_dim(E)`."""
  if q_cols is not None or k_cols is not None:
    raise ValueError("the Pallas lattice kernel takes grid columns = positions (q_cols and "
                     "k_cols None); use implementation='xla_chunked' or 'reference' for others")
  b, w, t, c, e = q.shape
  s = k.shape[2]
  blocks = BlockSizes.for_head_dim(e) if block_sizes is None else block_sizes
  if not isinstance(blocks, BlockSizes):
    raise ValueError(f"block_sizes={blocks!r}: expected a pallas_gpu.BlockSizes")
  q_cols = jnp.arange(t, dtype=jnp.int32)
  k_cols = jnp.arange(s, dtype=jnp.int32)
  scale = e**-0.5 if scale is None else float(scale)
  return _attn(q, k, v, key_valid, q_cols, k_cols, validate_mode(mask), scale, blocks,
               interpret)
