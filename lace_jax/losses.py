"""Token log-probabilities and softmax entropies without the full logits.

Letters: see `lace_jax.config` (B batch, W thread, T positions, D model width, V vocab);
in shape comments c is the chunk length.

Every loss of this package needs, per position, log p(target) and perhaps the entropy of the
next-token softmax. Formed the plain way, that first materialises the logits [..., T, V] in
float32: at Qwen3's vocabulary of 151,936, a batch of B=16 examples of W=4 threads of T=4096
positions has 16 * 4 * 4096 * 151,936 * 4 bytes = 1.6e11 bytes (159 GB) of logits, and the
backward pass holds several such arrays (the softmax, its cotangent). `token_logprobs` forms
them a chunk at a time inside a loop instead, reducing each chunk to numbers per position
before the next, and its `custom_vjp` backward recomputes each chunk's logits rather than
saving them. Two ways to cut (`over`):

- over="vocab" (the default): `chunk` rows of the unembedding at a time, [..., T, c] logits
  alive at once; an online log-sum-exp (running max, sum of exponentials, sum of
  exp * logit for the entropy, and the target's logit) carries the softmax across slices, and
  the backward accumulates d hidden in float32 while emitting d unembed slice by slice. The
  hidden states are never sliced, so the activation sharding (batch over data/fsdp) flows
  through the loop untouched: this is the form XLA:TPU compiles at real shapes (the token form
  below, with activation constraints, stalls XLA:TPU's layout assignment, issue 12).
- over="tokens": `chunk` positions at a time, [..., c, V] logits alive at once, a scan over
  the T axis cut into chunks stacked on a new leading axis.

Alive in the forward: c / V (vocab) or c / T (tokens) of the full float32 logits; in the
backward those and their cotangent in hidden's dtype (about 1.5 times that with bf16 hidden).
When a mesh is set (`jax.set_mesh`) and hidden has leading axes, the first is taken for the
batch: chunk logits and gradients are constrained to its sharding (`lace_jax.sharding.
constrain`), so the loop cannot lose it. `token_logprobs_dense` is the plain jnp
specification both forms are tested against.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lace_jax.config import DEFAULT_LOGITS_CHUNK
from lace_jax.errors import ConfigError
from lace_jax.sharding import constrain


OVER = ("vocab", "tokens")  # the axes `token_logprobs` can chunk over
DEFAULT_CHUNK = DEFAULT_LOGITS_CHUNK  # vocabulary rows per slice (lace_jax.config)


def token_logprobs(hidden: jax.Array, unembed: jax.Array, targets: jax.Array, *,
                   chunk: int = DEFAULT_CHUNK, over: str = "vocab"
                   ) -> tuple[jax.Array, jax.Array]:
  """(log p(target), entropy of the softmax), each float32 [..., T], chunked (module doc).

  hidden [..., T, D] (any float dtype, e.g. bf16); unembed [V, D] (the tied embedding, or an
  untied lm_head [D, V] passed transposed); targets int [..., T]. The logits hidden @ unembed^T
  are computed in hidden.dtype with float32 accumulation, then the softmax in float32, `chunk`
  rows of V (over="vocab") or positions of T (over="tokens") at a time, so the full
  [..., T, V] float32 logits never exist, in the forward or the backward. The cut axis is
  padded up to a multiple of chunk (padding rows of V get logit -1e30; padded positions are
  sliced off); a chunk larger than the axis is one chunk; chunk <= 0 selects
  `token_logprobs_dense`. Differentiable w.r.t. hidden and unembed (cotangents in their
  dtypes); targets get none.
  """
  _check(hidden, unembed, targets)
  if chunk <= 0:
    return token_logprobs_dense(hidden, unembed, targets)
  if over == "vocab":
    return _vocab_chunked(hidden, unembed, targets, min(chunk, unembed.shape[0]))
  if over != "tokens":
    raise ConfigError(f"over={over!r}: expected one of {OVER} (train.logits_chunk_over)")
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


def _split(x: jax.Array, chunk: int, t_axis: int) -> jax.Array:
  """x with its T axis (`t_axis`, counted from the end) zero-padded to n * chunk and cut into
  n chunks stacked in front: [..., T, *rest] -> [n, ..., chunk, *rest] (the scan's xs)."""
  t = x.shape[t_axis]
  n = -(-t // chunk)
  if n * chunk != t:
    widths = [(0, 0)] * x.ndim
    widths[x.ndim + t_axis] = (0, n * chunk - t)
    x = jnp.pad(x, widths)
  axis = x.ndim + t_axis
  x = x.reshape(*x.shape[:axis], n, chunk, *x.shape[axis + 1:])
  x = jnp.moveaxis(x, axis, 0)
  if axis == 0:  # no leading (batch) axis
    return x
  return constrain(x, (None, "batch") + (None,) * (x.ndim - 2))


def _join(x: jax.Array, t: int, t_axis: int) -> jax.Array:
  """The inverse of `_split`: [n, ..., chunk, *rest] -> [..., T, *rest]."""
  axis = x.ndim - 1 + t_axis  # where the chunk axis sits once n is moved back
  x = jnp.moveaxis(x, 0, axis)
  x = x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2:])
  return jax.lax.slice_in_dim(x, 0, t, axis=axis)


