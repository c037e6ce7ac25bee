"""Token log-probabilities and softmax entropies without the full logits.

Letters: see `lace_jax.config` (B batch, W thread, T positions, D model width, V vocab);
in shape comments c is the chunk length.

Every loss of this package needs, per position, log p(target) and perhaps the entropy of the
next-token softmax. Formed the plain way, that first materialises the logits [..., T, V] in
float32: at Qwen3's vocabulary of 151,936, a batch of B=16 examples of W=4 threads of T=4096
positions has 16 * 4 * 4096 * 151,936 * 4 bytes = 1.6e11 bytes (159 GB) of logits, and the
backward pass holds several such arrays (the softmax, its cotangent). `token_logprobs` instead
forms the logits `chunk` positions at a time inside a loop and reduces each chunk to numbers
per position before the next; its `custom_vjp` backward recomputes each chunk's logits rather
than saving them. What is alive at once is one chunk's float32 logits [..., chunk, V] in the
forward, and those and their cotangent (in hidden's dtype) in the backward: 2 * chunk / T of
the full logits in float32 (1/4 at chunk=512, T=4096), 1.5 * chunk / T with bf16 hidden.

The loop slices the T axis (axis -2 of hidden) only; leading axes, sharded over devices in
real runs, are never reshaped or transposed. `token_logprobs_dense` is the plain jnp
specification the chunked function is tested against.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def token_logprobs(hidden: jax.Array, unembed: jax.Array, targets: jax.Array, *,
                   chunk: int = 512) -> tuple[jax.Array, jax.Array]:
  """(log p(target), entropy of the softmax), each float32 [..., T], chunked over T.

  hidden [..., T, D] (any float dtype, e.g. bf16); unembed [V, D] (the tied embedding, or an
  untied lm_head [D, V] passed transposed); targets int [..., T]. The logits hidden @ unembed^T
  are computed in hidden.dtype with float32 accumulation, then the softmax in float32, `chunk`
  positions of T at a time, so the full [..., T, V] float32 logits never exist, in the forward
  or the backward. T is padded up to a multiple of chunk (outputs sliced back); chunk > T is
  one chunk of T; chunk <= 0 selects `token_logprobs_dense`. Differentiable w.r.t. hidden and
  unembed (cotangents in their dtypes); targets get none.
  """
  _check(hidden, unembed, targets)
  if chunk <= 0:
    return token_logprobs_dense(hidden, unembed, targets)
  return _chunked(hidden, unembed, targets, min(chunk, hidden.shape[-2]))


def token_logprobs_dense(hidden: jax.Array, unembed: jax.Array, targets: jax.Array
                         ) -> tuple[jax.Array, jax.Array]:
  """The specification of `token_logprobs`: log_softmax over the full float32 logits."""
  _check(hidden, unembed, targets)
  logits = jnp.einsum("...TD,VD->...TV", hidden, unembed.astype(hidden.dtype),
                      preferred_element_type=jnp.float32)  # [..., T, V]
  logp_all = jax.nn.log_softmax(logits, axis=-1)
  logp = jnp.take_along_axis(logp_all, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
  return logp, entropy


def _check(hidden: jax.Array, unembed: jax.Array, targets: jax.Array) -> None:
  if hidden.ndim < 2:
    raise ValueError(f"hidden must be [..., T, D], got {hidden.shape=}")
  if unembed.ndim != 2:
    raise ValueError(f"unembed must be [V, D] (an lm_head [D, V] passed transposed), got "
                     f"{unembed.shape=}")
  if unembed.shape[1] != hidden.shape[-1]:
    raise ValueError(f"unembed [V, D] has D={unembed.shape[1]} but hidden has "
                     f"D={hidden.shape[-1]}: {unembed.shape=}, {hidden.shape=} (an lm_head "
                     f"[D, V] must be passed transposed)")
  if targets.shape != hidden.shape[:-1]:
    raise ValueError(f"targets must be hidden.shape[:-1]={hidden.shape[:-1]}, got "
                     f"{targets.shape=}")
  if not jnp.issubdtype(targets.dtype, jnp.integer):
    raise ValueError(f"targets must be integer token ids, got {targets.dtype=}")


def _pad_t(x: jax.Array, t_pad: int, axis: int) -> jax.Array:
  """x zero-padded by t_pad at the end of the T axis (`axis`, counted from the end)."""
  if not t_pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[x.ndim + axis] = (0, t_pad)
  return jnp.pad(x, widths)


def _chunk_logits(hidden_c: jax.Array, unembed: jax.Array) -> jax.Array:
  """[..., c, D] x [V, D] (both in the compute dtype) -> float32 logits [..., c, V]."""
  return jnp.einsum("...TD,VD->...TV", hidden_c, unembed, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked(hidden, unembed, targets, chunk):
  return _chunked_fwd(hidden, unembed, targets, chunk)[0]


def _chunked_fwd(hidden, unembed, targets, chunk):
  t = hidden.shape[-2]
  n = -(-t // chunk)
  t_pad = n * chunk - t
  hidden_p = _pad_t(hidden, t_pad, -2)  # [..., n * chunk, D]
  targets_p = _pad_t(targets.astype(jnp.int32), t_pad, -1)  # [..., n * chunk]
  unembed_c = unembed.astype(hidden.dtype)

  def body(i, carry):
    logp, lse, entropy = carry  # each float32 [..., n * chunk]
    start = i * chunk
    h_c = jax.lax.dynamic_slice_in_dim(hidden_p, start, chunk, axis=-2)  # [..., c, D]
    z = _chunk_logits(h_c, unembed_c)  # [..., c, V] float32
    tgt = jax.lax.dynamic_slice_in_dim(targets_p, start, chunk, axis=-1)  # [..., c]
    lse_c = jax.nn.logsumexp(z, axis=-1)  # [..., c]
    # Two reductions of z, each fused with its own elementwise math, so z is the only
    # [..., c, V] buffer. -sum p log p sums non-negative terms (lse - sum p z would cancel).
    logp_all = z - lse_c[..., None]
    ent_c = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    logp_c = jnp.take_along_axis(z, tgt[..., None], axis=-1)[..., 0] - lse_c
    put = functools.partial(jax.lax.dynamic_update_slice_in_dim, start_index=start, axis=-1)
    return put(logp, logp_c), put(lse, lse_c), put(entropy, ent_c)

  zeros = jnp.zeros(targets_p.shape, jnp.float32)
  logp, lse, entropy = jax.lax.fori_loop(0, n, body, (zeros, zeros, zeros))
  logp, lse, entropy = logp[..., :t], lse[..., :t], entropy[..., :t]
  # Only [..., T] float32 vectors are saved beyond the inputs: no logits.
  return (logp, entropy), (hidden, unembed, targets, lse, entropy)


def _chunked_bwd(chunk, residuals, cotangents):
  hidden, unembed, targets, lse, entropy = residuals
  g_lp, g_h = cotangents  # float32 [..., T]
  t = hidden.shape[-2]
  n = -(-t // chunk)
  t_pad = n * chunk - t
  hidden_p = _pad_t(hidden, t_pad, -2)
  targets_p = _pad_t(targets.astype(jnp.int32), t_pad, -1)
  # Padded positions have zero cotangents, so they contribute nothing below.
  lse_p, ent_p, g_lp_p, g_h_p = (_pad_t(x.astype(jnp.float32), t_pad, -1)
                                 for x in (lse, entropy, g_lp, g_h))
  compute = hidden.dtype
  unembed_c = unembed.astype(compute)

  def body(i, carry):
    d_hidden, d_unembed_t = carry  # [..., n * chunk, D] hidden.dtype, [D, V] float32
    start = i * chunk
    sl = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=start, slice_size=chunk,
                           axis=-1)
    h_c = jax.lax.dynamic_slice_in_dim(hidden_p, start, chunk, axis=-2)  # [..., c, D]
    z = _chunk_logits(h_c, unembed_c)  # [..., c, V] float32
    logp_all = z - sl(lse_p)[..., None]
    p = jnp.exp(logp_all)
    onehot = jax.nn.one_hot(sl(targets_p), z.shape[-1], dtype=jnp.float32)
    # d logp(y)/dz = onehot(y) - p;  dH/dz = -p (log p + H)
    dz = (sl(g_lp_p)[..., None] * (onehot - p)
          - sl(g_h_p)[..., None] * p * (logp_all + sl(ent_p)[..., None]))  # [..., c, V]
    dz = dz.astype(compute)
    d_h_c = jnp.einsum("...TV,VD->...TD", dz, unembed_c, preferred_element_type=jnp.float32)
    d_hidden = jax.lax.dynamic_update_slice_in_dim(d_hidden, d_h_c.astype(compute), start,
                                                   axis=-2)
    # "...TD,...TV->DV" as a dot_general contracting the leading axes in their own order
    # (einsum reorders them, which makes XLA transpose dz), accumulated as [D, V] so dz is
    # the right operand as laid out: no copy of it
    lead = tuple(range(dz.ndim - 1))
    d_unembed_t = d_unembed_t + jax.lax.dot_general(
        h_c, dz, ((lead, lead), ((), ())), preferred_element_type=jnp.float32)
    return d_hidden, d_unembed_t

  init = (jnp.zeros(hidden_p.shape, compute), jnp.zeros(unembed.shape[::-1], jnp.float32))
  d_hidden, d_unembed_t = jax.lax.fori_loop(0, n, body, init)
  return d_hidden[..., :t, :], d_unembed_t.T.astype(unembed.dtype), None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)
