"""Lockstep generation of W threads per example (spec section 9).

Every step each live thread emits one token; all threads of a batch sit in one grid, so the
lattice layers of each step see every thread's tokens up to that column. Prompts are
left-padded to a common length (per-thread prompts may differ), so generated column j is the
same grid column in every thread. A thread stops after emitting a stop token (by default
`<|im_end|>`) or at `max_new_tokens`; from then on its positions are invalid: it adds no keys,
to its own attention or to the lattice, while the other threads go on.

One jitted prefill, then one jitted `lax.while_loop` over columns with the caches donated; the
loop exits early once every thread has stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from lace_jax import ops, sharding
from lace_jax.errors import ConfigError
from lace_jax.model import Model, Params


@dataclasses.dataclass
class SampleOutput:
  """tokens [B, W, N] (pad after a thread stopped); logprobs [B, W, N] of each emitted token
  under the model's unmodified distribution (temperature 1, no top-p/top-k); lengths [B, W]
  (tokens emitted, the stop token included); finish_reasons [B][W] in {"stop", "length"};
  prompt_tokens / prompt_valid [B, W, P] (left-padded); mean_hidden [B, W, D] the mean final hidden
  state over each thread's emitted tokens (for diversity rewards)."""

  tokens: np.ndarray
  logprobs: np.ndarray
  lengths: np.ndarray
  finish_reasons: list[list[str]]
  prompt_tokens: np.ndarray
  prompt_valid: np.ndarray
  mean_hidden: np.ndarray

  def texts(self, tokenizer) -> list[list[str]]:
    """Decoded text of every thread, without the stop token."""
    out = []
    for b in range(self.tokens.shape[0]):
      row = []
      for w in range(self.tokens.shape[1]):
        n = int(self.lengths[b, w])
        ids = self.tokens[b, w, :n].tolist()
        if self.finish_reasons[b][w] == "stop":
          ids = ids[:-1]
        row.append(tokenizer.decode(ids))
      out.append(row)
    return out


