"""Backbone (per-thread causal GQA) attention behind one `implementation=` switch.

  "reference"   plain jnp (`reference.py`, the specification)
  "xla"         jax.nn.dot_product_attention, XLA implementation
  "cudnn"       jax.nn.dot_product_attention with cuDNN's fused kernel (GPU, bf16/fp16)
  "pallas_tpu"  Pallas flash attention from jax.experimental.pallas.ops.tpu (TPU; padding as
                segment ids; kv heads repeated to the query heads)
  None          auto: cudnn on GPU for bf16/fp16, pallas_tpu on TPU when T is a multiple of
                128, xla otherwise

The mask is structured, never passed in: query t (grid column q_offset + t) reads key s iff
key_valid[s] and (not causal or s <= q_offset + t). Outputs at query rows that are padding are
unspecified (no valid row ever reads them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.attention.reference import attention_reference

IMPLEMENTATIONS = ("reference", "xla", "cudnn", "pallas_tpu")


def default_implementation(dtype, seq_len: int, backend: str | None = None) -> str:
  backend = backend or jax.default_backend()
  if backend in ("gpu", "cuda") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  if backend == "tpu" and seq_len % 128 == 0:
    return "pallas_tpu"
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
              implementation: str | None = None) -> jax.Array:
  """q [B, T, N, H], k/v [B, S, K, H], key_valid [B, S] bool -> [B, T, N, H]."""
  b, t, n, h = q.shape
  impl = implementation or default_implementation(q.dtype, t)
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation={impl!r}; available: {IMPLEMENTATIONS}")
  scale = h**-0.5 if scale is None else scale
  if impl == "reference":
    return attention_reference(q, k, v, structured_mask(t, key_valid, causal, q_offset),
                               scale=scale)
  if impl in ("xla", "cudnn"):
    mask = structured_mask(t, key_valid, causal, q_offset)[:, None]  # [B, 1, T, S]
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=impl)
    # rows with no readable key: XLA gives the mean of all values, the reference zeros
    return jnp.where(mask.any(-1)[:, 0, :, None, None], out, 0).astype(q.dtype)
  return _pallas_tpu(q, k, v, key_valid, causal, scale)


def _pallas_tpu(q, k, v, key_valid, causal, scale):
  from jax.experimental.pallas.ops.tpu import flash_attention as fa
  b, t, n, h = q.shape
  g = n // k.shape[2]
  k = jnp.repeat(k, g, axis=2)  # the TPU kernel has no GQA
  v = jnp.repeat(v, g, axis=2)
  seg = key_valid.astype(jnp.int32)
  out = fa.flash_attention(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3),
                           v.transpose(0, 2, 1, 3), segment_ids=fa.SegmentIds(q=seg, kv=seg),
                           causal=causal, sm_scale=scale)
  return out.transpose(0, 2, 1, 3)
