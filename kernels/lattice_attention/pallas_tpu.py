"""Fused lattice attention in Pallas for TPUs (Mosaic), forward and backward.

The same flattened grid as the GPU kernels (`pallas_gpu.py`): head-major views q [B, C, W*T, E],
k, v [B, C, W*S, E] (row = w * T + t), key validity [B, 1, W*S]. A query block holds BQ rows of
one thread and a key block BK rows of one thread (BQ divides T, BK divides S), so which key
blocks a query block can see depends only on the two blocks' threads and column ranges and on
the mask mode, never on the data: the block map is static for a given (W, T, S, blocks, mode).
It is not stored: the grid's last axis walks the visible blocks only, and an index map computes
the j-th visible key block of query block i from (i, j) with scalar arithmetic (`_fwd_map`,
`_dkv_map`), after jax's splash attention, whose `MaskInfo` tables play this role for arbitrary
masks. For the causal modes a query block sees its threads' key blocks up to its largest
column, for `same_position` only the key blocks holding its own columns (W blocks).

The grid's last axis has the length of the longest visit list; the steps past a block's own
list repeat the previous index (Pallas issues no DMA for an unchanged block) and do no work.

Inside a visited block the mask is built from iotas (`mask.may_attend`) and the keys' validity:
no mask tensor exists in memory. Inputs may be bf16; scores, softmax statistics and
accumulators are float32 (VMEM scratch). The head dim is the block's full last dim (E = 64 or
80 need no padded copy in HBM). The log-sum-exp is written lane-dense [.., BQ, 128] by the
forward (as splash attention does) and kept as [B, C, W*T] for the backward, which reads it as
[B, C, 1, W*T] rows.

Backward (`jax.custom_vjp`): delta = rowsum(dO * O) in XLA, then a dq kernel (grid over query
blocks, walking their visible key blocks) and a dk/dv kernel (grid over key blocks, walking the
query blocks that see them; scores computed transposed, [BK, BQ], so the per-query statistics
broadcast along lanes). Each kernel has its own tiles (`BlockSizes`).

Contract: grid columns are positions (q_cols = arange(T), k_cols = arange(S)), T and S
multiples of 128 (`supports`); the dispatcher (`__init__.py`) sends other shapes to
`xla_chunked`. Runs on CPU in the TPU interpreter (`interpret=True`: `pltpu.InterpretParams`),
and compiles for compile-only TPU devices with libtpu (tests/test_tpu_compile.py).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lace_jax.kernels.lattice_attention import decode as _decode
from lace_jax.kernels.lattice_attention.mask import Mode, may_attend, validate_mode

NEG_INF = -1e30
LANES = 128  # a TPU vreg's lanes: tiles along a row are multiples of this
NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b
TN = (((0,), (0,)), ((), ()))  # a.T @ b


def check_tile(name: str, value) -> None:
  """TPU tiles: a positive multiple of 128 (a block's rows are a lane dimension somewhere:
  scores [BQ, BK], the log-sum-exp rows [1, BQ], key validity [1, BK])."""
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value % LANES:
    raise ValueError(f"{name}={value!r}: a Pallas TPU block must be a positive multiple of "
                     f"{LANES}")


@dataclasses.dataclass(frozen=True)
class Tiles:
  """One kernel's tiles: rows of queries x rows of keys per grid step; validated."""

  block_q: int = 512
  block_k: int = 512

  def __post_init__(self):
    check_tile("block_q", self.block_q)
    check_tile("block_k", self.block_k)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles of the forward, dq and dk/dv kernels. `BlockSizes.for_shapes(T, S)` picks the
  largest tiles up to 512 that divide T and S."""

  fwd: Tiles = Tiles()
  dq: Tiles = Tiles()
  dkv: Tiles = Tiles()

  def __post_init__(self):
    for name in ("fwd", "dq", "dkv"):
      if not isinstance(getattr(self, name), Tiles):
        raise ValueError(f"pallas_tpu.BlockSizes.{name}={getattr(self, name)!r}: expected a "
                         "pallas_tpu.Tiles")

  @classmethod
  def for_shapes(cls, t: int, s: int, largest: int = 512) -> BlockSizes:
    """Tiles up to `largest` rows dividing T (queries) and S (keys). 512 x 512 keeps every
    kernel's VMEM (two [512, 512] f32 score tiles in the dk/dv kernel, double-buffered q, k, v,
    dO tiles) within the 16 MiB scoped default of v5e; larger tiles did not pay in splash
    attention's tuning either."""
    if not supports(t, s):
      raise ValueError(f"T={t}, S={s}: the Pallas TPU lattice kernels need multiples of {LANES}")
    pick = lambda n: max(b for b in range(LANES, largest + 1, LANES) if n % b == 0)
    tiles = Tiles(pick(t), pick(s))
    return cls(tiles, tiles, tiles)


