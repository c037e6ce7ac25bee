"""Qwen3 with a thread axis and gated cross-thread ("lattice") attention.

Parameters are declared by Flax Linen modules (one module per parameter group, every parameter
carrying logical axis names for sharding); the math is in pure functions (`lace_jax.ops`,
`kernels.*`). `Model` is the hashable description (configs only); parameters are a plain pytree passed
explicitly:

  model, params = build_model(ModelConfig.preset("tiny"), LatticeConfig.default(cfg))
  logits = model.apply(params, tokens)   # int32 [B, W, T] -> float32 [B, W, T, V]

Letters: B batch · W thread · T/S positions · D model · N/K heads · G = N/K · H head dim
F MLP hidden · V vocab · R lattice width · C lattice heads · E = R/C lattice head dim.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lace_jax.kernels.attention import attention, decode_attention
from lace_jax.kernels.lattice_attention import lattice_attention, lattice_decode_attention
from lace_jax import ops
from lace_jax.sharding import batch_axes, constrain
from lace_jax.config import LatticeConfig, ModelConfig

Params = Any  # a nested dict of arrays

# logical axes of the activations constrained at layer boundaries (`lace_jax.sharding`)
_X = ("batch", "thread", "seq", "act_embed")  # [B, W, T, D]
_Q = ("batch", "thread", "seq", "act_heads", None)  # [B, W, T, N, H]
_KV = ("batch", "thread", "seq", "act_kv_heads", None)  # [B, W, T, K, H]
_F = ("batch", "thread", "seq", "act_mlp")  # [B, W, T, F]
_R = ("batch", "thread", "seq", None)  # [B, W, T, R]
_V = ("batch", "thread", "seq", "act_vocab")  # [B, W, T, V]

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...],
           init: Callable, dtype: str) -> jax.Array:
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.dtype(dtype))


class RMSNorm(nn.Module):
  dim: int
  eps: float
  param_dtype: str
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = _param(self, "scale", (self.dim,), (self.axis_name,), nn.initializers.ones,
                   self.param_dtype)
    return ops.rms_norm(x, scale, self.eps)


class Attention(nn.Module):
  """Per-thread causal GQA with q/k RMSNorm and RoPE; threads are folded into the batch."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, valid: jax.Array,
               cache: dict | None = None, cur: jax.Array | None = None,
               valid_cache: jax.Array | None = None):
    """x [B, W, T, D] -> (o_proj output [B, W, T, D], pre-projection output a [B, W, T, N, H],
    this layer's new cache {k, v: [B, W, K, S, H]} (head-major: the decode attention's dots
    read it as laid out) or None).

    cache None: training (causal over the T columns). cache given and cur None: prefill, the
    T columns are written at 0..T-1. cur given: one decoding column (T = 1) written at `cur`,
    attending to every valid cached column <= cur (valid_cache [B, W, S] already updated).
    """
    cfg = self.cfg
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    init = nn.initializers.normal(cfg.init_std)
    dt = jnp.dtype(cfg.dtype)
    wq = _param(self, "q_proj", (d, n, h), ("embed", "heads", "head_dim"), init, cfg.param_dtype)
    wk = _param(self, "k_proj", (d, k, h), ("embed", "kv_heads", "head_dim"), init,
                cfg.param_dtype)
    wv = _param(self, "v_proj", (d, k, h), ("embed", "kv_heads", "head_dim"), init,
                cfg.param_dtype)
    wo = _param(self, "o_proj", (n, h, d), ("heads", "head_dim", "embed"), init, cfg.param_dtype)
    q = constrain(jnp.einsum("BWTD,DNH->BWTNH", x, wq.astype(dt)), _Q)
    kk = constrain(jnp.einsum("BWTD,DKH->BWTKH", x, wk.astype(dt)), _KV)
    v = constrain(jnp.einsum("BWTD,DKH->BWTKH", x, wv.astype(dt)), _KV)
    q = RMSNorm(h, cfg.rms_eps, cfg.param_dtype, "head_dim", name="q_norm")(q)
    kk = RMSNorm(h, cfg.rms_eps, cfg.param_dtype, "head_dim", name="k_norm")(kk)
    q = ops.rope(q, positions, cfg.rope_theta)
    kk = ops.rope(kk, positions, cfg.rope_theta)

    b, w, t = x.shape[:3]
    new_cache = None
    if cur is None:  # training or prefill: attention over these T columns
      a = attention(q.reshape(b * w, t, n, h), kk.reshape(b * w, t, k, h),
                    v.reshape(b * w, t, k, h), key_valid=valid.reshape(b * w, t), causal=True,
                    implementation=cfg.attention, batch_axes=batch_axes())
      if cache is not None:
        new_cache = {"k": _write(cache["k"], _heads_major(kk), 0, axis=3),
                     "v": _write(cache["v"], _heads_major(v), 0, axis=3)}
    else:  # one decoding column against the cache
      ck = _write(cache["k"], _heads_major(kk), cur, axis=3)  # [B, W, K, S, H]
      cv = _write(cache["v"], _heads_major(v), cur, axis=3)
      s = ck.shape[3]
      # no column after a row's own (cur, or cur[b] per row) is valid yet: the cache's validity
      # is the mask, and no block past the largest column is read
      a = decode_attention(q.reshape(b * w, n, h), ck.reshape(b * w, k, s, h),
                           cv.reshape(b * w, k, s, h), key_valid=valid_cache.reshape(b * w, s),
                           limit=jnp.max(cur) + 1, implementation=cfg.attention)[:, None]
      new_cache = {"k": ck, "v": cv}
    a = constrain(a.reshape(b, w, t, n, h), _Q)  # [B, W, T, N, H]
    out = constrain(jnp.einsum("BWTNH,NHD->BWTD", a, wo.astype(dt)), _X)
    return out, a, new_cache