def left_pad(prompts: Sequence[Sequence[Sequence[int]] | Sequence[int]], num_threads: int,
             pad_id: int, multiple: int = 16, width: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
  """prompts: per example, one id list (shared by all threads) or W id lists.
  Returns tokens, valid [B, W, P]: P = `width` if given, else the longest prompt rounded up to
  `multiple` (bounds recompilation)."""
  rows = []
  for i, p in enumerate(prompts):
    if len(p) and isinstance(p[0], (list, tuple, np.ndarray)):
      if len(p) != num_threads:
        raise ValueError(f"prompt {i}: {len(p)} per-thread prompts for {num_threads} threads")
      rows.append([list(map(int, x)) for x in p])
    else:
      rows.append([list(map(int, p))] * num_threads)
  longest = max(len(x) for r in rows for x in r)
  if longest == 0:
    raise ValueError("every prompt is empty; a prompt needs at least one token")
  if width is None:
    width = -(-longest // multiple) * multiple
  elif longest > width:
    raise ValueError(f"a prompt has {longest} tokens, more than the prompt width {width}")
  tokens = np.full((len(rows), num_threads, width), pad_id, np.int32)
  valid = np.zeros(tokens.shape, bool)
  for b, r in enumerate(rows):
    for w, x in enumerate(r):
      if not x:
        raise ValueError(f"prompt {b}, thread {w} is empty")
      tokens[b, w, width - len(x):] = x
      valid[b, w, width - len(x):] = True
  return tokens, valid


# Below this temperature (or top_p) a float32 value is indistinguishable from 0 for sampling
# (1e-300 rounds to 0, and dividing logits by it overflows): the example is greedy (top-1).
GREEDY_EPSILON = 1e-6


def _filter_logits(logits: jax.Array, temperature: jax.Array | float, top_k: jax.Array | int,
                   top_p: jax.Array | float) -> jax.Array:
  """logits [B, W, V] (or [B, V]...) -> sampling logits with temperature, top-k and nucleus
  filtering. temperature, top_k, top_p: scalars or per-example arrays [B] (traced: one
  compilation serves every value). top_k 0 is off, top_p >= 1 is off; the most likely token
  always survives the nucleus (top_p <= GREEDY_EPSILON keeps only it)."""
  per_example = lambda x, dtype: jnp.asarray(x, dtype).reshape(
      jnp.shape(x) + (1,) * (logits.ndim - jnp.ndim(x)))
  temperature = per_example(temperature, jnp.float32)
  top_k = per_example(top_k, jnp.int32)
  top_p = per_example(top_p, jnp.float32)
  logits = logits / temperature
  v = logits.shape[-1]

  def filtered(logits):
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]  # descending
    # top-k: drop what is below the k-th largest (ties with it stay)
    kth = jnp.take_along_axis(sorted_logits, jnp.clip(top_k - 1, 0, v - 1), axis=-1)
    kth = jnp.where(top_k > 0, kth, -jnp.inf)
    logits = jnp.where(logits < kth, -jnp.inf, logits)
    sorted_logits = jnp.where(sorted_logits < kth, -jnp.inf, sorted_logits)
    # nucleus: keep the smallest prefix whose mass reaches top_p
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    cum = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each token
    keep = (cum < top_p) | (jnp.arange(v) == 0)
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where((top_p < 1.0) & (logits < cutoff), -jnp.inf, logits)

  # the sort is skipped at run time when no example filters
  return jax.lax.cond(jnp.any(top_k > 0) | jnp.any(top_p < 1.0), filtered, lambda x: x, logits)


def _ends_with_sequence(out: jax.Array, last: jax.Array, stops: jax.Array) -> jax.Array:
  """[B, W] bool: the tokens out[b, w, last - n + 1 : last + 1] equal one of example b's stop
  sequences (last: a column, or [B] columns, one per example). stops [B, S, L]: S sequences per example, each right-aligned in L columns after
  -1 padding (a row of -1 is no sequence)."""
  b, w, n_cols = out.shape
  seq_len = stops.shape[-1]
  lengths = jnp.sum(stops >= 0, axis=-1)  # [B, S]
  last = jnp.broadcast_to(jnp.asarray(last, jnp.int32), (b,))[:, None]  # [B, 1]
  cols = jnp.clip(last - seq_len + 1 + jnp.arange(seq_len), 0, n_cols - 1)  # [B, L]
  window = jnp.take_along_axis(out, jnp.broadcast_to(cols[:, None], (b, w, seq_len)), axis=2)
  same = (stops[:, None] < 0) | (window[:, :, None] == stops[:, None])  # [B, W, S, L]
  hit = jnp.all(same, axis=-1) & (lengths[:, None] > 0) & (last[:, None] + 1 >= lengths[:, None])
  return jnp.any(hit, axis=-1)


def _choose(rng: jax.Array, logits: jax.Array, knobs: dict) -> jax.Array:
  """logits [B, W, V] -> one token per thread [B, W]: the argmax for a greedy example
  (temperature < GREEDY_EPSILON), else a draw from the filtered distribution."""
  temperature = knobs["temperature"]
  greedy = (temperature < GREEDY_EPSILON)[:, None]  # [B, 1]
  best = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def draw(logits):
    t = jnp.where(greedy[:, 0], 1.0, temperature)
    return jax.random.categorical(rng, _filter_logits(logits, t, knobs["top_k"],
                                                      knobs["top_p"])).astype(jnp.int32)

  drawn = jax.lax.cond(jnp.all(greedy), lambda x: best, draw, logits)
  return jnp.where(greedy, best, drawn)


_STATIC = ("model", "max_new_tokens", "stop_ids", "pad_id", "mesh", "rules")


def _constrain_cache(cache: dict, mesh, rules) -> dict:
  """The cache laid out on `mesh` by the rule table (batch over data/fsdp, kv heads over
  tensor); unchanged without a mesh (one device, or GSPMD's own choice)."""
  if mesh is None:
    return cache
  return jax.lax.with_sharding_constraint(cache, sharding.cache_sharding(cache, mesh, rules))


@functools.partial(jax.jit, static_argnames=_STATIC)
def _prefill(model: Model, params: Params, prompt: jax.Array, prompt_valid: jax.Array,
             rng: jax.Array, rng_decode: jax.Array, knobs: dict, *, max_new_tokens: int,
             stop_ids: tuple[int, ...], pad_id: int, mesh=None, rules=()):
  """Prompt grid -> (filled caches, the decode loop's state: the first emitted token and its
  logprob in column 0). knobs: the per-example sampling parameters (traced: `_knobs`)."""
  b, w, p = prompt.shape
  n = max_new_tokens
  cache = _constrain_cache(model.init_cache(b, w, p + n), mesh, rules)
  positions = ops.default_positions(prompt_valid)
  # left padding puts every prompt's end in column P-1: only its logits are formed
  with sharding.logical_rules(rules):  # activation constraints (when a mesh is set)
    logits, _, cache = model.prefill(params, cache, prompt, positions, prompt_valid,
                                     logits="last")
  cache = _constrain_cache(cache, mesh, rules)
  last = logits[:, :, -1]  # [B, W, V]
  first = _choose(rng, last, knobs)
  first_lp = jnp.take_along_axis(jax.nn.log_softmax(last), first[..., None], -1)[..., 0]
  next_pos = jnp.max(jnp.where(prompt_valid, positions + 1, 0), axis=-1)  # [B, W]
  out = jnp.full((b, w, n), pad_id, jnp.int32).at[:, :, 0].set(first)
  lps = jnp.zeros((b, w, n), jnp.float32).at[:, :, 0].set(first_lp)
  # a thread is done once it has emitted a stop token or completed a stop sequence
  done = (jnp.isin(first, jnp.asarray(stop_ids, jnp.int32))
          | _ends_with_sequence(out, jnp.int32(0), knobs["stops"]))
  state = dict(i=jnp.int32(0), out=out, lps=lps, lengths=jnp.ones((b, w), jnp.int32),
               hidden_sum=jnp.zeros((b, w, model.config.d_model), jnp.float32), done=done,
               pos=next_pos, rng=rng_decode)
  return cache, state


@functools.partial(jax.jit, static_argnames=_STATIC + ("prompt_len",),
                   donate_argnames=("cache", "state"))
def _decode(model: Model, params: Params, cache: dict, state: dict, until: jax.Array,
            knobs: dict, *, prompt_len: int, max_new_tokens: int, stop_ids: tuple[int, ...],
            pad_id: int, mesh=None, rules=()):
  """The lockstep loop: column P + i feeds token i of every live thread and emits token i+1,
  while i < min(until, N - 1) and some thread is live. Returns the caches, the state to go on
  from (a later call with a larger `until` continues exactly where this one stopped) and the
  mean hidden state [B, W, D] of every token emitted so far."""
  n, p = max_new_tokens, prompt_len
  stop = jnp.asarray(stop_ids, jnp.int32)

  def step(i, cache, out, pos, lengths, hidden_sum):
    token = jax.lax.dynamic_index_in_dim(out, i, axis=2, keepdims=False)
    live = lengths > i  # token i was emitted while the thread was live: a valid key
    with sharding.logical_rules(rules):
      logits, hidden, cache = model.decode_step(params, cache, token, pos, live, p + i)
    cache = _constrain_cache(cache, mesh, rules)
    hidden_sum = hidden_sum + jnp.where(live[..., None], hidden.astype(jnp.float32), 0.0)
    return logits, cache, hidden_sum

  end = jnp.minimum(until, n - 1)

  def cond(carry):
    _, s = carry
    return (s["i"] < end) & ~jnp.all(s["done"])

  def body(carry):
    cache, s = carry
    i, out = s["i"], s["out"]
    logits, cache, hidden_sum = step(i, cache, out, s["pos"], s["lengths"], s["hidden_sum"])
    rng, sub = jax.random.split(s["rng"])
    nxt = _choose(sub, logits, knobs)
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits), nxt[..., None], -1)[..., 0]
    emit = ~s["done"]
    out = out.at[:, :, i + 1].set(jnp.where(emit, nxt, pad_id))
    lps = s["lps"].at[:, :, i + 1].set(jnp.where(emit, lp, 0.0))
    done = s["done"] | (emit & (jnp.isin(nxt, stop)
                                | _ends_with_sequence(out, i + 1, knobs["stops"])))
    return cache, dict(i=i + 1, out=out, lps=lps, lengths=s["lengths"] + emit.astype(jnp.int32),
                       hidden_sum=hidden_sum, done=done, pos=s["pos"] + 1, rng=rng)

  cache, s = jax.lax.while_loop(cond, body, (cache, state))
  # the tokens emitted at the last column have not been fed: one more step for their hidden
  # state. It is not added to the state: a continuing call feeds that column again (writing
  # the same keys), so it would count twice
  _, cache, hidden_sum = step(s["i"], cache, s["out"], s["pos"], s["lengths"], s["hidden_sum"])
  mean_hidden = hidden_sum / jnp.maximum(s["lengths"], 1)[..., None]
  # the caches are returned (and dropped by the caller) so the donated buffers are updated in
  # place instead of copied; returning the loop's cache instead of this last step's kept a
  # second whole cache alive on XLA:TPU (the last step could not write in place)
  return cache, s, mean_hidden