def supports(t: int, s: int) -> bool:
  """Whether the kernels take T queries and S keys per thread (both multiples of 128)."""
  return t > 0 and s > 0 and t % LANES == 0 and s % LANES == 0


# ---------------------------------------------------------------- the static block map


def _int_ops(x):
  """min / max for Python ints (trace-time tables) or traced int32 scalars (index maps)."""
  if isinstance(x, jax.Array):
    return jnp.minimum, jnp.maximum
  return min, max


def _div(a, b):
  """a // b for nonnegative ints or int32 scalars: lax.div truncates (jnp's floor division
  lowers through `sign`, which Mosaic lowers only with a TPU attached)."""
  return jax.lax.div(a, b) if isinstance(a, jax.Array) or isinstance(b, jax.Array) else a // b


def _rem(a, b):
  return jax.lax.rem(a, b) if isinstance(a, jax.Array) or isinstance(b, jax.Array) else a % b


def _q_sees(mode: Mode, cq, bq: int, nkc: int, bk: int):
  """Key column blocks [first, first + n) of each visible thread, seen from query column block
  cq (columns cq*bq .. cq*bq + bq - 1): causal modes every block holding a column <= the
  block's last; same_position those holding its own columns."""
  mn, mx = _int_ops(cq)
  lo, hi = cq * bq, cq * bq + bq - 1
  if mode == Mode.SAME_POSITION:
    first = _div(lo, bk)
    return first, mx(mn(_div(hi, bk), nkc - 1) - first + 1, 0)
  return 0, mn(_div(hi, bk) + 1, nkc)


def _k_seen_by(mode: Mode, ck, bk: int, nqc: int, bq: int):
  """Query column blocks [first, first + n) of each visible thread that see key column block
  ck (columns ck*bk .. ck*bk + bk - 1)."""
  mn, mx = _int_ops(ck)
  lo, hi = ck * bk, ck * bk + bk - 1
  first = _div(lo, bq)
  if mode == Mode.SAME_POSITION:
    return first, mx(mn(_div(hi, bq), nqc - 1) - first + 1, 0)
  return first, mx(nqc - first, 0)


def _threads(mode: Mode, w: int) -> int:
  """How many threads' blocks a block sees (other_threads: every thread but its own)."""
  return w - 1 if mode == Mode.OTHER_THREADS else w


def _walk(mode: Mode, w: int, j, me, first, n):
  """The j-th visible block, thread-major over (visible thread, column block), clamped to the
  last one (block 0 when none): (thread, column block, whether j is a real step)."""
  count = n * _threads(mode, w)
  jj = jnp.clip(j, 0, jnp.maximum(count - 1, 0))
  n1 = jnp.maximum(n, 1)
  thread = _div(jj, n1)
  if mode == Mode.OTHER_THREADS:
    # (with no visible thread, W = 1, stay on block 0: nothing runs, no DMA is wasted)
    thread = jnp.minimum(thread + (thread >= me).astype(thread.dtype), w - 1)
  return thread, first + _rem(jj, n1), j < count


def _longest(mode: Mode, w: int, nown: int, sees) -> int:
  """The grid's last axis: the longest visit list over the `nown` column blocks of a thread
  (`sees(c)` -> (first, n)); at least 1, so every output block is written."""
  return max(1, max(sees(c)[1] for c in range(nown)) * _threads(mode, w))


