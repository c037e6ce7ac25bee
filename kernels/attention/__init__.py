"""Backbone (per-thread causal GQA) attention behind one `implementation=` switch.

  "reference"   plain jnp (`reference.py`, the specification)
  "xla"         jax.nn.dot_product_attention, XLA implementation
  "cudnn"       cuDNN's fused flash kernel (GPU, bf16/fp16) through jax.nn.dot_product_attention,
                with no mask or bias tensor: causal masking by `is_causal`, padding by sequence
                lengths, after the valid tokens of each row are gathered to its front
                (`_cudnn`). For training and prefill (causal, q_offset 0, T = S); one query
                column goes to xla_chunked
  "splash_tpu"  jax's splash attention (Pallas, TPU): GQA as its MQA kernel per kv head over
                that head's G query heads (no repeated k, v), a static causal block mask (the
                blocks above the diagonal are skipped, not masked), padding as segment ids;
                T = S multiples of 128. For training and prefill
  "pallas_tpu"  jax's Pallas TPU flash attention (padding as segment ids; kv heads repeated to
                the query heads): kept for comparison
  "xla_chunked" online softmax over key blocks (a lax.scan): memory linear in S, and only one
                block of a bf16 cache is ever widened to f32; for decoding (T = 1)
  "flash"       the lattice attention kernels with one thread (`kernels.lattice_attention`,
                mask "causal" over one thread = causal attention): flash forward and backward,
                no [T, S] tensor in memory; Pallas (Triton) on GPU, blockwise XLA elsewhere.
                For training and prefill (q_offset 0); one query column goes to xla_chunked
  None          auto, for the platform compiled for (`kernels.backend()`): xla_chunked for one
                query column (decoding); flash on GPU; splash_tpu on TPU when T is a multiple
                of 128; xla otherwise. splash_tpu against pallas_tpu at the recipes' shapes
                (one layer's gradient, 8 rows x 4,096 columns, compile-only v5p): XLA's
                temporaries 0.88 vs 1.49 GB (Qwen3-1.7B's 16 / 8 heads), 1.53 vs 2.97 GB (4B's
                32 / 8), docs/benchmarks.md

Decoding reads the cache through `decode_attention` (one query column against a head-major
[B, K, S, H] cache, only the blocks up to the filled columns; the model's cache is laid out so).

The mask is structured, never passed in: query t (grid column q_offset + t) reads key s iff
key_valid[s] and (not causal or s <= q_offset + t). Outputs at query rows that are padding are
unspecified (no valid row ever reads them).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from lace_jax import kernels
from lace_jax.kernels import lattice_attention as lattice_lib  # the flash path's kernels
from lace_jax.kernels.attention.reference import NEG_INF, attention_reference

IMPLEMENTATIONS = ("reference", "xla", "cudnn", "pallas_tpu", "splash_tpu", "xla_chunked",
                   "flash")
DECODE_BLOCK = 512


def default_implementation(dtype, seq_len: int, backend: str | None = None) -> str:
  del dtype  # every automatic choice serves float32 and bf16 alike
  backend = backend or kernels.backend()
  if seq_len == 1:  # decoding: one query column against a long cache
    return "xla_chunked"
  if backend in ("gpu", "cuda", "rocm"):
    return "flash"
  if backend == "tpu" and seq_len % 128 == 0:
    return "splash_tpu"
  return "xla"


def structured_mask(t: int, key_valid: jax.Array, causal: bool, q_offset=0) -> jax.Array:
  """[B, T, S] bool from key validity [B, S]."""
  s = key_valid.shape[-1]
  allowed = jnp.ones((t, s), bool)
  if causal:
    allowed = jnp.arange(s)[None, :] <= (q_offset + jnp.arange(t))[:, None]
  return allowed[None] & key_valid[:, None, :]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, key_valid: jax.Array,
              causal: bool = True, q_offset: int | jax.Array = 0, scale: float | None = None,
              implementation: str | None = None, batch_axes: Sequence[str] = ()) -> jax.Array:
  """q [B, T, N, H], k/v [B, S, K, H], key_valid [B, S] bool -> [B, T, N, H].

  batch_axes: the mesh axes B is split over (under `jax.set_mesh`); a Pallas kernel runs on
  each device's rows (`lace_jax.kernels.batch_parallel`)."""
  b, t, n, h = q.shape
  impl = implementation or default_implementation(q.dtype, t)
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation={impl!r}; available: {IMPLEMENTATIONS}")
  scale = h**-0.5 if scale is None else scale
  if impl == "reference":
    return attention_reference(q, k, v, structured_mask(t, key_valid, causal, q_offset),
                               scale=scale)
  if impl in ("flash", "cudnn") and t == 1 and k.shape[1] > 1:
    # one decoding column against a longer cache: the flash kernels serve T = S from column 0,
    # and never cuDNN's kernel
    impl = "xla_chunked"
  if impl == "xla_chunked":
    return _chunked(q, k, v, key_valid, causal, q_offset, scale)
  if impl == "flash":
    return _flash(q, k, v, key_valid, causal, q_offset, scale, batch_axes)
  if impl == "cudnn":
    return _cudnn(q, k, v, key_valid, causal, q_offset, scale)
  if impl == "xla":
    mask = structured_mask(t, key_valid, causal, q_offset)[:, None]  # [B, 1, T, S]
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")
    # rows with no readable key: XLA gives the mean of all values, the reference zeros
    return jnp.where(mask.any(-1)[:, 0, :, None, None], out, 0).astype(q.dtype)
  if impl == "splash_tpu":
    return _splash_tpu(q, k, v, key_valid, causal, scale, batch_axes)
  return _pallas_tpu(q, k, v, key_valid, causal, scale, batch_axes)