def _batch(x: jax.Array, last: str | None = None) -> jax.Array:
  """A chunk x [B, ..., c, last] constrained to the batch sharding on axis 0 (and `last`'s on
  the last); an unbatched chunk [c, last] unchanged."""
  if x.ndim < 3:
    return x
  return constrain(x, ("batch",) + (None,) * (x.ndim - 2) + (last,))


def _chunk_logits(hidden_c: jax.Array, unembed: jax.Array) -> jax.Array:
  """[..., c, D] x [V, D] (both in the compute dtype) -> float32 logits [..., c, V]."""
  z = jnp.einsum("...TD,VD->...TV", _batch(hidden_c), unembed,
                 preferred_element_type=jnp.float32)
  return _batch(z, "act_vocab")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked(hidden, unembed, targets, chunk):
  return _chunked_fwd(hidden, unembed, targets, chunk)[0]


# The loops are scans over chunks stacked on a new leading axis (`_split`): each step reads
# its chunk as an xs slice and emits its results as ys; only the [D, V] gradient of unembed is
# carried.

def _chunked_fwd(hidden, unembed, targets, chunk):
  t = hidden.shape[-2]
  unembed_c = unembed.astype(hidden.dtype)

  def body(_, xs):
    h_c, tgt = xs  # [..., c, D], [..., c]
    z = _chunk_logits(h_c, unembed_c)  # [..., c, V] float32
    lse_c = jax.nn.logsumexp(z, axis=-1)  # [..., c]
    # Two reductions of z, each fused with its own elementwise math, so z is the only
    # [..., c, V] buffer. -sum p log p sums non-negative terms (lse - sum p z would cancel).
    logp_all = z - lse_c[..., None]
    ent_c = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    logp_c = jnp.take_along_axis(z, tgt[..., None], axis=-1)[..., 0] - lse_c
    return None, (logp_c, lse_c, ent_c)

  xs = (_split(hidden, chunk, -2), _split(targets.astype(jnp.int32), chunk, -1))
  _, ys = jax.lax.scan(body, None, xs)
  logp, lse, entropy = (_join(y, t, -1) for y in ys)
  # Only [..., T] float32 vectors are saved beyond the inputs: no logits.
  return (logp, entropy), (hidden, unembed, targets, lse, entropy)


def _chunked_bwd(chunk, residuals, cotangents):
  hidden, unembed, targets, lse, entropy = residuals
  g_lp, g_h = cotangents  # float32 [..., T]
  t = hidden.shape[-2]
  compute = hidden.dtype
  unembed_c = unembed.astype(compute)

  def body(d_unembed_t, xs):  # d_unembed_t: [D, V] float32
    h_c, tgt, lse_c, ent_c, g_lp_c, g_h_c = xs  # [..., c, D], then [..., c] each
    z = _chunk_logits(h_c, unembed_c)  # [..., c, V] float32
    logp_all = z - lse_c[..., None]
    p = jnp.exp(logp_all)
    onehot = jax.nn.one_hot(tgt, z.shape[-1], dtype=jnp.float32)
    # d logp(y)/dz = onehot(y) - p;  dH/dz = -p (log p + H)
    dz = (g_lp_c[..., None] * (onehot - p)
          - g_h_c[..., None] * p * (logp_all + ent_c[..., None]))  # [..., c, V]
    dz = _batch(dz.astype(compute), "act_vocab")
    d_h_c = jnp.einsum("...TV,VD->...TD", dz, unembed_c, preferred_element_type=jnp.float32)
    # "...TD,...TV->DV" as a dot_general contracting the leading axes in their own order
    # (einsum reorders them, which makes XLA transpose dz), accumulated as [D, V] so dz is
    # the right operand as laid out: no copy of it
    lead = tuple(range(dz.ndim - 1))
    d_unembed_t = d_unembed_t + jax.lax.dot_general(
        h_c, dz, ((lead, lead), ((), ())), preferred_element_type=jnp.float32)
    return d_unembed_t, _batch(d_h_c.astype(compute))

  # Padded positions get zero cotangents, so they contribute nothing.
  vec = lambda x: _split(x.astype(jnp.float32), chunk, -1)
  xs = (_split(hidden, chunk, -2), _split(targets.astype(jnp.int32), chunk, -1), vec(lse),
        vec(entropy), vec(g_lp), vec(g_h))
  d_unembed_t, d_hidden = jax.lax.scan(body, jnp.zeros(unembed.shape[::-1], jnp.float32), xs)
  return _join(d_hidden, t, -2), d_unembed_t.T.astype(unembed.dtype), None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