@dataclasses.dataclass(frozen=True)
class _Geometry:
  """Static shapes of one call: W threads, T query and S key columns per thread, tiles."""

  mode: Mode
  w: int
  t: int
  s: int
  bq: int
  bk: int

  @property
  def nqc(self) -> int:  # query column blocks per thread
    return self.t // self.bq

  @property
  def nkc(self) -> int:
    return self.s // self.bk

  def q_block(self, i):
    """Query block i -> (thread, column block)."""
    return _div(i, self.nqc), _rem(i, self.nqc)

  def k_block(self, i):
    return _div(i, self.nkc), _rem(i, self.nkc)

  def keys_of(self, i, j):
    """Query block i's j-th visible key block: (flat key block, thread, column block, real)."""
    wq, cq = self.q_block(i)
    first, n = _q_sees(self.mode, cq, self.bq, self.nkc, self.bk)
    wk, ck, real = _walk(self.mode, self.w, j, wq, first, n)
    return wk * self.nkc + ck, wk, ck, real

  def queries_of(self, i, j):
    """Key block i's j-th visible query block: (flat query block, thread, column block, real)."""
    wk, ck = self.k_block(i)
    first, n = _k_seen_by(self.mode, ck, self.bk, self.nqc, self.bq)
    wq, cq, real = _walk(self.mode, self.w, j, wk, first, n)
    return wq * self.nqc + cq, wq, cq, real

  def longest_key_walk(self) -> int:
    return _longest(self.mode, self.w, self.nqc,
                    lambda c: _q_sees(self.mode, c, self.bq, self.nkc, self.bk))

  def longest_query_walk(self) -> int:
    return _longest(self.mode, self.w, self.nkc,
                    lambda c: _k_seen_by(self.mode, c, self.bk, self.nqc, self.bq))

  def visited_pairs(self) -> int:
    """(query block, key block) pairs the forward visits: its work, for the figures."""
    return sum(_q_sees(self.mode, c, self.bq, self.nkc, self.bk)[1] for c in range(self.nqc)
               ) * self.w * _threads(self.mode, self.w)

  def mask(self, wq, cq, wk, ck, kvalid, transposed=False):
    """[BQ, BK] bool (or [BK, BQ] `transposed`): may_attend over the blocks' columns and
    threads, and the keys' validity (kvalid [1, BK] int32, or [BK, 1] transposed)."""
    if transposed:
      shape = (self.bk, self.bq)
      k_col = ck * self.bk + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
      q_col = cq * self.bq + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    else:
      shape = (self.bq, self.bk)
      q_col = cq * self.bq + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
      k_col = ck * self.bk + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    allowed = may_attend(self.mode, wq, q_col, wk, k_col) & (kvalid > 0)
    return jnp.broadcast_to(allowed, shape)


def _zero_invalid(x, kvalid_col):
  """Rows of a key / value tile [BK, E] zeroed where the key is invalid (kvalid_col [BK, 1]):
  a masked score gives probability 0, but 0 * NaN is NaN in a matmul, so garbage in padding or
  a finished thread's columns would leak without this."""
  return jnp.where(kvalid_col > 0, x, jnp.zeros((), x.dtype))


def _dot(a, b, dims, precise):
  """f32 accumulation; exact f32 products for f32 inputs, the MXU's bf16 pass for bf16 inputs
  (named explicitly: a process-wide `jax_default_matmul_precision` of "highest" would ask
  Mosaic for f32 contraction of bf16 operands, which it refuses)."""
  precision = jax.lax.Precision.HIGHEST if precise else jax.lax.Precision.DEFAULT
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32,
                             precision=(precision, precision))


# ---------------------------------------------------------------- forward