def _softmax_block(acc, m, l, sc, mask, weighted_values):
  """One key block of an online softmax: scores sc [..., blk] where mask, and
  weighted_values(p) = the block's values weighted by p -> the new (acc, max, sum)."""
  sc = jnp.where(mask, sc, NEG_INF)
  m_new = jnp.maximum(m, jnp.max(sc, -1))
  p = jnp.exp(sc - m_new[..., None]) * mask
  alpha = jnp.exp(m - m_new)
  return acc * alpha[..., None] + weighted_values(p), m_new, alpha * l + jnp.sum(p, -1)


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, key_valid: jax.Array,
                     limit: jax.Array | int | None = None, scale: float | None = None,
                     implementation: str | None = None, block: int = DECODE_BLOCK
                     ) -> jax.Array:
  """One query column against a head-major decoding cache: q [B, N, H], k/v [B, K, S, H],
  key_valid [B, S] -> [B, N, H]. Reads key j where key_valid[j] and j < limit (a scalar: the
  caller's largest filled column + 1; None: all S), in blocks of `block` columns: the blocks
  at or past `limit` are not read at all (a while loop of ceil(limit / block) trips), so a
  decode step costs the filled columns, not the reserved ones.

  The cache is head-major so that the two dots (batch dims B, K; contracting H, then S) read
  it as laid out: with [B, S, K, H] XLA:GPU copies the whole cache to that layout every column.
  implementation "reference" is the dense reference; any other value runs the blocked online
  softmax (forward only, every platform). Rows with no readable key give zeros."""
  b, n, h = q.shape
  kh, s = k.shape[1], k.shape[2]
  scale = h**-0.5 if scale is None else scale
  cols = jnp.arange(s)
  ok = key_valid if limit is None else key_valid & (cols[None, :] < limit)
  if implementation == "reference":
    out = attention_reference(q[:, None], k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                              ok[:, None, :], scale=scale)
    return out[:, 0]
  g = n // kh
  qg = q.reshape(b, kh, g, h)
  block = min(block, s)
  nb = -(-s // block)
  trips = nb if limit is None else jnp.clip(-(-jnp.asarray(limit, jnp.int32) // block), 0, nb)

  def body(j, carry):
    acc, m, l = carry
    # when S is not a multiple of the block, the last block starts early (S - block) and
    # skips the columns the one before it read: no padded copy of the cache
    start = jnp.minimum(j * block, s - block)
    kb = jax.lax.dynamic_slice_in_dim(k, start, block, axis=2)  # [B, K, blk, H]
    vb = jax.lax.dynamic_slice_in_dim(v, start, block, axis=2)
    fresh = start + jnp.arange(block) >= j * block
    mask = (jax.lax.dynamic_slice_in_dim(ok, start, block, axis=1) & fresh)[:, None, None]
    sc = jnp.einsum("BKGH,BKSH->BKGS", qg, kb, preferred_element_type=jnp.float32) * scale
    return _softmax_block(acc, m, l, sc, mask, lambda p: jnp.einsum(
        "BKGS,BKSH->BKGH", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32))

  init = (jnp.zeros((b, kh, g, h), jnp.float32), jnp.full((b, kh, g), NEG_INF, jnp.float32),
          jnp.zeros((b, kh, g), jnp.float32))
  acc, _, l = jax.lax.fori_loop(0, trips, body, init)
  return (acc / jnp.where(l == 0, 1.0, l)[..., None]).reshape(b, n, h).astype(q.dtype)


def _flash(q, k, v, key_valid, causal, q_offset, scale, batch_axes):
  """Causal GQA as one-thread lattice attention: kv heads repeated to the query heads."""
  if not causal or not (isinstance(q_offset, int) and q_offset == 0):
    raise ValueError("attention implementation 'flash' serves causal attention from column 0 "
                     "(training, prefill); decode with 'xla_chunked'")
  if q.shape[1] != k.shape[1]:
    raise ValueError(f"attention implementation 'flash': T={q.shape[1]} queries need as many "
                     f"keys, got S={k.shape[1]}")
  g = q.shape[2] // k.shape[2]
  k = jnp.repeat(k, g, axis=2)[:, None]  # [B, 1, S, N, H]
  v = jnp.repeat(v, g, axis=2)[:, None]
  out = lattice_lib.lattice_attention(q[:, None], k, v, key_valid=key_valid[:, None],
                                      mask="causal", scale=scale, batch_axes=batch_axes)
  return out[:, 0]


def _cudnn(q, k, v, key_valid, causal, q_offset, scale, kernel: str = "cudnn"):
  """Causal self-attention through cuDNN's fused kernel, with no [T, S] mask or bias.

  jax.nn.dot_product_attention turns a `mask=` into an additive bias, and cuDNN then computes
  the bias gradient in the backward ([B, 1, T, S] per layer, never used) and needs even T and S.
  Here the structured mask is given to the kernel as `is_causal` plus per-row sequence lengths
  (cuDNN's padding-causal mask, generated inside the kernel). Sequence lengths describe a
  valid prefix, so each row's valid tokens are first gathered, in order, to its front: a stable
  partition [valid..., padding...]. Causal order among valid tokens is kept, so a valid query
  reads exactly the valid keys at or before it, as in the reference, for ANY key_valid (left
  padding, right padding, holes); rows that already are a prefix gather by the identity. The
  padding model.py feeds (prompts left-padded, generations right-padded: one interval per
  thread) costs one gather of q, k, v and one of the output, each O(B T N H).

  Query t is token t (self-attention, T = S, from column 0): a query whose own key is invalid is
  padding; its output is zero (the reference's value for a row that reads no key). A row with
  no valid token is given length 1 (it reads one padding key; finite) and zeroed.

  `kernel` "xla" runs the same call through XLA's implementation of the same arguments (tests
  the gathering and the lengths on CPU, where cuDNN cannot run).

  q [B, T, N, H], k/v [B, S, K, H] (S = T), key_valid [B, S] -> [B, T, N, H].
  """
  b, t, n, h = q.shape
  if not causal or not (isinstance(q_offset, int) and q_offset == 0):
    raise ValueError("attention implementation 'cudnn' serves causal attention from column 0 "
                     f"(training, prefill); got causal={causal}, q_offset={q_offset!r}; decode "
                     "with 'xla_chunked'")
  if k.shape[1] != t:
    raise ValueError(f"attention implementation 'cudnn': T={t} queries need as many keys, got "
                     f"S={k.shape[1]}")
  if kernel == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"attention implementation 'cudnn' needs bfloat16 or float16 q/k/v, got "
                     f"q.dtype={q.dtype}")
  order = jnp.argsort(~key_valid, axis=-1, stable=True).astype(jnp.int32)  # [B, T] valid first
  inverse = jnp.argsort(order, axis=-1).astype(jnp.int32)  # [B, T]: token t's packed row
  length = jnp.maximum(jnp.sum(key_valid, -1, dtype=jnp.int32), 1)  # [B]
  out = jax.nn.dot_product_attention(
      _gather_rows(q, order, inverse), _gather_rows(k, order, inverse),
      _gather_rows(v, order, inverse), scale=scale, is_causal=True, query_seq_lengths=length,
      key_value_seq_lengths=length, implementation=kernel)  # [B, T, N, H], packed rows
  out = _gather_rows(out, inverse, order)
  return jnp.where(key_valid[:, :, None, None], out, 0).astype(q.dtype)


@jax.custom_vjp
def _gather_rows(x, index, inverse):
  """x [B, T, ...] -> x[b, index[b, t]]: a permutation of each row (`inverse` its inverse, so
  the gradient is a gather as well, not a scatter-add)."""
  return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def _gather_rows_fwd(x, index, inverse):
  return _gather_rows(x, index, inverse), (index, inverse)


def _gather_rows_bwd(res, g):
  index, inverse = res
  return _gather_rows(g, inverse, index), None, None


_gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def _splash_block(n: int, largest: int = 512) -> int:
  return max(b for b in range(128, largest + 1, 128) if n % b == 0)


def _splash_tpu(q, k, v, key_valid, causal, scale, batch_axes, interpret=False):
  """Splash attention for T = S, multiples of 128 (training, prefill). interpret: the kernel in
  the Pallas interpreter (CPU tests)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  if t != s or t % 128:
    raise ValueError(f"q {q.shape}, k {k.shape}: splash_tpu takes T = S, a multiple of 128")
  g = n // kh
  bq = _splash_block(t)
  blocks = sk.BlockSizes(block_q=bq, block_kv=bq, block_kv_compute=bq, block_q_dkv=bq,
                         block_kv_dkv=bq, block_kv_dkv_compute=bq, block_q_dq=bq, block_kv_dq=bq)
  one = sm.CausalMask((t, s)) if causal else sm.FullMask((t, s))
  kernel = sk.make_splash_mqa_single_device(sm.MultiHeadMask([one] * g), block_sizes=blocks,
                                            interpret=interpret)

  def run(q, k, v, key_valid):  # one device's rows
    rows = q.shape[0]
    seg = key_valid.astype(jnp.int32)
    qg = (q * jnp.asarray(scale, q.dtype)).reshape(rows, t, kh, g, h).transpose(0, 2, 3, 1, 4)
    heads = lambda x: x.transpose(0, 2, 1, 3)  # [rows, K, S, H]
    per_kv_head = jax.vmap(
        lambda q, k, v, sg: kernel(q, k, v, segment_ids=sk.SegmentIds(q=sg, kv=sg)),
        in_axes=(0, 0, 0, None))
    out = jax.vmap(per_kv_head)(qg, heads(k), heads(v), seg)  # [rows, K, G, T, H]
    return out.transpose(0, 3, 1, 2, 4).reshape(rows, t, n, h)

  # Mosaic calls need a shard_map
  return kernels.batch_parallel(run, q, k, v, key_valid, batch_axes=batch_axes)


def _pallas_tpu(q, k, v, key_valid, causal, scale, batch_axes):
  from jax.experimental.pallas.ops.tpu import flash_attention as fa
  b, t, n, h = q.shape
  g = n // k.shape[2]
  k = jnp.repeat(k, g, axis=2)  # the TPU kernel has no GQA
  v = jnp.repeat(v, g, axis=2)


  def run(q, k, v, key_valid):
    seg = key_valid.astype(jnp.int32)
    out = fa.flash_attention(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3),
                             v.transpose(0, 2, 1, 3), segment_ids=fa.SegmentIds(q=seg, kv=seg),
                             causal=causal, sm_scale=scale)
    return out.transpose(0, 2, 1, 3)

  # Mosaic calls need a shard_map
  return kernels.batch_parallel(run, q, k, v, key_valid, batch_axes=batch_axes)


def _chunked(q, k, v, key_valid, causal, q_offset, scale, block: int = DECODE_BLOCK):
  """Online softmax over key blocks of `block` columns (forward only: used for decoding)."""
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  block = min(block, s)
  pad = (-s) % block
  if pad:
    k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
    key_valid = jnp.pad(key_valid, ((0, 0), (0, pad)))
  nb = k.shape[1] // block
  qg = q.reshape(b, t, kh, n // kh, h)  # [B, T, K, G, H]
  rows = q_offset + jnp.arange(t)

  def body(carry, j):
    acc, m, l = carry
    kb = jax.lax.dynamic_slice_in_dim(k, j * block, block, axis=1)  # [B, blk, K, H]
    vb = jax.lax.dynamic_slice_in_dim(v, j * block, block, axis=1)
    ok = jax.lax.dynamic_slice_in_dim(key_valid, j * block, block, axis=1)  # [B, blk]
    cols = j * block + jnp.arange(block)
    allowed = ok[:, None, :] & ((cols[None, :] <= rows[:, None]) if causal else True)
    sc = jnp.einsum("BTKGH,BSKH->BKGTS", qg, kb, preferred_element_type=jnp.float32) * scale
    mask = allowed[:, None, None]  # [B, 1, 1, T, blk]
    return _softmax_block(acc, m, l, sc, mask, lambda p: jnp.einsum(
        "BKGTS,BSKH->BKGTH", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)), None

  g = n // kh
  init = (jnp.zeros((b, kh, g, t, h), jnp.float32), jnp.full((b, kh, g, t), NEG_INF, jnp.float32),
          jnp.zeros((b, kh, g, t), jnp.float32))
  (acc, _, l), _ = jax.lax.scan(body, init, jnp.arange(nb))
  out = acc / jnp.where(l == 0, 1.0, l)[..., None]  # [B, K, G, T, H]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype)