class Cancelled(Exception):
  """`sample` stopped because its `should_cancel` callback returned True."""


def bucket(x: int, lo: int = 1) -> int:
  """The smallest power of two >= max(x, lo) (0 stays 0): a shape bucket."""
  return 0 if x == 0 else max(lo, 1 << max(0, x - 1).bit_length())


def _per_example(name: str, value, b: int, dtype) -> np.ndarray:
  """A scalar or B values -> an array [B] of `dtype`; ValueError naming `name` otherwise."""
  arr = np.asarray(value, dtype)
  if arr.ndim == 0:
    return np.full((b,), arr, dtype)
  if arr.shape != (b,):
    raise ValueError(f"{name} has shape {arr.shape}; expected a scalar or one value per "
                     f"prompt ({b},)")
  return arr


def _stop_array(shared: Sequence[Sequence[int]], per_example: Sequence | None, b: int,
                max_new_tokens: int) -> np.ndarray:
  """Stop sequences -> [B, S, L] right-aligned after -1 padding; S and L are powers of two (or
  0) so that few shapes are compiled. A sequence longer than max_new_tokens can never be
  completed and is left out."""
  if per_example is not None and len(per_example) != b:
    raise ValueError(f"example_stop_sequences has {len(per_example)} entries for {b} prompts")
  rows = []
  for i in range(b):
    seqs = list(shared) + (list(per_example[i]) if per_example is not None else [])
    seqs = [[int(t) for t in q] for q in seqs]
    for q in seqs:
      if any(t < 0 for t in q):
        raise ValueError(f"stop sequence {q} has a negative token id")
    rows.append([q for q in seqs if 0 < len(q) <= max_new_tokens])
  s = bucket(max((len(r) for r in rows), default=0))
  length = bucket(max((len(q) for r in rows for q in r), default=0))
  stops = np.full((b, s, length), -1, np.int32)
  for i, r in enumerate(rows):
    for j, q in enumerate(r):
      stops[i, j, length - len(q):] = q
  return stops