def _online_softmax_step(m_scr, l_scr, acc_scr, sc, allowed, v, v_dims, precise):
  """One key block of an online softmax, in VMEM scratch: scores sc [R, BK] f32 (any value
  where not `allowed`), running max m and sum l [R, 128] (every lane the same), accumulator
  acc [R, E] += p @ v (v_dims: NN for v [BK, E], NT for v [E, BK])."""
  sc = jnp.where(allowed, sc, NEG_INF)
  m_prev, l_prev = m_scr[...], l_scr[...]
  m_next = jnp.maximum(m_prev, jnp.max(sc, axis=1, keepdims=True))
  alpha = jnp.exp(m_prev - m_next)
  p = jnp.exp(sc - m_next[:, :1]) * allowed.astype(jnp.float32)
  l_scr[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
  m_scr[...] = m_next
  acc_scr[...] = acc_scr[...] * alpha[:, :1] + _dot(p.astype(v.dtype), v, v_dims, precise)



def _fwd_kernel(q_ref, k_ref, v_ref, kvalid_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr, *,
                geo: _Geometry, scale: float, precise: bool):
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, NEG_INF, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  _, wk, ck, real = geo.keys_of(i, j)
  wq, cq = geo.q_block(i)

  @pl.when(real)
  def _step():
    kvalid = kvalid_ref[...]  # [1, BK]
    allowed = geo.mask(wq, cq, wk, ck, kvalid)  # [BQ, BK]
    col = jnp.transpose(kvalid)  # [BK, 1]
    sc = _dot(q_ref[...], _zero_invalid(k_ref[...], col), NT, precise) * scale
    _online_softmax_step(m_scr, l_scr, acc_scr, sc, allowed,
                         _zero_invalid(v_ref[...], col), NN, precise)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    l = l_scr[...]
    empty = l == 0.0  # no readable key: zeros out, lse 0 (the backward reads p = 0 there)
    safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc_scr[...] / safe[:, :1]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, 0.0, m_scr[...] + jnp.log(safe))


def _cost(geo: _Geometry, b: int, c: int, e: int, itemsize: int, matmuls: int,
          streamed: int, own: int, own_rows: int) -> pl.CostEstimate:
  """XLA's estimate of a kernel (its roofline time in the plan mode; without one a custom call
  counts as free): `matmuls` [BQ, BK, E] products per visited block pair, `streamed` [BK or BQ,
  E] tiles read per pair, `own` tiles of `own_rows` rows read or written once per block."""
  pairs = geo.visited_pairs() * b * c
  tile = max(geo.bq, geo.bk) * e * itemsize
  return pl.CostEstimate(
      flops=int(2 * matmuls * pairs * geo.bq * geo.bk * e),
      transcendentals=int(pairs * geo.bq * geo.bk),
      bytes_accessed=int(pairs * streamed * tile + own * b * c * own_rows * e * itemsize))


def _compiler_params(parallel: int = 3):
  return pltpu.CompilerParams(dimension_semantics=("parallel",) * parallel + ("arbitrary",))


def _interpret(interpret: bool):
  return pltpu.InterpretParams() if interpret else False


