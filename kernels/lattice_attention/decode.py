"""Lattice attention for one decoding step: each thread's new query against the lattice cache
plus the W entries written at this step.

  q:            [B, W, C, E]      this step's query of every thread
  k_cache, v_cache: [B, W, C, E, S]  keys/values of earlier steps (after RoPE), one [E, S]
                                  matrix per thread and head: the model's lattice cache, read
                                  in place
  cache_valid:  [B, W, S] bool    False for padding and for steps after a thread finished
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

The cache keeps one thread's keys of one head as the columns of an [E, S] matrix: a TPU
kernel reads them as [E, BK] tiles (a head axis between S and E cannot be squeezed out of a
Mosaic block), and XLA:TPU tiles the two minor dims (E, S) densely: E = 64 or 80 lattice dims
on sublanes, columns on the 128 lanes. With [.., S, E] the lanes held E = 64 / 80 of 128 and
XLA:TPU's default layout for such arrays puts S minor anyway, so a kernel reading [S, E] rows
got a transposed copy of the cache every step; with [.., C, E] minor, C = 4 heads were padded
to 8 or 16 sublanes.

`decode_pallas` (GPUs) splits the keys: a Triton kernel over (B, C, row blocks of W, key
splits) reads, for `block_w` query rows, one range of `split_k` cache columns of every thread
(up to `length`) and writes its unnormalised partial softmax
(acc, row max m, row sum l) in fp32; XLA merges the splits and the W new entries by
log-sum-exp. A (B, C) grid alone is 4 to 16 programs on a 132-SM H100, and all W rows in one
program spill the accumulator at W = 128.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from lace_jax.kernels.attention.reference import NEG_INF
from lace_jax.kernels.lattice_attention.mask import Mode, may_attend, validate_mode
from lace_jax.kernels.lattice_attention.pallas_gpu import check_block, check_launch
from lace_jax.kernels.lattice_attention.reference import lattice_attention_reference


def _cache_mask(cache_valid, length):
  """[B, W, S]: valid cache entries at columns < length."""
  s = cache_valid.shape[-1]
  return cache_valid & (jnp.arange(s)[None, None, :] < length[:, None, None])


def decode_reference(q, k_cache, v_cache, cache_valid, length, k_new, v_new, new_valid, *,
                     mask="causal", scale=None):
  s = k_cache.shape[4]
  seq_major = lambda x: x.transpose(0, 1, 4, 2, 3)  # [B, W, C, E, S] -> [B, W, S, C, E]
  k_full = jnp.concatenate([seq_major(k_cache), k_new[:, :, None]], axis=2)
  v_full = jnp.concatenate([seq_major(v_cache), v_new[:, :, None]], axis=2)
  valid = jnp.concatenate([_cache_mask(cache_valid, length), new_valid[:, :, None]], axis=2)
  out = lattice_attention_reference(q[:, :, None], k_full, v_full, key_valid=valid, mask=mask,
                                    q_cols=jnp.array([s], jnp.int32),
                                    k_cols=jnp.arange(s + 1, dtype=jnp.int32), scale=scale)
  return out[:, :, 0]


def decode_xla(q, k_cache, v_cache, cache_valid, length, k_new, v_new, new_valid, *,
               mask="causal", scale=None):
  """Direct XLA form: scores [B, C, W, W', S] against the cache and [B, C, W, W'] against the
  new entries, one softmax over both."""
  b, w, c, e = q.shape
  s = k_cache.shape[4]
  scale = e**-0.5 if scale is None else scale
  # query and new entries sit at grid column `length`, cache entry (w', s) at column s
  q_col = length[:, None, None, None, None]  # [B, 1, 1, 1, 1]
  cache_ok = (may_attend(mask, jnp.arange(w)[:, None, None], q_col, jnp.arange(w)[:, None],
                         jnp.arange(s))
              & _cache_mask(cache_valid, length)[:, None, None])  # [B, 1, W or 1, W', S]
  new_ok = (may_attend(mask, jnp.arange(w)[:, None], q_col[..., 0], jnp.arange(w),
                       q_col[..., 0])
            & new_valid[:, None, None, :])  # [B, 1, 1 or W, W']
  sc = jnp.einsum("BWCE,BVCES->BCWVS", q, k_cache, preferred_element_type=jnp.float32) * scale
  sn = jnp.einsum("BWCE,BVCE->BCWV", q, k_new, preferred_element_type=jnp.float32) * scale
  sc = jnp.where(cache_ok, sc, NEG_INF)
  sn = jnp.where(new_ok, sn, NEG_INF)
  # one softmax over cache + new keys, without concatenating the cache (no per-step copy)
  m = jnp.maximum(jnp.max(sc, axis=(-2, -1)), jnp.max(sn, axis=-1))[..., None]  # [B, C, W, 1]
  pc = jnp.exp(sc - m[..., None]) * cache_ok
  pn = jnp.exp(sn - m) * new_ok
  denom = jnp.sum(pc, axis=(-2, -1))[..., None] + jnp.sum(pn, axis=-1, keepdims=True)
  denom = jnp.where(denom == 0, 1.0, denom)
  out = (jnp.einsum("BCWVS,BVCES->BWCE", pc, v_cache.astype(jnp.float32))
         + jnp.einsum("BCWV,BVCE->BWCE", pn, v_new.astype(jnp.float32)))
  return (out / jnp.moveaxis(denom, 1, 2)).astype(q.dtype)  # denom [B, C, W, 1] -> [B, W, C, 1]


@dataclasses.dataclass(frozen=True)
class DecodeBlockSizes:
  """Tiles and launch parameters of the split-key decode kernel; validated on construction.

  block_w    query rows (threads) per program; rows >= W are masked
  block_k    cache columns per loaded block
  split_k    cache columns per program (a multiple of block_k): the key split
  num_warps, num_stages  Triton launch parameters
  `DecodeBlockSizes.for_shapes` picks them from the shapes.
  """

  block_w: int = 16
  block_k: int = 64
  split_k: int = 512
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    check_block("block_w", self.block_w)
    check_block("block_k", self.block_k)
    if (not isinstance(self.split_k, int) or isinstance(self.split_k, bool) or self.split_k <= 0
        or self.split_k % self.block_k):
      raise ValueError(f"split_k={self.split_k!r}: expected a positive multiple of "
                       f"block_k={self.block_k}")
    check_launch("", self.num_warps, self.num_stages)

  @classmethod
  def for_shapes(cls, b: int, w: int, s: int, c: int, e: int, *,
                 num_sms: int = 132) -> DecodeBlockSizes:
    """Defaults for B batch rows, W threads, S cache columns, C heads of dim E on a GPU with
    `num_sms` SMs (132: H100). block_w = pow2(W) clamped to [16, 64]; block_k = 64 (smaller
    for tiny caches); split_k the largest multiple of block_k that still gives
    B*C*row_blocks*splits >= 2 * num_sms programs (one split when B*C*row_blocks already
    fills the GPU, and never below block_k, so short caches are not split); 8 warps for a
    [64, 128] fp32 accumulator (with 4, ptxas puts the kernel at 174 registers a thread on
    sm_90a and at the 255 cap on sm_120; with 8, 138 and 128), else 4."""
    block_w = max(16, min(64, _pow2(w)))
    num_warps = 8 if block_w * max(16, _pow2(e)) >= 64 * 128 else 4
    block_k = max(16, min(64, _pow2(s)))
    want = pl.cdiv(2 * num_sms, b * c * pl.cdiv(w, block_w))  # splits wanted
    whole = pl.cdiv(max(s, 1), block_k) * block_k
    if want <= 1:
      split_k = whole
    else:  # largest multiple m of block_k with cdiv(S, m) >= want, i.e. m * (want - 1) < S
      split_k = min(whole, block_k * max(1, (s - 1) // ((want - 1) * block_k)))
    return cls(block_w=block_w, block_k=block_k, split_k=split_k, num_warps=num_warps)


def _pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _split_kernel(q_ref, kc_ref, vc_ref, cvalid_ref, len_ref, acc_ref, m_ref, l_ref, *,
                  mode, scale, w, s, e, ep, bw, bk, split_k, precise):
  """One (batch, head, row block, key split): `bw` query rows [bw, Ep] against cache columns
  [split * split_k, +split_k) of every thread, up to `length`; writes the unnormalised
  partial softmax (acc [bw, E] f32, row max m, row sum l)."""
  r, j = pl.program_id(2), pl.program_id(3)
  rows = r * bw + jnp.arange(bw, dtype=jnp.int32)
  row_ok = rows < w
  dims_ok = jnp.arange(ep, dtype=jnp.int32) < e
  qmask = row_ok[:, None] & dims_ok[None, :]
  q = pltriton.load(q_ref.at[pl.ds(r * bw, bw), pl.ds(0, ep)], mask=qmask, other=0.0)
  length = len_ref[...]
  lo = j * split_k
  hi = jnp.minimum(jnp.minimum(length, s), lo + split_k)  # this split's columns: [lo, hi)
  nb = pl.cdiv(jnp.maximum(hi - lo, 0), bk)  # column blocks per thread; 0 past `length`
  dot = lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32,
                             precision=jax.lax.Precision.HIGHEST if precise else None)

  def body(i, carry):  # i = thread * nb + block: one loop over every (thread, column block)
    acc, m, l = carry
    wk, blk = i // nb, i % nb
    pos = lo + blk * bk + jnp.arange(bk, dtype=jnp.int32)
    ok = pos < hi
    start = lo + blk * bk  # thread wk's cache columns [start, start + bk)
    kv_mask = dims_ok[:, None] & ok[None, :]
    k = pltriton.load(kc_ref.at[wk, pl.ds(0, ep), pl.ds(start, bk)], mask=kv_mask, other=0.0)
    v = pltriton.load(vc_ref.at[wk, pl.ds(0, ep), pl.ds(start, bk)], mask=kv_mask, other=0.0)
    valid = pltriton.load(cvalid_ref.at[wk, pl.ds(start, bk)], mask=ok, other=0) > 0
    allowed = (may_attend(mode, rows[:, None], length, wk, pos[None, :])
               & (valid & ok)[None, :] & row_ok[:, None])
    sc = jnp.where(allowed, dot(q, k) * scale, NEG_INF)  # k, v: [Ep, bk]
    m_new = jnp.maximum(m, jnp.max(sc, axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(sc - m_new[:, None]) * allowed.astype(jnp.float32)
    return acc * alpha[:, None] + dot(p.astype(v.dtype), v.T), m_new, alpha * l + jnp.sum(p, 1)

  carry = (jnp.zeros((bw, ep), jnp.float32), jnp.full((bw,), NEG_INF, jnp.float32),
           jnp.zeros((bw,), jnp.float32))
  acc, m, l = jax.lax.fori_loop(0, w * nb, body, carry)
  pltriton.store(acc_ref.at[pl.ds(r * bw, bw), pl.ds(0, ep)], acc, mask=qmask)
  pltriton.store(m_ref.at[pl.ds(r * bw, bw)], m, mask=row_ok)
  pltriton.store(l_ref.at[pl.ds(r * bw, bw)], l, mask=row_ok)


def _cache_partials(q, k_cache, v_cache, cache_valid, length, *, mode, scale, blocks, interpret):
  """The split kernel: acc [B, NS, W, C, E] f32, m and l [B, NS, W, C] f32 (NS splits)."""
  b, w, c, e = q.shape
  s = k_cache.shape[4]
  ep = max(16, _pow2(e))
  rows, splits = pl.cdiv(w, blocks.block_w), pl.cdiv(s, blocks.split_k)
  kernel = functools.partial(_split_kernel, mode=mode, scale=scale, w=w, s=s, e=e, ep=ep,
                             bw=blocks.block_w, bk=blocks.block_k, split_k=blocks.split_k,
                             precise=q.dtype == jnp.float32)
  grid = lambda f: (lambda bb, cc, rr, jj: f(bb, cc, jj))  # row blocks share a block: rows masked
  per_thread = pl.BlockSpec((None, w, None, e), grid(lambda bb, cc, jj: (bb, 0, cc, 0)))
  cache = pl.BlockSpec((None, w, None, e, s), grid(lambda bb, cc, jj: (bb, 0, cc, 0, 0)))
  stat = pl.BlockSpec((None, None, w, None), grid(lambda bb, cc, jj: (bb, jj, 0, cc)))
  f32 = jnp.float32
  return pl.pallas_call(
      kernel, grid=(b, c, rows, splits),
      in_specs=[per_thread, cache, cache,
                pl.BlockSpec((None, w, s), grid(lambda bb, cc, jj: (bb, 0, 0))),
                pl.BlockSpec((None,), grid(lambda bb, cc, jj: (bb,)))],
      out_specs=[pl.BlockSpec((None, None, w, None, e),
                              grid(lambda bb, cc, jj: (bb, jj, 0, cc, 0))), stat, stat],
      out_shape=[jax.ShapeDtypeStruct((b, splits, w, c, e), f32),
                 jax.ShapeDtypeStruct((b, splits, w, c), f32),
                 jax.ShapeDtypeStruct((b, splits, w, c), f32)],
      interpret=interpret,
      compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps,
                                              num_stages=blocks.num_stages),
      name=f"lattice_decode_{mode.name.lower()}")(
          q, k_cache, v_cache, cache_valid.astype(jnp.int32), length.astype(jnp.int32))


def _combine(q, length, k_new, v_new, new_valid, partials, *, mode, scale):
  """The cache partials and this step's W new entries merged by log-sum-exp (XLA):
  out = (sum_j exp(m_j - M) acc_j + P_new V_new) / (sum_j exp(m_j - M) l_j + sum P_new),
  zeros where nothing is readable."""
  b, w, c, e = q.shape
  f32 = jnp.float32
  hp = jax.lax.Precision.HIGHEST if q.dtype == f32 else None
  # the new entries sit at the query's own column, `length`: [B, W(query), 1 (C), W(key)]
  col = length[:, None, None, None]
  new_ok = (may_attend(mode, jnp.arange(w)[:, None, None], col, jnp.arange(w), col)
            & new_valid[:, None, None, :])
  sn = jnp.einsum("BWCE,BVCE->BWCV", q, k_new, preferred_element_type=f32, precision=hp) * scale
  sn = jnp.where(new_ok, sn, NEG_INF)
  big = jnp.max(sn, axis=-1)  # [B, W, C]
  if partials is not None:
    acc, m, l = partials
    big = jnp.maximum(big, jnp.max(m, axis=1))
  big = jnp.where(big > 0.5 * NEG_INF, big, 0.0)  # nothing readable: every weight below is 0
  pn = jnp.exp(sn - big[..., None]) * new_ok
  num = jnp.einsum("BWCV,BVCE->BWCE", pn, v_new.astype(f32), precision=hp)
  den = jnp.sum(pn, axis=-1)
  if partials is not None:
    wt = jnp.exp(m - big[:, None])  # [B, NS, W, C]; 0 for splits that read nothing
    num = num + jnp.einsum("BJWC,BJWCE->BWCE", wt, acc, precision=hp)
    den = den + jnp.sum(wt * l, axis=1)
  return (num / jnp.where(den == 0.0, 1.0, den)[..., None]).astype(q.dtype)


def _num_sms(default: int = 132) -> int:
  """The SM count of this process's GPU (`core_count` of a CUDA device), else `default` (an
  H100's: compile-only targets and the interpreter)."""
  try:
    device = jax.devices()[0]
    return int(getattr(device, "core_count", 0)) or default if device.platform == "gpu" else default
  except Exception:  # noqa: BLE001 -- no backend to ask
    return default