def _knobs(b: int, max_new_tokens: int, temperature, top_p, top_k,
           stop_sequences: Sequence[Sequence[int]],
           example_stop_sequences: Sequence[Sequence[Sequence[int]]] | None) -> dict:
  """`sample`'s sampling parameters -> the decode loop's traced per-example inputs:
  temperature, top_p [B] float32, top_k [B] int32 and the stop sequences [B S L] int32
  (`_stop_array`). ValueError for a value out of range or a count other than 1 or B."""
  knobs = dict(temperature=_per_example("temperature", temperature, b, np.float32),
               top_p=_per_example("top_p", top_p, b, np.float32),
               top_k=_per_example("top_k", top_k, b, np.int32),
               stops=_stop_array(stop_sequences, example_stop_sequences, b, max_new_tokens))
  raw = dict(temperature=np.asarray(temperature, np.float64), top_p=np.asarray(top_p, np.float64),
             top_k=np.asarray(top_k))
  if ((raw["temperature"] < 0) | np.isnan(raw["temperature"])).any() or (
      ~((raw["top_p"] > 0) & (raw["top_p"] <= 1))).any() or (raw["top_k"] < 0).any():
    raise ConfigError(f"temperature={temperature} must be >= 0, top_p={top_p} in (0, 1], "
                     f"top_k={top_k} >= 0")
  return knobs


def _chunking(rows: int, batch_chunk: int, mesh, rules) -> tuple[int, tuple]:
  """(sampler calls, the sharding rules: `rules` on a mesh, () off one) for a global batch of
  `rows` prompts. ValueError when they do not split into equal chunks, or a chunk does not
  divide over the mesh's data-parallel ways."""
  chunk = rows if batch_chunk == 0 else min(batch_chunk, rows)
  if rows % chunk:
    raise ConfigError(f"{rows} prompts do not split into chunks of batch_chunk={batch_chunk}")
  if mesh is None:
    return rows // chunk, ()
  ways = sharding.batch_ways(mesh, rules)
  if chunk % ways:
    raise ConfigError(f"sampler batch {chunk} is not divisible by the data-parallel ways: "
                     f"{ways} over the batch axes {sharding.batch_axes(rules)} of mesh "
                     f"{dict(mesh.shape)}")
  return rows // chunk, rules