def _call_fwd(qf, kf, vf, kvalid, *, geo: _Geometry, scale, interpret):
  b, c, nq, e = qf.shape
  bq, bk = geo.bq, geo.bk
  q_map = lambda bb, cc, i, j: (bb, cc, i, 0)
  k_map = lambda bb, cc, i, j: (bb, cc, geo.keys_of(i, j)[0], 0)
  valid_map = lambda bb, cc, i, j: (bb, 0, geo.keys_of(i, j)[0])
  kernel = functools.partial(_fwd_kernel, geo=geo, scale=scale,
                             precise=qf.dtype == jnp.float32)
  out, lse = pl.pallas_call(
      kernel,
      grid=(b, c, nq // bq, geo.longest_key_walk()),
      in_specs=[pl.BlockSpec((None, None, bq, e), q_map),
                pl.BlockSpec((None, None, bk, e), k_map),
                pl.BlockSpec((None, None, bk, e), k_map),
                pl.BlockSpec((None, 1, bk), valid_map)],
      out_specs=[pl.BlockSpec((None, None, bq, e), q_map),
                 pl.BlockSpec((None, None, bq, LANES), q_map)],
      out_shape=[jax.ShapeDtypeStruct(qf.shape, qf.dtype),
                 jax.ShapeDtypeStruct((b, c, nq, LANES), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
                      pltpu.VMEM((bq, e), jnp.float32)],
      compiler_params=_compiler_params(), interpret=_interpret(interpret),
      cost_estimate=_cost(geo, b, c, e, qf.dtype.itemsize, 2, 2, 2, nq),
      name=f"lattice_tpu_fwd_{geo.mode.name.lower()}")(qf, kf, vf, kvalid)
  return out, lse[..., 0]  # lse kept as [B, C, W*T]


# ---------------------------------------------------------------- backward


def _dq_kernel(q_ref, k_ref, v_ref, kvalid_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_scr, *,
               geo: _Geometry, scale: float, precise: bool):
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

  _, wk, ck, real = geo.keys_of(i, j)
  wq, cq = geo.q_block(i)

  @pl.when(real)
  def _step():
    kvalid = kvalid_ref[...]
    allowed = geo.mask(wq, cq, wk, ck, kvalid)  # [BQ, BK]
    col = jnp.transpose(kvalid)
    k, v = _zero_invalid(k_ref[...], col), _zero_invalid(v_ref[...], col)
    sc = _dot(q_ref[...], k, NT, precise) * scale
    lse = jnp.expand_dims(lse_ref[0], -1)  # [BQ, 1]
    delta = jnp.expand_dims(delta_ref[0], -1)
    p = jnp.exp(jnp.where(allowed, sc, NEG_INF) - lse) * allowed.astype(jnp.float32)
    dp = _dot(do_ref[...], v, NT, precise)
    ds = p * (dp - delta) * scale
    dq_scr[...] += _dot(ds.astype(k.dtype), k, NN, precise)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)


def _dkv_kernel(k_ref, v_ref, kvalid_ref, q_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                dk_scr, dv_scr, *, geo: _Geometry, scale: float, precise: bool):
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  _, wq, cq, real = geo.queries_of(i, j)
  wk, ck = geo.k_block(i)

  @pl.when(real)
  def _step():
    # transposed: [BK, BQ], so the queries' lse and delta ([1, BQ] rows) broadcast on lanes
    col = jnp.transpose(kvalid_ref[...])  # [BK, 1]
    allowed = geo.mask(wq, cq, wk, ck, col, transposed=True)
    q, do = q_ref[...], do_ref[...]
    sc = _dot(_zero_invalid(k_ref[...], col), q, NT, precise) * scale
    p = jnp.exp(jnp.where(allowed, sc, NEG_INF) - lse_ref[...]) * allowed.astype(jnp.float32)
    dv_scr[...] += _dot(p.astype(do.dtype), do, NN, precise)
    dp = _dot(_zero_invalid(v_ref[...], col), do, NT, precise)
    ds = p * (dp - delta_ref[...]) * scale
    dk_scr[...] += _dot(ds.astype(q.dtype), q, NN, precise)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _call_bwd(qf, kf, vf, kvalid, do, lse, delta, *, mode, w, t, s, scale, blocks, interpret):
  b, c, nq, e = qf.shape
  nk = kf.shape[2]
  precise = qf.dtype == jnp.float32
  rows = lambda x: x[:, :, None, :]  # [B, C, N] -> [B, C, 1, N]
  lse, delta = rows(lse), rows(delta)

  geo = _Geometry(mode, w, t, s, blocks.dq.block_q, blocks.dq.block_k)
  bq, bk = geo.bq, geo.bk
  q_map = lambda bb, cc, i, j: (bb, cc, i, 0)
  stat_map = lambda bb, cc, i, j: (bb, cc, 0, i)
  k_map = lambda bb, cc, i, j: (bb, cc, geo.keys_of(i, j)[0], 0)
  valid_map = lambda bb, cc, i, j: (bb, 0, geo.keys_of(i, j)[0])
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, geo=geo, scale=scale, precise=precise),
      grid=(b, c, nq // bq, geo.longest_key_walk()),
      in_specs=[pl.BlockSpec((None, None, bq, e), q_map),
                pl.BlockSpec((None, None, bk, e), k_map),
                pl.BlockSpec((None, None, bk, e), k_map),
                pl.BlockSpec((None, 1, bk), valid_map),
                pl.BlockSpec((None, None, bq, e), q_map),
                pl.BlockSpec((None, None, 1, bq), stat_map),
                pl.BlockSpec((None, None, 1, bq), stat_map)],
      out_specs=pl.BlockSpec((None, None, bq, e), q_map),
      out_shape=jax.ShapeDtypeStruct(qf.shape, qf.dtype),
      scratch_shapes=[pltpu.VMEM((bq, e), jnp.float32)],
      compiler_params=_compiler_params(), interpret=_interpret(interpret),
      cost_estimate=_cost(geo, b, c, e, qf.dtype.itemsize, 3, 2, 3, nq),
      name=f"lattice_tpu_dq_{mode.name.lower()}")(qf, kf, vf, kvalid, do, lse, delta)

  gkv = _Geometry(mode, w, t, s, blocks.dkv.block_q, blocks.dkv.block_k)
  bq, bk = gkv.bq, gkv.bk
  own_k = lambda bb, cc, i, j: (bb, cc, i, 0)
  own_valid = lambda bb, cc, i, j: (bb, 0, i)
  qs_map = lambda bb, cc, i, j: (bb, cc, gkv.queries_of(i, j)[0], 0)
  qstat_map = lambda bb, cc, i, j: (bb, cc, 0, gkv.queries_of(i, j)[0])
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, geo=gkv, scale=scale, precise=precise),
      grid=(b, c, nk // bk, gkv.longest_query_walk()),
      in_specs=[pl.BlockSpec((None, None, bk, e), own_k),
                pl.BlockSpec((None, None, bk, e), own_k),
                pl.BlockSpec((None, 1, bk), own_valid),
                pl.BlockSpec((None, None, bq, e), qs_map),
                pl.BlockSpec((None, None, bq, e), qs_map),
                pl.BlockSpec((None, None, 1, bq), qstat_map),
                pl.BlockSpec((None, None, 1, bq), qstat_map)],
      out_specs=[pl.BlockSpec((None, None, bk, e), own_k)] * 2,
      out_shape=[jax.ShapeDtypeStruct(kf.shape, kf.dtype)] * 2,
      scratch_shapes=[pltpu.VMEM((bk, e), jnp.float32), pltpu.VMEM((bk, e), jnp.float32)],
      compiler_params=_compiler_params(), interpret=_interpret(interpret),
      cost_estimate=_cost(gkv, b, c, e, qf.dtype.itemsize, 4, 2, 4, nk),
      name=f"lattice_tpu_dkv_{mode.name.lower()}")(kf, vf, kvalid, qf, do, lse, delta)
  return dq, dk, dv