def _heads_major(x: jax.Array) -> jax.Array:
  """[B, W, T, K, H] -> [B, W, K, T, H] (the backbone cache's layout)."""
  return x.transpose(0, 1, 3, 2, 4)


def _columns(x: jax.Array) -> jax.Array:
  """[B, W, T, C, E] -> [B, W, C, E, T] (the lattice cache's layout)."""
  return x.transpose(0, 1, 3, 4, 2)


# the column (sequence) axis of each kind of cache entry (`init_cache`)
CACHE_SEQ_AXIS = {"attn": 3, "lattice": 4, "valid": 2}


def cache_seq_axis(path) -> int:
  """The column axis of the cache entry at tree `path` (of a cache or its "layers")."""
  keys = [getattr(k, "key", getattr(k, "name", k)) for k in path]
  return CACHE_SEQ_AXIS[next((k for k in ("attn", "lattice") if k in keys), "valid")]


def _write(buf: jax.Array, new: jax.Array, col, axis: int = 2) -> jax.Array:
  """Writes new into buf at columns col..col+T-1 of `axis` (new has T there; otherwise buf's
  shape); col a scalar, or [B] (each row at its own column: the generation engine's slots)."""
  new = new.astype(buf.dtype)
  if jnp.ndim(col) == 1:
    def row(b, x, c):
      start = [0] * b.ndim
      start[axis - 1] = c
      return jax.lax.dynamic_update_slice(b, x, tuple(start))
    return jax.vmap(row)(buf, new, col)
  start = [0] * buf.ndim
  start[axis] = col
  return jax.lax.dynamic_update_slice(buf, new, tuple(start))


