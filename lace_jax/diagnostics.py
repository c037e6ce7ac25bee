"""Thread-level diagnostics of the lattice: how much the threads read each other.

Per lattice layer i (the model's layer index), from a teacher-forced forward over finished
lattices (prompt + generated tokens):

  lattice/cross_thread/layer_i  share of the lattice attention mass on keys of *other*
                                threads (the paper's cross-attention ratio), in [0, 1]
  lattice/entropy/layer_i       attention entropy in nats (log of the number of readable keys
                                when attention is uniform)
  lattice/gate/layer_i          mean gate value g in (0, 1) (only when lattice.gate != "none")

each averaged over lattice heads and over the valid queries that read at least one key (a
query with nothing to read, e.g. `other_threads` at W = 1, has no distribution to measure);
the gate over every valid token and gate dimension. `lattice/cross_thread`,
`lattice/entropy` and `lattice/gate` are the means over layers. The attention is the lattice's
own: its mask mode, key validity, E ** -0.5 scale and masked softmax are the reference
kernel's (`kernels.lattice_attention.reference`), on the queries and keys after RoPE that the
lattice layers `sow`.

Memory: the score tensor is [C, W*Tq, W*T] per batch row (rows one at a time, `lax.map`), with
Tq <= max_queries query columns per thread, evenly spaced over the grid; keys are every column.

Letters: B batch · W threads · T columns · Tq query columns · C lattice heads · E lattice head
dim · Y gate dims · L lattice layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lace_jax.kernels.attention.reference import masked_softmax_weights
from lace_jax.kernels.lattice_attention.reference import lattice_mask
from lace_jax import ops, sharding

MAX_QUERIES = 128  # query columns per thread scored by default


# ---------------------------------------------------------------------------- the math


def query_columns(num_columns: int, max_queries: int) -> np.ndarray:
  """int32 [Tq]: at most max_queries grid columns, evenly spaced over 0..T-1 (all of them when
  T <= max_queries); static, so the score tensor's shape is known at trace time."""
  if max_queries <= 0 or num_columns <= max_queries:
    return np.arange(num_columns, dtype=np.int32)
  return np.unique(np.round(np.linspace(0, num_columns - 1, max_queries))).astype(np.int32)