# ---------------------------------------------------------------- wrapper


def _flatten(q, k, v, key_valid):
  """Head-major views q [B, C, W*T, E], k, v [B, C, W*S, E] and key validity [B, 1, W*S] int32;
  XLA folds the transposes into the producers' layouts where it can."""
  b, w, t, c, e = q.shape
  s = k.shape[2]
  heads = lambda x, n: x.reshape(b, w * n, c, e).transpose(0, 2, 1, 3)
  return (heads(q, t), heads(k, s), heads(v, s),
          key_valid.reshape(b, 1, w * s).astype(jnp.int32))


def _unflatten(x, b, w, n, c, e):
  """[B, C, W*N, E] -> [B, W, N, C, E]."""
  return x.transpose(0, 2, 1, 3).reshape(b, w, n, c, e)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _attn(q, k, v, key_valid, mode, scale, blocks, interpret):
  return _attn_fwd(q, k, v, key_valid, mode, scale, blocks, interpret)[0]


def _attn_fwd(q, k, v, key_valid, mode, scale, blocks, interpret):
  b, w, t, c, e = q.shape
  s = k.shape[2]
  qf, kf, vf, kvalid = _flatten(q, k, v, key_valid)
  geo = _Geometry(mode, w, t, s, blocks.fwd.block_q, blocks.fwd.block_k)
  out, lse = _call_fwd(qf, kf, vf, kvalid, geo=geo, scale=scale, interpret=interpret)
  return _unflatten(out, b, w, t, c, e), (q, k, v, key_valid, out, lse)


def _attn_bwd(mode, scale, blocks, interpret, res, g):
  q, k, v, key_valid, out, lse = res
  b, w, t, c, e = q.shape
  s = k.shape[2]
  qf, kf, vf, kvalid = _flatten(q, k, v, key_valid)
  do = g.reshape(b, w * t, c, e).transpose(0, 2, 1, 3).astype(qf.dtype)  # [B, C, Q, E]
  delta = jnp.einsum("BCQE,BCQE->BCQ", do.astype(jnp.float32), out.astype(jnp.float32))
  dq, dk, dv = _call_bwd(qf, kf, vf, kvalid, do, lse, delta, mode=mode, w=w, t=t, s=s,
                         scale=scale, blocks=blocks, interpret=interpret)
  return (_unflatten(dq, b, w, t, c, e), _unflatten(dk, b, w, s, c, e),
          _unflatten(dv, b, w, s, c, e), None)


_attn.defvjp(_attn_fwd, _attn_bwd)