class Lattice(nn.Module):
  """The gated cross-thread side path of one lattice layer (spec section 3).

  h = src W_down; q, k, v = h Wq, h Wk, h Wv; 3D RoPE on q, k; p = attend over the W*T grid;
  p = p Wp; g = sigmoid([h; p] Wg + bg); out = (g * p) W_up, with W_up zero at init.
  """

  cfg: ModelConfig
  lat: LatticeConfig

  @nn.compact
  def __call__(self, src: jax.Array, coords: tuple[jax.Array, ...], valid: jax.Array,
               cache: dict | None = None, cur: jax.Array | None = None,
               valid_cache: jax.Array | None = None):
    """src: a [B, W, T, N, H] (source attn_out) or x [B, W, T, D] (source hidden);
    coords: one [B, W, T] coordinate per rotary section; valid: [B, W, T].
    Returns ([B, W, T, D], new lattice cache {k, v: [B, W, C, E, S]} or None); cache modes as
    in `Attention`. The cache holds keys after RoPE, one [E, S] matrix per thread and head
    (`kernels/lattice_attention/decode.py` says why)."""
    cfg, lat = self.cfg, self.lat
    r, c, e = lat.width, lat.heads, lat.head_dim
    init = lambda fan_in: nn.initializers.normal(lat.init_std or fan_in**-0.5)
    pdt, dt = cfg.param_dtype, jnp.dtype(cfg.dtype)
    if lat.source == "attn_out":
      w_down = _param(self, "down", (cfg.num_heads, cfg.head_dim, r),
                      ("heads", "head_dim", "lattice"), init(cfg.num_heads * cfg.head_dim), pdt)
      h = jnp.einsum("BWTNH,NHR->BWTR", src, w_down.astype(dt))
    else:
      w_down = _param(self, "down", (cfg.d_model, r), ("embed", "lattice"), init(cfg.d_model),
                      pdt)
      h = jnp.einsum("BWTD,DR->BWTR", src, w_down.astype(dt))
    h = constrain(h, _R)
    self.sow("intermediates", "input", h)  # [B, W, T, R], for analysis, as "qk" below
    axes = ("lattice", "lattice_heads", "lattice_head_dim")
    wq = _param(self, "q", (r, c, e), axes, init(r), pdt)
    wk = _param(self, "k", (r, c, e), axes, init(r), pdt)
    wv = _param(self, "v", (r, c, e), axes, init(r), pdt)
    wp = _param(self, "p", (c, e, r), ("lattice_heads", "lattice_head_dim", "lattice"), init(r),
                pdt)
    q = jnp.einsum("BWTR,RCE->BWTCE", h, wq.astype(dt))
    k = jnp.einsum("BWTR,RCE->BWTCE", h, wk.astype(dt))
    v = jnp.einsum("BWTR,RCE->BWTCE", h, wv.astype(dt))
    if lat.qk_norm:
      q = RMSNorm(e, cfg.rms_eps, pdt, "lattice_head_dim", name="q_norm")(q)
      k = RMSNorm(e, cfg.rms_eps, pdt, "lattice_head_dim", name="k_norm")(k)
    thetas = tuple(th if th > 0 else cfg.rope_theta for th in lat.rope_thetas)
    q = ops.multi_axis_rope(q, coords, lat.rope_sections, thetas)
    k = ops.multi_axis_rope(k, coords, lat.rope_sections, thetas)
    # for analysis (`lace_jax.diagnostics`): a no-op unless "intermediates" is mutable
    self.sow("intermediates", "qk", (q, k))
    new_cache = None
    if cur is None:
      p = lattice_attention(q, k, v, key_valid=valid, mask=lat.mask,
                            implementation=lat.implementation,
                            batch_axes=batch_axes())  # [B, W, T, C, E]
      if cache is not None:
        new_cache = {"k": _write(cache["k"], _columns(k), 0, axis=4),
                     "v": _write(cache["v"], _columns(v), 0, axis=4)}
    else:
      b = q.shape[0]
      p = lattice_decode_attention(
          q[:, :, 0], cache["k"], cache["v"], valid_cache,
          jnp.broadcast_to(cur, (b,)).astype(jnp.int32), k[:, :, 0], v[:, :, 0], valid[:, :, 0],
          mask=lat.mask, implementation=lat.implementation,
          batch_axes=batch_axes())[:, :, None]  # [B, W, 1, C, E]
      new_cache = {"k": _write(cache["k"], _columns(k), cur, axis=4),
                   "v": _write(cache["v"], _columns(v), cur, axis=4)}
    p = jnp.einsum("BWTCE,CER->BWTR", p, wp.astype(dt))
    if lat.gate != "none":
      gates = r if lat.gate == "elementwise" else c
      wg = _param(self, "gate", (2 * r, gates), ("lattice_gate_in", "lattice_gate"),
                  init(2 * r), pdt)
      bg = _param(self, "gate_bias", (gates,), ("lattice_gate",), nn.initializers.zeros, pdt)
      hp = jnp.concatenate([h, p], axis=-1)  # [B, W, T, 2R]
      g = jax.nn.sigmoid(jnp.einsum("BWTX,XY->BWTY", hp, wg.astype(dt)) + bg.astype(dt))
      self.sow("intermediates", "gate", g)  # [B, W, T, R or C], as "qk" above
      if lat.gate == "head":  # one gate per lattice head, shared by its E dims
        g = jnp.repeat(g, e, axis=-1)
      p = g * p  # [B, W, T, R]
    w_up = _param(self, "up", (r, cfg.d_model), ("lattice", "embed"), nn.initializers.zeros, pdt)
    return constrain(jnp.einsum("BWTR,RD->BWTD", p, w_up.astype(dt)), _X), new_cache


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.cfg
    init = nn.initializers.normal(cfg.init_std)
    dt = jnp.dtype(cfg.dtype)
    wg = _param(self, "gate", (cfg.d_model, cfg.mlp_dim), ("embed", "mlp"), init, cfg.param_dtype)
    wu = _param(self, "up", (cfg.d_model, cfg.mlp_dim), ("embed", "mlp"), init, cfg.param_dtype)
    wd = _param(self, "down", (cfg.mlp_dim, cfg.d_model), ("mlp", "embed"), init, cfg.param_dtype)
    gate = jnp.einsum("BWTD,DF->BWTF", x, wg.astype(dt))
    up = jnp.einsum("BWTD,DF->BWTF", x, wu.astype(dt))
    act = constrain(jax.nn.silu(gate) * up, _F)
    return constrain(jnp.einsum("BWTF,FD->BWTD", act, wd.astype(dt)), _X)