# ----------------------------------------------------------------- chunks of the vocabulary

_NEG = -1e30  # logit of the padding rows of the last vocabulary slice (exp underflows to 0)


def _vocab_slices(unembed: jax.Array, chunk: int, dtype) -> jax.Array:
  """unembed [V, D] zero-padded to n * chunk rows, as [n, chunk, D] in `dtype`."""
  v, d = unembed.shape
  n = -(-v // chunk)
  return jnp.pad(unembed.astype(dtype), ((0, n * chunk - v), (0, 0))).reshape(n, chunk, d)


def _slice_logits(hidden, u_c, i, chunk, v):
  """Logits [..., T, chunk] float32 of vocabulary slice i (padding rows at _NEG), row ids."""
  ids = i * chunk + jnp.arange(chunk)
  z = _batch(jnp.einsum("...TD,VD->...TV", hidden, u_c, preferred_element_type=jnp.float32))
  return jnp.where(ids < v, z, _NEG), ids


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _vocab_chunked(hidden, unembed, targets, chunk):
  return _vocab_fwd(hidden, unembed, targets, chunk)[0]


def _vocab_fwd(hidden, unembed, targets, chunk):
  v = unembed.shape[0]
  tgt = targets.astype(jnp.int32)
  lead = hidden.shape[:-1]

  def body(carry, xs):
    # running max m, sum s = sum exp(z - m), a = sum exp(z - m) (z - m), target logit
    m, s, a, tl = carry
    u_c, i = xs
    z, ids = _slice_logits(hidden, u_c, i, chunk, v)
    m_new = jnp.maximum(m, jnp.max(z, axis=-1))
    e = jnp.exp(z - m_new[..., None])
    scale = jnp.exp(m - m_new)
    s_new = s * scale + jnp.sum(e, axis=-1)
    a_new = scale * (a + (m - m_new) * s) + jnp.sum(e * (z - m_new[..., None]), axis=-1)
    tl = tl + jnp.sum(jnp.where(ids == tgt[..., None], z, 0.0), axis=-1)
    return (m_new, s_new, a_new, tl), None

  zeros = jnp.zeros(lead, jnp.float32)
  init = (jnp.full(lead, _NEG, jnp.float32), zeros, zeros, zeros)
  slices = _vocab_slices(unembed, chunk, hidden.dtype)
  (m, s, a, tl), _ = jax.lax.scan(body, init, (slices, jnp.arange(slices.shape[0])))
  lse = m + jnp.log(s)
  entropy = jnp.log(s) - a / s  # -sum p log p = log s - sum e (z - m) / s
  return (tl - lse, entropy), (hidden, unembed, targets, lse, entropy)


def _vocab_bwd(chunk, residuals, cotangents):
  hidden, unembed, targets, lse, entropy = residuals
  g_lp, g_h = cotangents  # float32 [..., T]
  v = unembed.shape[0]
  tgt = targets.astype(jnp.int32)
  compute = hidden.dtype

  def body(d_hidden, xs):  # d_hidden [..., T, D] float32
    u_c, i = xs
    z, ids = _slice_logits(hidden, u_c, i, chunk, v)
    logp_all = z - lse[..., None]
    p = jnp.exp(logp_all)  # 0 on padding rows
    onehot = (ids == tgt[..., None]).astype(jnp.float32)
    dz = g_lp[..., None] * (onehot - p) - g_h[..., None] * p * (logp_all + entropy[..., None])
    dz = _batch(dz.astype(compute))
    d_hidden = _batch(d_hidden + jnp.einsum("...TV,VD->...TD", dz, u_c,
                                            preferred_element_type=jnp.float32))
    lead = tuple(range(dz.ndim - 1))
    d_u = jax.lax.dot_general(dz, hidden, ((lead, lead), ((), ())),
                              preferred_element_type=jnp.float32)  # [chunk, D]
    return d_hidden, d_u

  slices = _vocab_slices(unembed, chunk, compute)
  d_hidden, d_u = jax.lax.scan(body, _batch(jnp.zeros(hidden.shape, jnp.float32)),
                               (slices, jnp.arange(slices.shape[0])))
  d_unembed = d_u.reshape(-1, unembed.shape[1])[:v]
  return d_hidden.astype(hidden.dtype), d_unembed.astype(unembed.dtype), None


_vocab_chunked.defvjp(_vocab_fwd, _vocab_bwd)
