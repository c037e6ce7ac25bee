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

from lace_jax import ops, sharding
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


def _filter_logits(logits: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
  """logits [..., V] -> sampling logits with temperature, top-k and nucleus filtering."""
  logits = logits / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    cum = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each token
    cutoff = jnp.min(jnp.where(cum < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


def _ends_with_sequence(out: jax.Array, last: jax.Array,
                       sequences: tuple[tuple[int, ...], ...]) -> jax.Array:
  """[B, W] bool: the tokens out[..., last - len(seq) + 1 : last + 1] equal one of sequences."""
  hit = jnp.zeros(out.shape[:2], bool)
  for seq in sequences:
    n = len(seq)
    start = jnp.maximum(last - n + 1, 0)
    window = jax.lax.dynamic_slice_in_dim(out, start, n, axis=2)
    hit |= (last + 1 >= n) & jnp.all(window == jnp.asarray(seq, jnp.int32), axis=-1)
  return hit


def _choose(rng, logits, temperature, top_k, top_p):
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, _filter_logits(logits, temperature, top_k, top_p)).astype(
      jnp.int32)


_STATIC = ("model", "max_new_tokens", "temperature", "top_k", "top_p", "stop_ids", "pad_id",
           "stop_sequences", "mesh", "rules")


def _constrain_cache(cache: dict, mesh, rules) -> dict:
  """The cache laid out on `mesh` by the rule table (batch over data/fsdp, kv heads over
  tensor); unchanged without a mesh (one device, or GSPMD's own choice)."""
  if mesh is None:
    return cache
  return jax.lax.with_sharding_constraint(cache, sharding.cache_sharding(cache, mesh, rules))


@functools.partial(jax.jit, static_argnames=_STATIC)
def _prefill(model: Model, params: Params, prompt: jax.Array, prompt_valid: jax.Array,
             rng: jax.Array, *, max_new_tokens: int, temperature: float, top_k: int,
             top_p: float, stop_ids: tuple[int, ...], pad_id: int,
             stop_sequences: tuple[tuple[int, ...], ...], mesh=None, rules=()):
  """Prompt grid -> (filled caches, first emitted token and its logprob, next positions)."""
  b, w, p = prompt.shape
  cache = _constrain_cache(model.init_cache(b, w, p + max_new_tokens), mesh, rules)
  positions = ops.default_positions(prompt_valid)
  # left padding puts every prompt's end in column P-1: only its logits are formed
  with sharding.logical_rules(rules):  # activation constraints (when a mesh is set)
    logits, _, cache = model.prefill(params, cache, prompt, positions, prompt_valid,
                                     logits="last")
  cache = _constrain_cache(cache, mesh, rules)
  last = logits[:, :, -1]  # [B, W, V]
  first = _choose(rng, last, temperature, top_k, top_p)
  first_lp = jnp.take_along_axis(jax.nn.log_softmax(last), first[..., None], -1)[..., 0]
  next_pos = jnp.max(jnp.where(prompt_valid, positions + 1, 0), axis=-1)  # [B, W]
  return cache, first, first_lp, next_pos


@functools.partial(jax.jit, static_argnames=_STATIC + ("prompt_len",), donate_argnames=("cache",))
def _decode(model: Model, params: Params, cache: dict, first: jax.Array, first_lp: jax.Array,
            next_pos: jax.Array, rng: jax.Array, *, prompt_len: int, max_new_tokens: int,
            temperature: float, top_k: int, top_p: float, stop_ids: tuple[int, ...],
            pad_id: int, stop_sequences: tuple[tuple[int, ...], ...], mesh=None, rules=()):
  """The lockstep loop: column P + i feeds token i of every live thread and emits token i+1."""
  b, w = first.shape
  n, p = max_new_tokens, prompt_len
  stop = jnp.asarray(stop_ids, jnp.int32)
  out = jnp.full((b, w, n), pad_id, jnp.int32).at[:, :, 0].set(first)
  lps = jnp.zeros((b, w, n), jnp.float32).at[:, :, 0].set(first_lp)
  hidden_sum = jnp.zeros((b, w, model.config.d_model), jnp.float32)
  lengths = jnp.ones((b, w), jnp.int32)
  # a thread is done once it has emitted a stop token or completed a stop sequence
  done = jnp.isin(first, stop) | _ends_with_sequence(out, jnp.int32(0), stop_sequences)

  def step(i, cache, out, pos, lengths, hidden_sum):
    token = jax.lax.dynamic_index_in_dim(out, i, axis=2, keepdims=False)
    live = lengths > i  # token i was emitted while the thread was live: a valid key
    with sharding.logical_rules(rules):
      logits, hidden, cache = model.decode_step(params, cache, token, pos, live, p + i)
    cache = _constrain_cache(cache, mesh, rules)
    hidden_sum = hidden_sum + jnp.where(live[..., None], hidden.astype(jnp.float32), 0.0)
    return logits, cache, hidden_sum

  def cond(state):
    i, _, _, _, _, _, done, _, _ = state
    return (i < n - 1) & ~jnp.all(done)

  def body(state):
    i, cache, out, lps, lengths, hidden_sum, done, pos, rng = state
    logits, cache, hidden_sum = step(i, cache, out, pos, lengths, hidden_sum)
    rng, sub = jax.random.split(rng)
    nxt = _choose(sub, logits, temperature, top_k, top_p)
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits), nxt[..., None], -1)[..., 0]
    emit = ~done
    out = out.at[:, :, i + 1].set(jnp.where(emit, nxt, pad_id))
    lps = lps.at[:, :, i + 1].set(jnp.where(emit, lp, 0.0))
    lengths = lengths + emit.astype(jnp.int32)
    done = done | (emit & (jnp.isin(nxt, stop) | _ends_with_sequence(out, i + 1, stop_sequences)))
    return i + 1, cache, out, lps, lengths, hidden_sum, done, pos + 1, rng

  state = (jnp.int32(0), cache, out, lps, lengths, hidden_sum, done, next_pos, rng)
  i, cache, out, lps, lengths, hidden_sum, done, pos, _ = jax.lax.while_loop(cond, body, state)
  # tokens emitted at the last column have not been fed: one more step for their hidden state
  _, cache, hidden_sum = step(i, cache, out, pos, lengths, hidden_sum)
  mean_hidden = hidden_sum / jnp.maximum(lengths, 1)[..., None]
  # the caches are returned (and dropped by the caller) so the donated buffers are updated in
  # place instead of copied; returning the loop's cache instead of this last step's kept a
  # second whole cache alive on XLA:TPU (the last step could not write in place)
  return out, lps, lengths, done, mean_hidden, cache