def _agree_shapes(mesh, tokens: np.ndarray, valid: np.ndarray, knobs: dict,
                  pad_id: int) -> tuple[np.ndarray, np.ndarray, dict]:
  """On a mesh that spans processes, the prompt grid [b W P] and the stop sequences [b S L] of
  every process padded to the largest P, S and L of any process (left, as `left_pad` and
  `_stop_array` align them): the global arrays need one shape. The same as padding the global
  batch at once, so the result does not depend on the process count."""
  if len({d.process_index for d in mesh.devices.flat}) == 1:
    return tokens, valid, knobs
  stops = knobs["stops"]
  mine = np.asarray([tokens.shape[-1], *stops.shape[1:]], np.int64)
  p, s, length = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 3).max(0)
  extra = p - tokens.shape[-1]
  tokens = np.concatenate([np.full(tokens.shape[:2] + (extra,), pad_id, tokens.dtype), tokens], -1)
  valid = np.concatenate([np.zeros(valid.shape[:2] + (extra,), bool), valid], -1)
  padded = np.full((stops.shape[0], s, length), -1, np.int32)
  if stops.size:
    padded[:, :stops.shape[1], length - stops.shape[2]:] = stops
  return tokens, valid, dict(knobs, stops=padded)


def _chunk_key(seed: int, i: int) -> jax.Array:
  """Chunk i's random key: fold_in(key(seed), i), chunk 0 key(seed) itself (so an unchunked
  call samples with key(seed))."""
  key = jax.random.key(seed)
  return key if i == 0 else jax.random.fold_in(key, i)


def _sample_chunk(model: Model, params: Params, prompt: np.ndarray, prompt_valid: np.ndarray,
                  knobs: dict, key: jax.Array, *, share: sharding.ProcessShare | None,
                  decode_chunk: int, should_cancel, static: dict) -> tuple[np.ndarray, ...]:
  """One chunk of this process's prompts [b W P] -> its (out [b W N], lps [b W N], lengths
  [b W], done [b W], mean_hidden [b W D]) on the host. On a mesh the chunk is this process's
  block of a global chunk (`share`): every process runs the same programs on the global arrays
  and reads back only its own rows. The prefill, then the decode loop in calls of decode_chunk
  columns (0: one call); between calls `should_cancel()` True raises `Cancelled` (it must answer
  the same on every process), and the loop ends early once every thread of the global chunk is
  done (the same answer everywhere: it reads a replicated scalar). static: `_prefill`'s static
  arguments."""
  mesh, rules, n = static["mesh"], static["rules"], static["max_new_tokens"]
  step = n - 1 if decode_chunk == 0 else decode_chunk
  rng_prefill, rng_decode = jax.random.split(key)
  if mesh is not None:
    put = lambda x: sharding.from_process_rows(x, mesh, share=share, rules=rules)
    prompt, prompt_valid, knobs = put(prompt), put(prompt_valid), jax.tree.map(put, knobs)
  with (jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()):
    cache, state = _prefill(model, params, jnp.asarray(prompt), jnp.asarray(prompt_valid),
                            rng_prefill, rng_decode, knobs, **static)
    until = step
    while True:
      cache, state, mean_hidden = _decode(model, params, cache, state, jnp.int32(until), knobs,
                                          prompt_len=prompt.shape[-1], **static)
      if until >= n - 1:
        break
      if should_cancel is not None and should_cancel():
        raise Cancelled(f"cancelled after {until} of {n} columns")
      if bool(jax.device_get(jnp.all(state["done"]))):
        break
      until += step
  del cache
  return tuple(sharding.process_rows(x) for x in (state["out"], state["lps"], state["lengths"],
                                                  state["done"], mean_hidden))


def _output(parts: Sequence[tuple[np.ndarray, ...]], shards: int, tokens: np.ndarray,
            valid: np.ndarray) -> SampleOutput:
  """The chunks' `_sample_chunk` results (chunk i: the i-th slice of each of `shards` batch
  shards, `sharding.split_rows`) put back in row order, with the prompt grid `tokens`, `valid`
  [B W P] they were sampled from -> the SampleOutput."""
  out, lps, lengths, done, mean_hidden = (
      sharding.merge_rows(np.stack([np.asarray(p[j]) for p in parts]), shards)
      for j in range(5))
  reasons = [["stop" if d else "length" for d in row] for row in done]
  return SampleOutput(out, lps, lengths, reasons, tokens, valid, mean_hidden)