def lattice_attention_pallas_tpu(q, k, v, *, key_valid, mask="causal", q_cols=None,
                                 k_cols=None, scale=None, block_sizes: BlockSizes | None = None,
                                 interpret: bool = False):
  """`reference.lattice_attention_reference` with grid columns = positions, T and S multiples
  of 128 (module doc). block_sizes None: `BlockSizes.for_shapes(T, S)`."""
  if q_cols is not None or k_cols is not None:
    raise ValueError("the Pallas TPU lattice kernel takes grid columns = positions (q_cols and "
                     "k_cols None); use implementation='xla_chunked' or 'reference' for others")
  b, w, t, c, e = q.shape
  s = k.shape[2]
  if not supports(t, s):
    raise ValueError(f"q {q.shape}, k {k.shape}: the Pallas TPU lattice kernels need T and S "
                     f"multiples of {LANES}; use implementation='xla_chunked'")
  blocks = BlockSizes.for_shapes(t, s) if block_sizes is None else block_sizes
  if not isinstance(blocks, BlockSizes):
    raise ValueError(f"block_sizes={blocks!r}: expected a pallas_tpu.BlockSizes")
  for name in ("fwd", "dq", "dkv"):
    tiles = getattr(blocks, name)
    if t % tiles.block_q or s % tiles.block_k:
      raise ValueError(f"block_sizes.{name}={tiles}: block_q must divide T={t} and block_k "
                       f"S={s}")
  scale = e**-0.5 if scale is None else float(scale)
  return _attn(q, k, v, key_valid, validate_mode(mask), scale, blocks, interpret)


# ---------------------------------------------------------------- decode


def decode_supports(s: int, e: int) -> bool:
  """Whether the decode kernel takes a lattice cache of S columns (a multiple of 128) and head
  dim E (a multiple of 16: E is the tiles' sublane axis, 16 rows for bf16; smaller heads, as
  in the tiny presets, need a sublane broadcast Mosaic does not implement)."""
  return s > 0 and s % LANES == 0 and e > 0 and e % 16 == 0


def decode_block(s: int, largest: int = 512) -> int:
  """Cache columns per step of the decode kernel: the largest multiple of 128 up to `largest`
  dividing S."""
  return max(b for b in range(LANES, largest + 1, LANES) if s % b == 0)


def _decode_kernel(len_ref, q_ref, k_ref, v_ref, valid_ref, acc_ref, m_ref, l_ref, m_scr, l_scr,
                   acc_scr, *, mode: Mode, scale: float, w: int, bk: int, precise: bool):
  """One (batch row, head): the W query rows [W, E] against thread wk's cache block kb
  ([E, BK]: columns kb*BK .. on lanes), walking (wk, kb) over the filled blocks only."""
  bb, wk, kb = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  length = len_ref[bb]

  @pl.when((wk == 0) & (kb == 0))
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, NEG_INF, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  @pl.when(kb * bk < length)
  def _step():
    shape = (w, bk)
    col = kb * bk + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    row = jax.lax.broadcasted_iota(jnp.int32, shape, 0)  # the query's thread
    # every cache entry is at an earlier column than the query (`length`)
    valid = valid_ref[...]  # [1, BK]
    allowed = may_attend(mode, row, length, wk, col) & (col < length) & (valid > 0)
    # columns past `length` (stale entries of an earlier request) are zeroed like invalid ones
    live = valid * (kb * bk + jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)
                    < length).astype(jnp.int32)  # [1, BK]
    sc = _dot(q_ref[...], _zero_invalid(k_ref[...], live), NN, precise) * scale  # [W, BK]
    _online_softmax_step(m_scr, l_scr, acc_scr, sc, allowed,
                         _zero_invalid(v_ref[...], live), NT, precise)  # v [E, BK]

  @pl.when((wk == pl.num_programs(2) - 1) & (kb == pl.num_programs(3) - 1))
  def _finish():
    acc_ref[...] = acc_scr[...]
    m_ref[...] = m_scr[...]
    l_ref[...] = l_scr[...]