class DecoderLayer(nn.Module):
  cfg: ModelConfig
  lat: LatticeConfig | None  # None: no lattice side path in this layer

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, valid: jax.Array,
               coords: tuple[jax.Array, ...], cache: dict | None = None,
               cur: jax.Array | None = None, valid_cache: jax.Array | None = None):
    """-> (x [B, W, T, D], this layer's new cache or None)."""
    cfg = self.cfg
    h = RMSNorm(cfg.d_model, cfg.rms_eps, cfg.param_dtype, name="input_norm")(x)
    attn_cache = None if cache is None else cache["attn"]
    out, a, new_attn = Attention(cfg, name="attn")(h, positions, valid, attn_cache, cur,
                                                   valid_cache)
    new_cache = None if cache is None else {"attn": new_attn}
    if self.lat is not None:
      src = a if self.lat.source == "attn_out" else h
      lat_cache = None if cache is None else cache["lattice"]
      side, new_lat = Lattice(cfg, self.lat, name="lattice")(src, coords, valid, lat_cache, cur,
                                                             valid_cache)
      out = out + side
      if cache is not None:
        new_cache["lattice"] = new_lat
    x = x + out
    h = RMSNorm(cfg.d_model, cfg.rms_eps, cfg.param_dtype, name="post_norm")(x)
    return x + MLP(cfg, name="mlp")(h), new_cache