def sample(model: Model, params: Params, prompts, *, num_threads: int, max_new_tokens: int,
           temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
           stop_ids: Sequence[int] = (), pad_id: int = 0,
           stop_sequences: Sequence[Sequence[int]] = (),
           prompt_width: int | None = None, mesh=None, rules=None,
           batch_chunk: int = 0) -> SampleOutput:
  """Generates W threads per prompt in lockstep.

  prompts: B entries, each a list of token ids (the same prompt for every thread) or W lists
    (per-thread prompts).
  temperature 0 is greedy. stop_ids: tokens that end a thread (e.g. the tokenizer's
    `<|im_end|>` id); the stop token is kept in the output.
  stop_sequences: token-id sequences that end a thread once it has emitted them (stop strings:
    pass `tokenizer.encode(s)`; a string the model spells with other tokens is not caught).
  prompt_width: pad every prompt to exactly this many tokens (one compilation for many calls).
  mesh, rules: lay the batch and the caches out on a device mesh (batch over data/fsdp, kv
    heads over tensor, by `rules`, default `lace_jax.sharding.DEFAULT_RULES`); the params
    should already be sharded on it (e.g. a train state's). B (or batch_chunk) must divide
    over the data-parallel ways.
  batch_chunk: generate at most this many prompts per sampler call (0 = all at once): bounds
    the caches' memory; one compilation serves every chunk. Chunk i samples with
    fold_in(key(seed), i) (chunk 0 with key(seed) itself).
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
    raise ValueError(f"temperature={temperature} must be >= 0, top_p={top_p} in (0, 1], "
                     f"top_k={top_k} >= 0")
  if batch_chunk < 0:
    raise ValueError(f"batch_chunk={batch_chunk} must be >= 0 (0 = the whole batch)")
  tokens, valid = left_pad(prompts, num_threads, pad_id, width=prompt_width)
  b = tokens.shape[0]
  chunk = b if batch_chunk == 0 else min(batch_chunk, b)
  if b % chunk:
    raise ValueError(f"{b} prompts do not split into chunks of batch_chunk={batch_chunk}")
  if mesh is not None:
    rules = tuple(sharding.DEFAULT_RULES if rules is None else rules)
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if chunk % ways:
      raise ValueError(f"sampler batch {chunk} is not divisible by the data-parallel ways "
                       f"data*fsdp = {ways} of mesh {dict(mesh.shape)}")
  static = dict(max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k),
                top_p=float(top_p), stop_ids=tuple(int(s) for s in stop_ids), pad_id=int(pad_id),
                stop_sequences=tuple(tuple(int(t) for t in q) for q in stop_sequences if len(q)),
                mesh=mesh, rules=rules if mesh is not None else ())
  parts = []
  for i, start in enumerate(range(0, b, chunk)):
    key = jax.random.key(seed)
    key = key if i == 0 else jax.random.fold_in(key, i)
    rng_prefill, rng_decode = jax.random.split(key)
    prompt, prompt_valid = tokens[start:start + chunk], valid[start:start + chunk]
    if mesh is not None:
      put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh, x.ndim))
      prompt, prompt_valid = put(prompt), put(prompt_valid)
    with (jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()):
      cache, first, first_lp, next_pos = _prefill(model, params, jnp.asarray(prompt),
                                                  jnp.asarray(prompt_valid), rng_prefill,
                                                  **static)
      out, lps, lengths, done, mean_hidden, _ = _decode(
          model, params, cache, first, first_lp, next_pos, rng_decode,
          prompt_len=tokens.shape[-1], **static)
    parts.append(jax.device_get((out, lps, lengths, done, mean_hidden)))
  out, lps, lengths, done, mean_hidden = (np.concatenate([np.asarray(p[j]) for p in parts])
                                          for j in range(5))
  reasons = [["stop" if d else "length" for d in row] for row in done]
  return SampleOutput(out, lps, lengths, reasons, tokens, valid, mean_hidden)


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
                   max_new_tokens: int, mesh, rules, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0, stop_ids: Sequence[int] = (0,)) -> list[tuple]:
  """The sampler's two jitted calls for one chunk of `batch` prompts, with abstract arguments
  laid out on `mesh` (nothing allocated): [(name, jitted, args, kwargs, arg groups)], for the
  plan mode (`lace_jax.plan`). `params`: ShapeDtypeStructs carrying their shardings."""
  rules = tuple(rules)
  b, w, p, n = batch, num_threads, prompt_len, max_new_tokens
  bs = lambda ndim: sharding.batch_sharding(mesh, ndim)
  sd = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=bs(len(shape)))
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(mesh))
  static = dict(max_new_tokens=n, temperature=float(temperature), top_k=int(top_k),
                top_p=float(top_p), stop_ids=tuple(stop_ids), pad_id=0, stop_sequences=(),
                mesh=mesh, rules=rules)
  prompt, prompt_valid = sd((b, w, p), jnp.int32), sd((b, w, p), jnp.bool_)
  cache = jax.eval_shape(lambda: model.init_cache(b, w, p + n))
  cache = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), cache,
                       sharding.cache_sharding(cache, mesh, rules))
  first, first_lp, next_pos = sd((b, w), jnp.int32), sd((b, w), jnp.float32), sd((b, w), jnp.int32)
  return [
      ("prefill", _prefill, (model, params, prompt, prompt_valid, rng), static,
       {"params": params, "batch": (prompt, prompt_valid)}),
      ("decode", _decode, (model, params, cache, first, first_lp, next_pos, rng),
       dict(static, prompt_len=p), {"params": params, "cache": cache,
                                    "batch": (first, first_lp, next_pos)}),
  ]