def decode_pallas(q, k_cache, v_cache, cache_valid, length, k_new, v_new, new_valid, *,
                  mask="causal", scale=None, block_sizes: DecodeBlockSizes | None = None,
                  interpret: bool = False):
  """Split-key decode: a Triton kernel over (B, C, row blocks of W, key splits) writes partial
  softmaxes of the cache; XLA merges them with the new entries (`_combine`). same_position
  reads no cache, so it runs no kernel. `block_sizes` defaults to `DecodeBlockSizes.for_shapes`."""
  b, w, c, e = q.shape
  s = k_cache.shape[4]
  mode = validate_mode(mask)
  if block_sizes is None:
    block_sizes = DecodeBlockSizes.for_shapes(b, w, s, c, e, num_sms=_num_sms())
  elif not isinstance(block_sizes, DecodeBlockSizes):
    raise ValueError(f"block_sizes={block_sizes!r}: expected a DecodeBlockSizes")
  scale = e**-0.5 if scale is None else float(scale)
  partials = None
  if mode != Mode.SAME_POSITION and s > 0:  # every cache entry is at an earlier column
    partials = _cache_partials(q, k_cache, v_cache, cache_valid, length, mode=mode, scale=scale,
                               blocks=block_sizes, interpret=interpret)
  return _combine(q, length.astype(jnp.int32), k_new, v_new, new_valid, partials, mode=mode,
                  scale=scale)