class Transformer(nn.Module):
  """tokens [B, W, T] -> (logits float32 [B, W, T, V], final hidden [B, W, T, D], the updated
  decoding cache or None)."""

  cfg: ModelConfig
  lat: LatticeConfig | None = None

  @nn.compact
  def __call__(self, tokens: jax.Array, positions: jax.Array, valid: jax.Array,
               extra_coords: Mapping[str, jax.Array] | None = None, cache: dict | None = None,
               cur: jax.Array | None = None, logits: str = "all"):
    """cache None: training forward. Otherwise prefill (cur None: these T columns are written
    at 0..T-1) or one decoding column at `cur`; the updated cache is returned third.
    logits: "all" columns, the "last" column only ([B, W, 1, V]), or "none" (None returned:
    the caller unembeds the hidden states itself, e.g. chunked, `lace_jax.losses`)."""
    cfg, lat = self.cfg, self.lat
    dt = jnp.dtype(cfg.dtype)
    embed = _param(self, "embed", (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                   nn.initializers.normal(cfg.init_std), cfg.param_dtype)
    x = constrain(jnp.take(embed, tokens, axis=0).astype(dt), _X)  # [B, W, T, D]
    coords = _lattice_coords(lat, positions, extra_coords) if lat else ()
    valid_cache = None
    new_cache = None
    if cache is not None:
      valid_cache = _write(cache["valid"], valid, 0 if cur is None else cur)  # [B, W, S]
      new_cache = {"valid": valid_cache, "layers": {}}
    layer_cls = DecoderLayer
    if cfg.remat != "none":
      layer_cls = nn.remat(DecoderLayer, policy=_REMAT_POLICIES[cfg.remat])
    for i in range(cfg.num_layers):
      layer_lat = lat if (lat is not None and i in lat.layers) else None
      layer_cache = None if cache is None else cache["layers"][i]
      x, new_layer = layer_cls(cfg, layer_lat, name=f"layers_{i}")(
          x, positions, valid, coords, layer_cache, cur, valid_cache)
      x = constrain(x, _X)
      if cache is not None:
        new_cache["layers"][i] = new_layer
    x = constrain(RMSNorm(cfg.d_model, cfg.rms_eps, cfg.param_dtype, name="final_norm")(x), _X)
    unembed = embed  # [V, D]
    if not cfg.tie_embeddings:
      head = _param(self, "lm_head", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                    nn.initializers.normal(cfg.init_std), cfg.param_dtype)
      unembed = head.T
    if logits not in ("all", "last", "none"):
      raise ValueError(f"logits={logits!r}; expected 'all', 'last' or 'none'")
    out = None
    if logits != "none":
      out = constrain(unembed_logits(x[:, :, -1:] if logits == "last" else x, unembed, dt), _V)
    return out, x, new_cache


def unembed_logits(hidden: jax.Array, unembed: jax.Array, dtype) -> jax.Array:
  """hidden [..., D] @ unembed [V, D]^T -> float32 logits [..., V] (matmul in `dtype`, float32
  accumulation)."""
  return jnp.einsum("...D,VD->...V", hidden.astype(dtype), unembed.astype(dtype),
                    preferred_element_type=jnp.float32).astype(jnp.float32)


def _lattice_coords(lat: LatticeConfig, positions: jax.Array,
                    extra: Mapping[str, jax.Array] | None) -> tuple[jax.Array, ...]:
  """One [B, W, T] coordinate per rotary axis of the lattice heads."""
  b, w, t = positions.shape
  named = {"token": positions,
           "thread": jnp.broadcast_to(jnp.arange(w, dtype=jnp.int32)[None, :, None], (b, w, t))}
  for name, value in (extra or {}).items():
    if name in ("token", "thread"):
      raise ValueError(f"extra coordinate {name!r} is built in; pick another name")
    named[name] = jnp.broadcast_to(value, (b, w, t))
  missing = [a for a in lat.rope_axes if a not in named]
  if missing:
    raise ValueError(f"lattice.rope_axes={lat.rope_axes} needs coordinates {missing}: pass them "
                     "as extra_coords={name: [B, W, T] array}")
  return tuple(named[a] for a in lat.rope_axes)


@dataclasses.dataclass(frozen=True)
class Model:
  """A LACE model's description: its configs, no parameters (the gemma / tunix way).

  Hashable, so it is a static argument of jitted functions; the parameters are a plain pytree
  passed explicitly to every method, so `apply` is a pure function of (params, inputs): jit
  it, differentiate it, shard it.

    model = Model(ModelConfig.preset("tiny"), LatticeConfig.default(cfg))
    params = model.init(seed=0)
    logits = model.apply(params, tokens)   # int32 [B, W, T] -> float32 [B, W, T, V]
  """

  config: ModelConfig
  lattice: LatticeConfig | None = None

  def __post_init__(self):
    if self.lattice is not None:
      self.lattice.validate_for(self.config)

  @property
  def module(self) -> Transformer:
    return Transformer(self.config, self.lattice)

  def init(self, seed: int = 0) -> Params:
    """Fresh parameters. Lattice up-projections start at zero, so a fresh lattice model
    computes exactly its base model."""
    return jax.jit(functools.partial(init_params, self.config, self.lattice, seed))()

  def abstract_params(self) -> Params:
    """Parameter shapes and dtypes as `jax.ShapeDtypeStruct`s, allocating nothing."""
    return abstract_params(self.config, self.lattice)

  def logical_axes(self) -> Params:
    """Pytree (same structure as params) of logical axis-name tuples, for the sharding rules."""
    return logical_axes(self.config, self.lattice)

  def num_params(self) -> int:
    return count_params(self.abstract_params())

  def apply(self, params: Params, tokens: jax.Array, *, positions: jax.Array | None = None,
            valid: jax.Array | None = None,
            extra_coords: Mapping[str, jax.Array] | None = None,
            return_hidden: bool = False):
    """Forward pass.

    tokens: int32 [B, W, T]; valid: bool [B, W, T] (False = padding, never attended to;
    default all True); positions: int [B, W, T] (default: count of valid tokens before each,
    which makes left padding transparent). Returns float32 logits [B, W, T, V], and the final
    normalised hidden states [B, W, T, D] too if `return_hidden`.
    """
    tokens, positions, valid = _check_inputs(self.config, tokens, positions, valid)
    logits, hidden, _ = self.module.apply({"params": params}, tokens, positions, valid,
                                          extra_coords)
    return (logits, hidden) if return_hidden else logits

  def hidden_states(self, params: Params, tokens: jax.Array, *,
                    positions: jax.Array | None = None, valid: jax.Array | None = None,
                    extra_coords: Mapping[str, jax.Array] | None = None) -> jax.Array:
    """The final normalised hidden states [B, W, T, D], without forming any logits (inputs as
    in `apply`); `unembed(params)` maps them to the vocabulary, e.g. chunked by
    `lace_jax.losses.token_logprobs`."""
    tokens, positions, valid = _check_inputs(self.config, tokens, positions, valid)
    _, hidden, _ = self.module.apply({"params": params}, tokens, positions, valid, extra_coords,
                                     logits="none")
    return hidden

  def unembed(self, params: Params) -> jax.Array:
    """The output embedding [V, D]: the tied input embedding, or the transposed lm_head."""
    return params["embed"] if self.config.tie_embeddings else params["lm_head"].T

  def logits(self, params: Params, hidden: jax.Array) -> jax.Array:
    """float32 logits [..., V] of hidden states [..., D]."""
    return unembed_logits(hidden, self.unembed(params), jnp.dtype(self.config.dtype))

  def init_cache(self, batch: int, num_threads: int, max_len: int) -> dict:
    """Empty decoding caches for [batch, num_threads] threads of up to max_len columns:
    backbone k/v [B, W, K, S, H] per layer (head-major), lattice k/v [B, W, C, E, S] per
    lattice layer, and validity [B, W, S] (False until written). `cache_seq_axis` gives each
    entry's column axis."""
    return init_cache(self.config, self.lattice, batch, num_threads, max_len)

  def prefill(self, params: Params, cache: dict, tokens: jax.Array, positions: jax.Array,
              valid: jax.Array, *, logits: str = "all"):
    """Runs the prompt grid [B, W, P] (columns 0..P-1) and fills the caches.
    Returns (logits [B, W, P, V] (logits="last": [B, W, 1, V]; "none": None),
    hidden [B, W, P, D], cache)."""
    return self.module.apply({"params": params}, tokens, positions, valid, None, cache,
                             logits=logits)

  def decode_step(self, params: Params, cache: dict, tokens: jax.Array, positions: jax.Array,
                  valid: jax.Array, cur: jax.Array):
    """One lockstep column: tokens/positions/valid [B, W] at grid column `cur` (a scalar, or
    [B]: each row at its own column, whose later columns must not be valid in the cache).
    Returns (logits [B, W, V], hidden [B, W, D], cache)."""
    logits, hidden, cache = self.module.apply(
        {"params": params}, tokens[:, :, None], positions[:, :, None], valid[:, :, None], None,
        cache, cur)
    return logits[:, :, 0], hidden[:, :, 0], cache

  def replace(self, **kwargs) -> Model:
    return dataclasses.replace(self, **kwargs)


def _check_inputs(cfg: ModelConfig, tokens, positions, valid):
  tokens = jnp.asarray(tokens)
  if tokens.ndim != 3:
    raise ValueError(f"tokens shape {tokens.shape}: expected [B, W, T] (batch, threads, tokens);"
                     " use tokens[:, None] for a single thread")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens dtype {tokens.dtype}: expected an integer dtype")
  if valid is None:
    valid = jnp.ones(tokens.shape, bool)
  valid = jnp.asarray(valid, bool)
  if valid.shape != tokens.shape:
    raise ValueError(f"valid shape {valid.shape} != tokens shape {tokens.shape}")
  if positions is None:
    positions = ops.default_positions(valid)
  positions = jnp.asarray(positions, jnp.int32)
  if positions.shape != tokens.shape:
    raise ValueError(f"positions shape {positions.shape} != tokens shape {tokens.shape}")
  return tokens.astype(jnp.int32), positions, valid


def init_cache(cfg: ModelConfig, lattice: LatticeConfig | None, batch: int, num_threads: int,
               max_len: int) -> dict:
  dt = jnp.dtype(cfg.dtype)
  shape = (batch, num_threads, max_len)
  layers = {}
  for i in range(cfg.num_layers):
    kv = (batch, num_threads, cfg.num_kv_heads, max_len, cfg.head_dim)
    layers[i] = {"attn": {"k": jnp.zeros(kv, dt), "v": jnp.zeros(kv, dt)}}
    if lattice is not None and i in lattice.layers:
      lkv = (batch, num_threads, lattice.heads, lattice.head_dim, max_len)
      layers[i]["lattice"] = {"k": jnp.zeros(lkv, dt), "v": jnp.zeros(lkv, dt)}
  return {"valid": jnp.zeros(shape, bool), "layers": layers}


def _init_variables(cfg: ModelConfig, lattice: LatticeConfig | None, seed: int):
  if lattice is not None:  # the parameters do not depend on the kernel; a one-token grid is no
    lattice = dataclasses.replace(lattice, implementation="reference")  # kernel's shape
  module = Transformer(cfg, lattice)
  tokens = jnp.zeros((1, 1, 1), jnp.int32)
  extra = {a: tokens for a in (lattice.rope_axes if lattice else ()) if a not in ("token", "thread")}
  return module.init(jax.random.key(seed), tokens, jnp.zeros_like(tokens),
                     jnp.ones(tokens.shape, bool), extra)


def abstract_params(cfg: ModelConfig, lattice: LatticeConfig | None = None) -> Params:
  """Parameter shapes and dtypes as `jax.ShapeDtypeStruct`s, allocating nothing."""
  if lattice is not None:
    lattice.validate_for(cfg)
  variables = jax.eval_shape(functools.partial(_init_variables, cfg, lattice, 0))
  return nn.meta.unbox(variables["params"])


def logical_axes(cfg: ModelConfig, lattice: LatticeConfig | None = None) -> Params:
  variables = jax.eval_shape(functools.partial(_init_variables, cfg, lattice, 0))
  specs = nn.get_partition_spec(variables)["params"]
  return jax.tree.map(tuple, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def init_params(config: ModelConfig, lattice: LatticeConfig | None = None,
                seed: int = 0) -> Params:
  """Fresh parameters (traceable: call it inside `jax.jit` with out_shardings to create them
  already sharded)."""
  return nn.meta.unbox(_init_variables(config, lattice, seed)["params"])


def build_model(config: ModelConfig, lattice: LatticeConfig | None = None,
                seed: int = 0) -> tuple[Model, Params]:
  """(model, fresh parameters). Lattice up-projections start at zero, so a fresh lattice model
  computes exactly its base model."""
  model = Model(config, lattice)
  return model, model.init(seed)


def count_params(params: Params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def is_lattice_param(path: tuple[Any, ...]) -> bool:
  """True for a parameter of a lattice side path (a key path from `jax.tree_util`)."""
  return any(getattr(k, "key", None) == "lattice" for k in path)


def without_lattice(params: Params) -> Params:
  """The base model's parameters: `params` without any lattice side path (for
  `model.replace(lattice=None)`, the Isolated Parallel ablation on the same weights)."""
  return {k: ({n: v for n, v in layer.items() if n != "lattice"} if k.startswith("layers_")
              else layer) for k, layer in params.items()}


def lattice_param_mask(params: Params) -> Params:
  """Pytree of bools, True where the parameter belongs to a lattice side path."""
  return jax.tree_util.tree_map_with_path(lambda p, _: is_lattice_param(p), params)