def attention_probs(q: jax.Array, k: jax.Array, key_valid: jax.Array, mask: str,
                    q_cols: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The lattice attention weights of the queries at columns q_cols, as the reference computes
  them.

  q: [B, W, Tq, C, E] (the queries of columns q_cols [Tq]); k: [B, W, T, C, E];
  key_valid: [B, W, T]. Returns (probs float32 [B, C, W*Tq, W*T], rows of queries with no
  readable key all zero; allowed bool [B, W*Tq, W*T])."""
  b, w, tq, c, e = q.shape
  t = k.shape[2]
  k_cols = jnp.arange(t, dtype=jnp.int32)
  allowed = lattice_mask(w, jnp.asarray(q_cols, jnp.int32), k_cols, key_valid, mask)
  scores = jnp.einsum("BQCE,BKCE->BCQK", q.reshape(b, w * tq, c, e), k.reshape(b, w * t, c, e),
                      preferred_element_type=jnp.float32) * e**-0.5
  return masked_softmax_weights(scores, allowed[:, None]), allowed


def other_thread_mass(probs: jax.Array, num_threads: int) -> jax.Array:
  """probs [B, C, W*Tq, W*T] -> [B, C, W*Tq]: each query's attention mass on keys of threads
  other than its own (rows are thread-major: row = w * Tq + t, column = w' * T + s)."""
  w = num_threads
  tq, t = probs.shape[-2] // w, probs.shape[-1] // w
  other = jnp.repeat(jnp.arange(w), tq)[:, None] != jnp.repeat(jnp.arange(w), t)[None, :]
  return jnp.sum(jnp.where(other, probs, 0.0), axis=-1)


def attention_entropy(probs: jax.Array) -> jax.Array:
  """probs [..., K] -> [...]: -sum p log p in nats (0 for an all-zero row)."""
  return jnp.sum(jax.scipy.special.entr(probs), axis=-1)


def layer_attention_stats(q: jax.Array, k: jax.Array, valid: jax.Array, mask: str,
                          q_cols: np.ndarray) -> dict[str, jax.Array]:
  """Sums over one lattice layer's measured queries: {"cross_thread", "entropy": summed over
  heads and counted queries, "count": counted (query, head) pairs}, float32 scalars.

  q, k: [B, W, T, C, E] after RoPE; valid: [B, W, T]; q_cols: the static query columns [Tq].
  A query counts when it is valid and reads at least one key. Batch rows are scored one at a
  time (`lax.map`), so the largest temporary is [C, W*Tq, W*T]."""
  c = q.shape[3]
  qs = q[:, :, q_cols]  # [B, W, Tq, C, E]

  def one(row):
    qr, kr, vr = (x[None] for x in row)
    probs, allowed = attention_probs(qr, kr, vr, mask, q_cols)  # [1, C, WTq, WT]
    counted = vr[:, :, q_cols].reshape(1, -1) & jnp.any(allowed, axis=-1)  # [1, W*Tq]
    wts = counted[:, None].astype(jnp.float32)  # [1, 1, W*Tq]
    return (jnp.sum(other_thread_mass(probs, qr.shape[1]) * wts), jnp.sum(attention_entropy(probs) * wts),
            jnp.sum(wts) * c)

  cross, ent, count = jax.lax.map(one, (qs, k, valid))
  return {"cross_thread": cross.sum(), "entropy": ent.sum(), "count": count.sum()}


def gate_stats(g: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
  """g [B, W, T, Y], valid [B, W, T] -> {"gate": sum of g over valid tokens and Y,
  "count": their number}."""
  wts = valid.astype(jnp.float32)[..., None]
  return {"gate": jnp.sum(g.astype(jnp.float32) * wts),
          "count": jnp.sum(jnp.broadcast_to(wts, g.shape))}


def summarize(per_layer: dict[int, dict[str, jax.Array]]) -> dict[str, jax.Array]:
  """Per-layer sums ({"cross_thread", "entropy", "count"} of `layer_attention_stats`, and
  {"gate", "gate_count"} from `gate_stats` for gated lattices) -> the named means, per layer
  ("lattice/<stat>/layer_<i>") and over layers ("lattice/<stat>"). An empty mean is 0."""
  out = {}
  for stat, count in (("cross_thread", "count"), ("entropy", "count"), ("gate", "gate_count")):
    means = {i: st[stat] / jnp.maximum(st[count], 1.0)
             for i, st in sorted(per_layer.items()) if stat in st}
    out.update({f"lattice/{stat}/layer_{i}": m for i, m in means.items()})
    if means:
      out[f"lattice/{stat}"] = jnp.mean(jnp.stack(list(means.values())))
  return out


# ----------------------------------------------------------------------- the forward pass


def _layer_index(name: str) -> int:
  return int(name.rsplit("_", 1)[1])  # "layers_3" -> 3


def lattice_intermediates(model, params, tokens: jax.Array, valid: jax.Array,
                          positions: jax.Array | None = None) -> dict[int, dict[str, jax.Array]]:
  """{layer index: {"q", "k": [B, W, T, C, E] after RoPE, "input": [B, W, T, R] (the side
  path's input after W_down), "gate": [B, W, T, Y] (gated lattices only)}} from a
  teacher-forced forward (no logits formed). Traceable."""
  cfg = model.config
  if cfg.remat != "none":  # no gradient here: remat only complicates the sown collection
    model = model.replace(config=dataclasses.replace(cfg, remat="none"))
  if positions is None:
    positions = ops.default_positions(valid)
  _, state = model.module.apply({"params": params}, tokens, positions, valid, logits="none",
                                mutable=["intermediates"])
  out = {}
  for name, layer in state.get("intermediates", {}).items():
    if "lattice" not in layer:
      continue
    sown = layer["lattice"]
    q, k = sown["qk"][0]
    out[_layer_index(name)] = {"q": q, "k": k, "input": sown["input"][0]}
    if "gate" in sown:
      out[_layer_index(name)]["gate"] = sown["gate"][0]
  return out


def _diagnostics(model, max_queries: int, rules, params, tokens, valid):
  b, w, t = tokens.shape
  q_cols = query_columns(t, max_queries)
  per_layer = {}
  with sharding.logical_rules(rules):
    inter = lattice_intermediates(model, params, tokens, valid)
  for i, x in inter.items():
    st = layer_attention_stats(x["q"], x["k"], valid, model.lattice.mask, q_cols)
    if "gate" in x:
      gs = gate_stats(x["gate"], valid)
      st.update(gate=gs["gate"], gate_count=gs["count"])
    per_layer[i] = st
  return summarize(per_layer)


_jitted = jax.jit(_diagnostics, static_argnums=(0, 1, 2))


def lattice_diagnostics(model, params, tokens, valid, *, max_queries: int = MAX_QUERIES,
                        mesh: jax.sharding.Mesh | None = None,
                        rules: Sequence[tuple[str, Any]] | None = None) -> dict[str, float]:
  """The thread-level diagnostics (module docstring) of finished lattices: tokens int32 and
  valid bool [B, W, T] (prompt + generated columns, e.g. `sampling.full_grid`). {} for a model
  without a lattice. One compilation per (model, shape, max_queries); `mesh` / `rules`: run on
  the mesh the (sharded) params live on, activations constrained by those rules; on a mesh
  that spans processes every process calls it together with the same rows."""
  if model.lattice is None:
    return {}
  tokens, valid = np.asarray(tokens, np.int32), np.asarray(valid, bool)
  rules = None if rules is None else tuple(tuple(r) if isinstance(r, list) else r
                                           for r in rules)
  if mesh is None:
    tokens, valid = jnp.asarray(tokens), jnp.asarray(valid)
  else:  # replicated on the mesh: every process passes the same rows
    tokens, valid = sharding.replicate((tokens, valid), mesh)
  if mesh is not None:
    with jax.set_mesh(mesh):
      out = _jitted(model, int(max_queries), rules, params, tokens, valid)
  else:
    out = _jitted(model, int(max_queries), rules, params, tokens, valid)
  return {k: float(v) for k, v in jax.device_get(out).items()}