def decode_partials(q, k_cache, v_cache, cache_valid, length, *, mode: Mode, scale: float,
                    block_k: int | None = None, interpret: bool = False):
  """The cache's unnormalised softmax for one decode step, in `decode._combine`'s format:
  acc [B, 1, W, C, E] f32, m and l [B, 1, W, C] f32.

  q [B, W, C, E]; k_cache, v_cache [B, W, C, E, S] read in place (the model's layout: each
  step reads one [E, BK] tile of one thread and head); cache_valid [B, W, S];
  length [B] int32 (columns filled; blocks past it are neither read nor computed: the index
  map repeats the last filled block, so no DMA is issued)."""
  b, w, c, e = q.shape
  s = k_cache.shape[4]
  bk = decode_block(s) if block_k is None else block_k
  check_tile("block_k", bk)
  if s % bk:
    raise ValueError(f"block_k={bk} must divide the cache's S={s}")
  last = lambda ln: jnp.maximum(pl.cdiv(ln, bk) - 1, 0)  # the last filled block
  q_map = lambda bb, cc, wk, kb, ln: (bb, cc, 0, 0)
  kv_map = lambda bb, cc, wk, kb, ln: (bb, wk, cc, 0, jnp.minimum(kb, last(ln[bb])))
  valid_map = lambda bb, cc, wk, kb, ln: (bb, wk, 0, jnp.minimum(kb, last(ln[bb])))
  f32 = jnp.float32
  kernel = functools.partial(_decode_kernel, mode=mode, scale=scale, w=w, bk=bk,
                             precise=q.dtype == f32)
  acc, m, l = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(b, c, w, s // bk),
          in_specs=[pl.BlockSpec((None, None, w, e), q_map),
                    pl.BlockSpec((None, None, None, e, bk), kv_map),
                    pl.BlockSpec((None, None, None, e, bk), kv_map),
                    pl.BlockSpec((None, None, 1, bk), valid_map)],
          out_specs=[pl.BlockSpec((None, None, w, e), q_map),
                     pl.BlockSpec((None, None, w, LANES), q_map),
                     pl.BlockSpec((None, None, w, LANES), q_map)],
          scratch_shapes=[pltpu.VMEM((w, LANES), f32), pltpu.VMEM((w, LANES), f32),
                          pltpu.VMEM((w, e), f32)]),
      out_shape=[jax.ShapeDtypeStruct((b, c, w, e), f32),
                 jax.ShapeDtypeStruct((b, c, w, LANES), f32),
                 jax.ShapeDtypeStruct((b, c, w, LANES), f32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary", "arbitrary")),
      interpret=_interpret(interpret), name=f"lattice_tpu_decode_{mode.name.lower()}",
      cost_estimate=pl.CostEstimate(  # every column read (the bound; the kernel stops at length)
          flops=4 * b * c * w * w * s * e, transcendentals=b * c * w * w * s,
          bytes_accessed=2 * b * c * w * s * e * k_cache.dtype.itemsize))(
          length.astype(jnp.int32), q.transpose(0, 2, 1, 3), k_cache, v_cache,
          cache_valid.reshape(b, w, 1, s).astype(jnp.int32))
  stat = lambda x: x[..., 0].transpose(0, 2, 1)[:, None]  # [B, C, W, 128] -> [B, 1, W, C]
  return acc.transpose(0, 2, 1, 3)[:, None], stat(m), stat(l)


def decode_pallas_tpu(q, k_cache, v_cache, cache_valid, length, k_new, v_new, new_valid, *,
                      mask="causal", scale=None, block_k: int | None = None,
                      interpret: bool = False):
  """One decoding step (shapes in `decode.py`): the Mosaic kernel's softmax over the cache
  (`decode_partials`) merged with this step's W new entries by log-sum-exp in XLA
  (`decode._combine`). same_position reads no cache, so it runs no kernel. Needs S a multiple
  of 128 (`decode_supports`)."""
  b, w, c, e = q.shape
  s = k_cache.shape[4]
  mode = validate_mode(mask)
  if not decode_supports(s, e):
    raise ValueError(f"lattice cache {k_cache.shape}: the Pallas TPU decode kernel needs S a "
                     f"multiple of {LANES} and E of 16; use implementation='xla_chunked'")
  scale = e**-0.5 if scale is None else float(scale)
  length = length.astype(jnp.int32)
  partials = None
  if mode != Mode.SAME_POSITION:
    partials = decode_partials(q, k_cache, v_cache, cache_valid, length, mode=mode, scale=scale,
                               block_k=block_k, interpret=interpret)
  return _decode._combine(q, length, k_new, v_new, new_valid, partials, mode=mode, scale=scale)