def sample(model: Model, params: Params, prompts, *, num_threads: int, max_new_tokens: int,
           temperature: float | Sequence[float] = 1.0, top_p: float | Sequence[float] = 1.0,
           top_k: int | Sequence[int] = 0, seed: int = 0,
           stop_ids: Sequence[int] = (), pad_id: int = 0,
           stop_sequences: Sequence[Sequence[int]] = (),
           example_stop_sequences: Sequence[Sequence[Sequence[int]]] | None = None,
           prompt_width: int | None = None, mesh=None, rules=None,
           batch_chunk: int = 0, decode_chunk: int = 0,
           should_cancel=None) -> SampleOutput:
  """Generates W threads per prompt in lockstep.

  prompts: B entries, each a list of token ids (the same prompt for every thread) or W lists
    (per-thread prompts).
  temperature, top_p, top_k: one value for every prompt or B values (one per prompt). They are
    traced, not compiled in: every value runs the same compiled program. temperature 0 (below
    GREEDY_EPSILON) is greedy; top_k 0 and top_p 1 are off; top_p below GREEDY_EPSILON keeps
    only the most likely token.
  stop_ids: tokens that end a thread (e.g. the tokenizer's `<|im_end|>` id); the stop token is
    kept in the output.
  stop_sequences: token-id sequences that end a thread once it has emitted them (stop strings:
    pass `tokenizer.encode(s)`; a string the model spells with other tokens is not caught).
    example_stop_sequences: B lists of further sequences, one list per prompt. Both are traced
    arrays, padded to power-of-two counts and lengths.
  prompt_width: pad every prompt to exactly this many tokens (one compilation for many calls).
  mesh, rules: lay the batch and the caches out on a device mesh (batch over the `batch`
    rule's axes, kv heads over tensor, by `rules`, default `lace_jax.sharding.DEFAULT_RULES`); the params
    should already be sharded on it (e.g. a train state's). The global batch (or batch_chunk)
    must divide over the data-parallel ways. On a mesh that spans processes (hosts) every
    process calls `sample` together (the same programs run on every host) with ITS prompts,
    the block of the global batch `sharding.process_share` names, and gets back its rows only:
    the global batch is the processes' blocks in order. The draws are a function of the global
    arrays and the key (jax's partitionable threefry), not of how many processes hold them.
  batch_chunk: generate at most this many prompts of the global batch per sampler call (0 =
    all at once): bounds the caches' memory; one compilation serves every chunk. Chunk i holds
    the i-th slice of every batch shard's rows (`sharding.split_rows`; contiguous rows without
    a mesh) and samples with fold_in(key(seed), i) (chunk 0 with key(seed) itself).
  decode_chunk, should_cancel: with decode_chunk > 0 the decode loop returns to the host every
    decode_chunk columns (same tokens, one extra model step per return) and calls
    `should_cancel()`; True raises `Cancelled`.
  """
  if max_new_tokens < 1:
    raise ConfigError(f"max_new_tokens={max_new_tokens} must be >= 1")
  if batch_chunk < 0 or decode_chunk < 0:
    raise ConfigError(f"batch_chunk={batch_chunk} and decode_chunk={decode_chunk} must be >= 0 "
                     "(0 = the whole batch / every column in one call)")
  tokens, valid = left_pad(prompts, num_threads, pad_id, width=prompt_width)
  b = tokens.shape[0]
  knobs = _knobs(b, max_new_tokens, temperature, top_p, top_k, stop_sequences,
                 example_stop_sequences)
  share = None
  if mesh is not None:
    rules = tuple(sharding.DEFAULT_RULES if rules is None else rules)
    share = sharding.process_share(mesh, rules)
    tokens, valid, knobs = _agree_shapes(mesh, tokens, valid, knobs, pad_id)
  blocks, shards = (1, 1) if share is None else (share.blocks, share.shards)
  chunks, rules = _chunking(b * blocks, batch_chunk, mesh, rules)
  if b % (chunks * shards):
    raise ValueError(f"this process's {b} prompts do not split into {chunks} chunks over its "
                     f"{shards} batch shards")
  static = dict(max_new_tokens=max_new_tokens, stop_ids=tuple(int(s) for s in stop_ids),
                pad_id=int(pad_id), mesh=mesh, rules=rules)
  cut = lambda x: sharding.split_rows(x, chunks, shards)
  tokens_c, valid_c, knobs_c = cut(tokens), cut(valid), jax.tree.map(cut, knobs)
  parts = [_sample_chunk(model, params, tokens_c[i], valid_c[i],
                         jax.tree.map(lambda x: x[i], knobs_c), _chunk_key(seed, i),
                         share=share, decode_chunk=decode_chunk, should_cancel=should_cancel,
                         static=static)
           for i in range(chunks)]
  return _output(parts, shards, tokens, valid)


def teacher_forced_logprobs(model: Model, params: Params, out: SampleOutput) -> np.ndarray:
  """Log-probabilities [B, W, N] of the sampled tokens under one forward pass over
  prompt + generated grid (masked after each thread's end): what a training step sees."""
  tokens, valid = full_grid(out)
  logits = jax.jit(model.apply)(params, tokens, valid=valid)
  p = out.prompt_tokens.shape[-1]
  lp = jax.nn.log_softmax(logits[:, :, p - 1:-1])  # predicts generated columns
  got = jnp.take_along_axis(lp, jnp.asarray(out.tokens)[..., None], -1)[..., 0]
  return np.asarray(jnp.where(valid[:, :, p:], got, 0.0))


def full_grid(out: SampleOutput) -> tuple[np.ndarray, np.ndarray]:
  """Prompt + generated tokens [B, W, P + N] and their validity."""
  n = out.tokens.shape[-1]
  gen_valid = np.arange(n)[None, None, :] < out.lengths[..., None]
  tokens = np.concatenate([out.prompt_tokens, out.tokens], axis=-1)
  valid = np.concatenate([out.prompt_valid, gen_valid], axis=-1)
  return tokens, valid


def abstract_calls(model: Model, params, *, batch: int, num_threads: int, prompt_len: int,
                   max_new_tokens: int, mesh, rules, stop_ids: Sequence[int] = (0,),
                   stop_shape: tuple[int, int] = (0, 0)) -> list[tuple]:
  """The sampler's two jitted calls for one chunk of `batch` prompts, with abstract arguments
  laid out on `mesh` (nothing allocated): [(name, jitted, args, kwargs, arg groups)], for the
  plan mode (`lace_jax.plan`). `params`: ShapeDtypeStructs carrying their shardings.
  stop_shape: (sequences, length) of the stop-sequence array (`_stop_array`)."""
  rules = tuple(rules)
  b, w, p, n = batch, num_threads, prompt_len, max_new_tokens
  bs = lambda ndim: sharding.batch_sharding(mesh, ndim, rules=rules)
  sd = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=bs(len(shape)))
  key = jax.random.key(0).dtype
  rng = jax.ShapeDtypeStruct((), key, sharding=sharding.replicated(mesh))
  static = dict(max_new_tokens=n, stop_ids=tuple(stop_ids), pad_id=0, mesh=mesh, rules=rules)
  knobs = dict(temperature=sd((b,), jnp.float32), top_p=sd((b,), jnp.float32),
               top_k=sd((b,), jnp.int32), stops=sd((b, *stop_shape), jnp.int32))
  prompt, prompt_valid = sd((b, w, p), jnp.int32), sd((b, w, p), jnp.bool_)
  cache = jax.eval_shape(lambda: model.init_cache(b, w, p + n))
  cache = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), cache,
                       sharding.cache_sharding(cache, mesh, rules))
  state = dict(i=jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh)),
               out=sd((b, w, n), jnp.int32), lps=sd((b, w, n), jnp.float32),
               lengths=sd((b, w), jnp.int32), hidden_sum=sd((b, w, model.config.d_model),
                                                            jnp.float32),
               done=sd((b, w), jnp.bool_), pos=sd((b, w), jnp.int32), rng=rng)
  until = jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh))
  return [
      ("prefill", _prefill, (model, params, prompt, prompt_valid, rng, rng, knobs), static,
       {"params": params, "batch": (prompt, prompt_valid, knobs)}),
      ("decode", _decode, (model, params, cache, state, until, knobs),
       dict(static, prompt_len=p), {"params": params, "cache": cache, "batch": (state, knobs)}),
  ]
