"""The lattice generation engine: continuous batching of whole lattices (spec section 9).

`sampling.sample` runs one static lockstep batch: a fresh cache per call, one column for the
whole batch, and the batch runs until its longest lattice finishes. The engine keeps a
persistent cache of S lattice slots instead. A slot holds one lattice, the W threads of one
request (a GRPO rollout, an eval problem, a server request), admitted and released together;
its worst case, prompt width + max_new_tokens columns, is reserved when it is admitted. Each
slot sits at its own column: the model writes the cache at per-slot columns (`model._write`
with a [B] column) and the backbone and lattice decode paths read per-slot validity.

    engine = Engine(model, params, slots=8, num_threads=4, max_prompt_len=64,
                    max_new_tokens=256, stop_ids=(tok.im_end,))
    results = engine.generate([Request(prompt_ids, max_new_tokens=256, seed=i) ...])

The step loop (`generate`) decodes one column for every live slot, in jitted calls of up to
`decode_chunk` columns that return early once a slot finishes while requests wait; finished
lattices are read back and their slots refilled by one batched prefill. Compiled shapes are
fixed: the slot count, and prompt widths and prefill sizes in power-of-two buckets (an
admission is one call over all S slots in slot order: each slot's new values are selected
where the slot lives, nothing is scattered across devices).

Prompt sharing: a lattice's W threads read each other's prompt tokens through the lattice
(with thread-indexed rotary coordinates), so threads with the same prompt still get different
caches: the unit of sharing is the whole W-thread prompt grid. A store keeps the S most recently
used prefilled grids (their cache columns, last logits and next positions); a request whose grid
is there is admitted by copying it into its slot, with no prefill. The G rollouts of a GRPO
question, or a server request's n, prefill their prompt once however the slots free up
(`Stats.prefill_rows` counts the grids computed).

Draws are keyed by request, thread and column: the token of column j of a request's lattice is
drawn with fold_in(key(request.seed), j), one categorical over its [W, V] logits (the thread is
the row). They do not depend on the slot, the slot count or the order of arrival. Greedy
requests give token for token what `sample` gives.

Letters: S slots · W threads · P prompt width · N new tokens · L = P + N cache columns ·
U distinct prompt grids of an admission · R prompt-store rows · V vocab · D model.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
import threading
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from lace_jax import ops, sharding
from lace_jax.model import Model, Params, cache_seq_axis
from lace_jax.sampling import (GREEDY_EPSILON, Cancelled, SampleOutput, bucket,
                               _constrain_cache, _ends_with_sequence, _filter_logits, _knobs,
                               left_pad)


@dataclasses.dataclass
class Request:
  """One lattice to generate.

  prompt: one id list (every thread's prompt) or W id lists (per-thread prompts).
  max_new_tokens: at most the engine's; temperature, top_p, top_k as `sampling.sample`.
  stop_sequences: token-id sequences that end a thread (besides the engine's stop_ids).
  seed: the request's draws (`key(seed)` folded with the column).
  on_tokens: streaming: called as on_tokens(new) after each decode call that emitted tokens,
    new = W lists of this request's newly emitted ids (on the generating thread)."""

  prompt: Sequence[int] | Sequence[Sequence[int]]
  max_new_tokens: int
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  stop_sequences: Sequence[Sequence[int]] = ()
  seed: int = 0
  on_tokens: Callable[[list[list[int]]], None] | None = None


@dataclasses.dataclass
class Result:
  """One request's lattice: tokens, logprobs [W, n] (n = its max_new_tokens; pad after a
  thread stopped), lengths [W], finish_reasons [W] in {"stop", "length"}, prompt_tokens /
  prompt_valid [W, P] (left-padded to the admission's width), mean_hidden [W, D] (as
  `sampling.SampleOutput`)."""

  tokens: np.ndarray
  logprobs: np.ndarray
  lengths: np.ndarray
  finish_reasons: list[str]
  prompt_tokens: np.ndarray
  prompt_valid: np.ndarray
  mean_hidden: np.ndarray


@dataclasses.dataclass
class Stats:
  """Counters of an engine's life: requests admitted and finished, admissions (prefill calls),
  prompt grids prefilled (distinct grids: the prefill work), decode calls and columns, the
  columns' slot occupancy (live slots summed over decoded columns) and the time spent."""

  admitted: int = 0
  finished: int = 0
  admissions: int = 0
  prefill_rows: int = 0
  decode_calls: int = 0
  columns: int = 0
  slot_columns: int = 0
  seconds: float = 0.0


def _choose_keyed(keys: jax.Array, logits: jax.Array, knobs: dict) -> jax.Array:
  """logits [S, W, V] -> one token per thread [S, W]: the argmax where the slot is greedy,
  else a draw from its filtered distribution with its own key (keys [S])."""
  temperature = knobs["temperature"]
  greedy = temperature < GREEDY_EPSILON  # [S]
  best = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def draw(logits):
    t = jnp.where(greedy, 1.0, temperature)
    filtered = _filter_logits(logits, t, knobs["top_k"], knobs["top_p"])
    return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)

  drawn = jax.lax.cond(jnp.all(greedy), lambda x: best, draw, logits)
  return jnp.where(greedy[:, None], best, drawn)


def _logprob(logits: jax.Array, token: jax.Array) -> jax.Array:
  return jnp.take_along_axis(jax.nn.log_softmax(logits), token[..., None], -1)[..., 0]


def _set_rows(buf: jax.Array, at: jax.Array, rows: jax.Array) -> jax.Array:
  """buf [R, ...] with rows [U, ...] written at indices at [U]; an index R (padding) is
  dropped."""
  return buf.at[at].set(rows.astype(buf.dtype), mode="drop")


_STATIC = ("model", "stop_ids", "pad_id", "mesh", "rules")


def _constrain_state(state: dict, mesh, rules) -> dict:
  if mesh is None:
    return state
  cache = _constrain_cache(state["cache"], mesh, rules)
  rest = {k: v for k, v in state.items() if k != "cache"}
  rest = jax.lax.with_sharding_constraint(rest, jax.tree.map(
      lambda x: sharding.batch_sharding(mesh, x.ndim, rules=rules), rest))
  return dict(rest, cache=cache)


@functools.partial(jax.jit, static_argnames=_STATIC + ("slots", "num_threads", "length",
                                                       "max_new_tokens", "stop_shape"))
def _empty_state(model: Model, *, slots: int, num_threads: int, length: int,
                 max_new_tokens: int, stop_shape: tuple[int, int], stop_ids, pad_id, mesh,
                 rules) -> dict:
  """The engine's device state for S empty slots (greedy knobs: an empty slot never makes the
  all-greedy fast path draw)."""
  del stop_ids  # static like the other calls' (one argument set for all)
  s, w, n = slots, num_threads, max_new_tokens
  state = dict(
      cache=model.init_cache(s, w, length),
      out=jnp.full((s, w, n), pad_id, jnp.int32), lps=jnp.zeros((s, w, n), jnp.float32),
      lengths=jnp.zeros((s, w), jnp.int32), done=jnp.ones((s, w), bool),
      hidden_sum=jnp.zeros((s, w, model.config.d_model), jnp.float32),
      pos=jnp.zeros((s, w), jnp.int32), i=jnp.zeros((s,), jnp.int32),
      start=jnp.zeros((s,), jnp.int32), budget=jnp.zeros((s,), jnp.int32),
      active=jnp.zeros((s,), bool), key=jax.random.key_data(jax.random.split(
          jax.random.key(0), s)),
      temperature=jnp.zeros((s,), jnp.float32), top_p=jnp.ones((s,), jnp.float32),
      top_k=jnp.zeros((s,), jnp.int32), stops=jnp.full((s, *stop_shape), -1, jnp.int32))
  return _constrain_state(state, mesh, rules)


def _store_sharding(store: dict, mesh, rules) -> dict:
  """The store's rows over the mesh's batch axes, as the slots (its cache as the engine's)."""
  cache = sharding.cache_sharding({"layers": store["cache"]}, mesh, rules)["layers"]
  rest = {k: sharding.batch_sharding(mesh, v.ndim, rules=rules)
          for k, v in store.items() if k != "cache"}
  return dict(rest, cache=cache)


def _constrain_store(store: dict, mesh, rules) -> dict:
  if mesh is None:
    return store
  return jax.lax.with_sharding_constraint(store, _store_sharding(store, mesh, rules))


@functools.partial(jax.jit, static_argnames=("model", "rows", "num_threads", "width", "mesh",
                                             "rules"))
def _empty_store(model: Model, *, rows: int, num_threads: int, width: int, mesh=None,
                 rules=()) -> dict:
  """The prompt store: R prefilled prompt grids (cache columns 0..P-1 [R, W, P, ...], validity
  [R, W, P], the last column's logits [R, W, V] and the next token positions [R, W])."""
  store = dict(cache=model.init_cache(rows, num_threads, width)["layers"],
               valid=jnp.zeros((rows, num_threads, width), bool),
               logits=jnp.zeros((rows, num_threads, model.config.vocab_size), jnp.float32),
               next_pos=jnp.zeros((rows, num_threads), jnp.int32))
  return _constrain_store(store, mesh, rules)


@functools.partial(jax.jit, static_argnames=("model", "mesh", "rules"),
                   donate_argnames=("store",))
def _prefill(model: Model, params: Params, store: dict, prompt: jax.Array,
             prompt_valid: jax.Array, rows: jax.Array, *, mesh=None, rules=()) -> dict:
  """Prefills U prompt grids [U, W, P'] once and keeps them in the store's rows [U] (R: padding,
  dropped)."""
  u, w, p = prompt.shape
  small = model.init_cache(u, w, p)
  positions = ops.default_positions(prompt_valid)
  with sharding.logical_rules(rules):
    logits, _, small = model.prefill(params, small, prompt, positions, prompt_valid,
                                     logits="last")
  width = store["valid"].shape[2]

  def put(path, buf, fresh):  # fresh [U, W, ..., P, ...] into rows [U], columns 0..P-1
    cols = (slice(None),) * (cache_seq_axis(path) - 1) + (slice(0, p),)
    return buf.at[(rows,) + cols].set(fresh.astype(buf.dtype), mode="drop")

  return _constrain_store(dict(
      cache=jax.tree_util.tree_map_with_path(put, store["cache"], small["layers"]),
      valid=_set_rows(store["valid"], rows,
                      jnp.pad(prompt_valid, ((0, 0), (0, 0), (0, width - p)))),
      logits=_set_rows(store["logits"], rows, logits[:, :, -1]),
      next_pos=_set_rows(store["next_pos"], rows,
                         jnp.max(jnp.where(prompt_valid, positions + 1, 0), axis=-1))),
      mesh, rules)


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("state",))
def _admit(model: Model, state: dict, store: dict, admit: jax.Array, src: jax.Array, new: dict,
           *, stop_ids: tuple[int, ...], pad_id: int, mesh=None, rules=()) -> dict:
  """Admits a request into every slot s with admit[s] [S]: it copies the store's prefilled
  grid src[s] into the slot, with its knobs, key, budget and prompt width in `new` ([S] each,
  in slot order; stops [S, Sq, Lq]). Its first token (column 0) is drawn from the grid's last
  logits with its own key. The grid's columns past its width are invalid, so the copy's stale
  ones are unread. Everything is in slot order: each slot's new values are selected where
  it lives (no scatter across devices), only the store's rows are gathered."""
  del model
  last = store["logits"][src]  # [S, W, V]
  keys = jax.random.wrap_key_data(new["key"])
  first = _choose_keyed(jax.vmap(jax.random.fold_in)(keys, jnp.zeros_like(src)), last, new)
  s, w = first.shape
  n = state["out"].shape[-1]
  out = jnp.full((s, w, n), pad_id, jnp.int32).at[:, :, 0].set(first)
  lps = jnp.zeros((s, w, n), jnp.float32).at[:, :, 0].set(_logprob(last, first))
  done = (jnp.isin(first, jnp.asarray(stop_ids, jnp.int32))
          | _ends_with_sequence(out, jnp.int32(0), new["stops"]))
  width = store["valid"].shape[2]
  pick = lambda x, old: jnp.where(admit.reshape((s,) + (1,) * (old.ndim - 1)),
                                  x.astype(old.dtype), old)

  def insert(path, big, kept):  # the grids' columns 0..P-1 into the admitted slots
    axis = cache_seq_axis(path)
    head = jax.lax.slice_in_dim(big, 0, width, axis=axis)
    return jax.lax.dynamic_update_slice_in_dim(big, pick(kept[src], head), 0, axis=axis)

  length = state["cache"]["valid"].shape[2]
  cache = dict(state["cache"], layers=jax.tree_util.tree_map_with_path(
      insert, state["cache"]["layers"], store["cache"]))
  cache["valid"] = pick(jnp.pad(store["valid"][src], ((0, 0), (0, 0), (0, length - width))),
                        state["cache"]["valid"])  # later columns: False
  put = lambda name, rows: pick(rows, state[name])
  state = dict(
      state, cache=cache, out=put("out", out), lps=put("lps", lps),
      lengths=put("lengths", jnp.ones((s, w), jnp.int32)), done=put("done", done),
      hidden_sum=put("hidden_sum", jnp.zeros(state["hidden_sum"].shape)),
      pos=put("pos", store["next_pos"][src]), i=put("i", jnp.zeros((s,), jnp.int32)),
      start=put("start", new["start"]), budget=put("budget", new["budget"]),
      active=state["active"] | admit, key=put("key", new["key"]),
      **{k: put(k, new[k]) for k in ("temperature", "top_p", "top_k", "stops")})
  return _constrain_state(state, mesh, rules)


def _running(state: dict) -> jax.Array:
  """[S] bool: an active slot with a token still to feed (emitted, not yet through the model:
  after a slot's last emission one more column feeds its last tokens, as `sample` does, so
  every emitted token's hidden state counts)."""
  return state["active"] & jnp.any(state["lengths"] > state["i"][:, None], axis=1)


_running_slots = jax.jit(_running)


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("state",))
def _decode(model: Model, params: Params, state: dict, limit: jax.Array, free_early: jax.Array,
            *, stop_ids: tuple[int, ...], pad_id: int, mesh=None, rules=()) -> tuple:
  """Up to `limit` columns for every running slot; returns early when no slot runs or, with
  free_early, once a slot has finished (a waiting request can take it). Returns (state,
  columns decoded, live slots summed over them)."""
  stop = jnp.asarray(stop_ids, jnp.int32)
  s, w, n = state["out"].shape
  length = state["cache"]["valid"].shape[2]
  rows = jnp.arange(s)

  def body(carry):
    st, k, occupancy, _ = carry
    running = _running(st)
    i = st["i"]
    col = jnp.minimum(i, n - 1)
    token = jnp.take_along_axis(st["out"], col[:, None, None], axis=2)[..., 0]  # [S, W]
    live = (st["lengths"] > i[:, None]) & running[:, None]
    with sharding.logical_rules(rules):
      logits, hidden, cache = model.decode_step(params, st["cache"], token, st["pos"], live,
                                                jnp.minimum(st["start"] + i, length - 1))
    cache = _constrain_cache(cache, mesh, rules)
    hidden_sum = st["hidden_sum"] + jnp.where(live[..., None], hidden.astype(jnp.float32), 0.0)
    keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(st["key"]), i + 1)
    nxt = _choose_keyed(keys, logits, st)
    emit = running[:, None] & ~st["done"] & ((i + 1) < st["budget"])[:, None]  # [S, W]
    at = jnp.where(running, i + 1, n)  # column n: out of range, the write is dropped
    out = st["out"].at[rows, :, at].set(jnp.where(emit, nxt, pad_id), mode="drop")
    lps = st["lps"].at[rows, :, at].set(jnp.where(emit, _logprob(logits, nxt), 0.0),
                                         mode="drop")
    ended = jnp.isin(nxt, stop) | _ends_with_sequence(out, jnp.minimum(i + 1, n - 1),
                                                      st["stops"])
    st = dict(st, cache=cache, out=out, lps=lps, hidden_sum=hidden_sum,
              lengths=st["lengths"] + emit.astype(jnp.int32), done=st["done"] | (emit & ended),
              pos=st["pos"] + running[:, None].astype(jnp.int32),
              i=i + running.astype(jnp.int32))
    freed = jnp.any(running & ~_running(st))
    return st, k + 1, occupancy + jnp.sum(running), freed

  def cond(carry):
    st, k, _, freed = carry
    return (k < limit) & jnp.any(_running(st)) & ~(free_early & freed)

  state, k, occupancy, _ = jax.lax.while_loop(
      cond, body, (state, jnp.int32(0), jnp.int32(0), jnp.bool_(False)))
  return _constrain_state(state, mesh, rules), k, occupancy


@functools.partial(jax.jit, donate_argnames=("state",))
def _release(state: dict, finished: jax.Array) -> dict:
  """Marks the finished slots [S] empty (greedy knobs again)."""
  keep = ~finished
  return dict(state, active=state["active"] & keep,
              temperature=jnp.where(keep, state["temperature"], 0.0))


def _prompt_key(prompt) -> tuple:
  if len(prompt) and isinstance(prompt[0], (list, tuple, np.ndarray)):
    return tuple(tuple(int(t) for t in x) for x in prompt)
  return tuple(int(t) for t in prompt)


class Engine:
  """S lattice slots over a persistent cache; see the module docstring.

  model, params: the model and its parameters (placed on `mesh` when one is given).
  slots: S, lattices generated at once (on a mesh: a multiple of the data-parallel ways).
  num_threads: W; max_prompt_len, max_new_tokens: the largest prompt (tokens) and generation a
    request may have (a slot reserves both); stop_ids: tokens that end a thread, kept in its
    output; pad_id as `sample`.
  stop_shape: (sequences, length) of the largest per-request stop-sequence set accepted.
  decode_chunk: columns per decode call (the host regains control between calls: admission,
    streaming, cancellation).
  prompt_store: prefilled prompt grids kept (default: slots; rounded up to a multiple of the
    data-parallel ways). An admission takes at most this many distinct prompts. GRPO keeps its
    step's questions: the store, and an admission's copy out of it, are that much smaller.
  mesh, rules: lay the slots out over the mesh's batch axes (as `sample`'s batch). On a mesh
    that spans processes the engine is one SPMD program: every process makes the same calls
    (`generate` or `step` together) with ITS requests, which go to its block of the slots
    (`sharding.process_share`); the shapes of each call are agreed across processes.

  Use `generate(requests)` for a batch, or `submit` + `step` (a server's loop) with `cancel`.
  """

  def __init__(self, model: Model, params: Params, *, slots: int, num_threads: int,
               max_prompt_len: int, max_new_tokens: int, stop_ids: Sequence[int] = (),
               pad_id: int = 0, stop_shape: tuple[int, int] = (4, 16), decode_chunk: int = 32,
               prompt_store: int | None = None, mesh=None, rules=None):
    for name, value in (("slots", slots), ("num_threads", num_threads),
                        ("max_prompt_len", max_prompt_len), ("max_new_tokens", max_new_tokens),
                        ("decode_chunk", decode_chunk),
                        ("prompt_store", slots if prompt_store is None else prompt_store)):
      if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"Engine {name}={value!r}; expected an int >= 1")
    self.share = None
    ways = 1
    if mesh is not None:
      rules = tuple(sharding.DEFAULT_RULES if rules is None else rules)
      ways = sharding.batch_ways(mesh, rules)
      if slots % ways:
        raise ValueError(f"Engine slots={slots} is not divisible by the data-parallel ways: "
                         f"{ways} over {sharding.batch_axes(rules)} of mesh {dict(mesh.shape)}")
      self.share = sharding.process_share(mesh, rules)
    self.multiprocess = mesh is not None and len(
        {d.process_index for d in mesh.devices.flat}) > 1
    self.model, self.params = model, params
    self.slots, self.num_threads = int(slots), int(num_threads)
    self.max_prompt_len = bucket(int(max_prompt_len), 16)
    self.max_new_tokens = int(max_new_tokens)
    self.decode_chunk = int(decode_chunk)
    self.stop_shape = tuple(int(x) for x in stop_shape)
    self.static = dict(stop_ids=tuple(int(t) for t in stop_ids), pad_id=int(pad_id), mesh=mesh,
                       rules=tuple(rules) if mesh is not None else ())
    # this process's block of the slots (and of the store's rows): global rows lo..lo + local
    mine = slice(0, self.slots) if self.share is None else self.share.rows(self.slots)
    self._lo, self.local_slots = mine.start, mine.stop - mine.start
    self.store_rows = -(-(slots if prompt_store is None else int(prompt_store)) // ways) * ways
    rows = (slice(0, self.store_rows) if self.share is None
            else self.share.rows(self.store_rows))
    self._store_lo, self.local_store_rows = rows.start, rows.stop - rows.start
    self.stats = Stats()
    with self._mesh():
      self.state = _empty_state(
          model, slots=self.slots, num_threads=self.num_threads,
          length=self.max_prompt_len + self.max_new_tokens, max_new_tokens=self.max_new_tokens,
          stop_shape=self.stop_shape, **self.static)
      # as many prefilled grids as slots: an admission's grids always fit
      self.store = _empty_store(model, rows=self.store_rows, num_threads=self.num_threads,
                                width=self.max_prompt_len, mesh=mesh, rules=self.static["rules"])
    # a prompt grid (its width, tokens, validity) -> (local store row, the width it was
    # prefilled at), least recently used first
    self._store = {}
    self._owner = [None] * self.local_slots  # local slot -> (ticket, request, grid) or None
    self._sent = [None] * self.local_slots  # streaming: tokens already handed to on_tokens
    self._waiting = collections.deque()  # (ticket, request)
    self._cancelled = set()
    self._lock = threading.Lock()  # submit / cancel from other threads (a server's)
    self._tickets = itertools.count()

  def _mesh(self):
    mesh = self.static["mesh"]
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()

  def _put(self, x: np.ndarray) -> jax.Array:
    """This process's rows -> the global array (batch over the mesh's batch axes)."""
    if self.static["mesh"] is None:
      return jnp.asarray(x)
    return sharding.from_process_rows(x, self.static["mesh"], share=self.share,
                                      rules=self.static["rules"])

  def _get(self, x: jax.Array) -> np.ndarray:
    """A global array's rows of this process's block, on the host."""
    return np.asarray(x) if self.static["mesh"] is None else sharding.process_rows(x)

  def _rows(self, count: int) -> int:
    """The rows of an admission call for `count` requests (or grids) per process: a power of
    two (few compiled shapes), a multiple of this process's batch shards."""
    shards = 1 if self.share is None else self.share.shards
    return -(-bucket(count, 1) // shards) * shards

  def _agree(self, values: Sequence[int]) -> np.ndarray:
    """The maximum over processes of each of these ints (itself on one process)."""
    mine = np.asarray(values, np.int64)
    if not self.multiprocess:
      return mine
    return np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, len(mine)).max(0)

  # ---- requests -> device inputs

  def _check(self, index, r: Request) -> None:
    if not 1 <= r.max_new_tokens <= self.max_new_tokens:
      raise ValueError(f"request {index}: max_new_tokens={r.max_new_tokens}; expected 1.."
                       f"{self.max_new_tokens} (the engine's max_new_tokens)")
    stops = [q for q in r.stop_sequences if 0 < len(q) <= r.max_new_tokens]
    if len(stops) > self.stop_shape[0] or any(len(q) > self.stop_shape[1] for q in stops):
      raise ValueError(f"request {index}: {len(stops)} stop sequences of up to "
                       f"{max(map(len, stops), default=0)} tokens; the engine takes at most "
                       f"{self.stop_shape[0]} of at most {self.stop_shape[1]} (stop_shape)")
    self._width([r.prompt], index)

  def _width(self, prompts: Sequence, index=None) -> int:
    """The power-of-two width (>= 16) the prompts' grids are padded to."""
    tokens, _ = left_pad(prompts, self.num_threads, self.static["pad_id"])
    width = bucket(tokens.shape[-1], 16)
    if width > self.max_prompt_len:
      at = "" if index is None else f"request {index}: "
      raise ValueError(f"{at}a prompt of {tokens.shape[-1]} tokens does not fit the engine's "
                       f"max_prompt_len={self.max_prompt_len}")
    return width

  def _admit(self, batch: list[tuple[int, Request]], free: list[int]) -> None:
    """Admits `batch` (ticket, request) into the local slots `free` (as many): the prompt grids
    not in the store are prefilled (once each) into its least recently used rows, then every
    request copies its grid from the store. Called by every process together (with its own
    batch, possibly empty): the calls' shapes are agreed first."""
    reqs = [r for _, r in batch]
    pad_id = self.static["pad_id"]
    grids = []  # each request's own grid, at its own width: the store's key
    for r in reqs:
      t, v = left_pad([r.prompt], self.num_threads, pad_id, width=self._width([r.prompt]))
      grids.append((t[0], v[0]))
    keys = [(t.shape[-1], t.tobytes(), v.tobytes()) for t, v in grids]
    missing = list(dict.fromkeys(k for k in keys if k not in self._store))
    grid_of = dict(zip(keys, grids))
    local_width = max((k[0] for k in missing), default=16)
    width, u, a = (int(x) for x in self._agree([local_width, len(missing), len(batch)]))
    if a == 0:
      return
    repad = lambda x, value, p: np.concatenate(
        [np.full(x.shape[:-1] + (p - x.shape[-1],), value, x.dtype), x], axis=-1)
    if u:  # the missing grids, prefilled at the agreed width into free or least recent rows
      needed = set(keys)
      taken = {row for row, _ in self._store.values()}
      spare = [row for k, (row, _) in self._store.items() if k not in needed]  # oldest first
      rows = ([r for r in range(self.local_store_rows) if r not in taken]
              + spare)[:len(missing)]
      for k in [k for k, (row, _) in self._store.items() if row in rows]:
        del self._store[k]
      u_pad = self._rows(u)
      blank = (np.full((self.num_threads, width), pad_id, np.int32),
               np.zeros((self.num_threads, width), bool))
      padded = [(repad(grid_of[k][0], pad_id, width), repad(grid_of[k][1], False, width))
                for k in missing] + [blank] * (u_pad - len(missing))
      rows_arr = np.asarray([self._store_lo + r for r in rows]
                            + [self.store_rows] * (u_pad - len(rows)),
                            np.int32)
      with self._mesh():
        self.store = _prefill(self.model, self.params, self.store,
                              self._put(np.stack([t for t, _ in padded])),
                              self._put(np.stack([v for _, v in padded])), self._put(rows_arr),
                              mesh=self.static["mesh"], rules=self.static["rules"])
      self._store.update((k, (row, width)) for k, row in zip(missing, rows))
      self.stats.prefill_rows += len(missing)
    for k in keys:  # most recently used last
      self._store[k] = self._store.pop(k)
    starts = [self._store[k][1] for k in keys]  # each grid's width in the store
    n = len(batch)
    knobs = _knobs(n, self.max_new_tokens, [r.temperature for r in reqs],
                   [r.top_p for r in reqs], [r.top_k for r in reqs], (),
                   [list(r.stop_sequences) for r in reqs]) if reqs else None
    stops = np.full((n, *self.stop_shape), -1, np.int32)
    if knobs is not None and knobs["stops"].size:
      got = knobs["stops"]
      stops[:, :got.shape[1], self.stop_shape[1] - got.shape[2]:] = got
    slots = self.local_slots

    def fill(values, pad, dtype) -> np.ndarray:  # this process's slots in order: `values` at
      pad = np.asarray(pad, dtype)  # the admitted ones (free[:n]), `pad` elsewhere
      out = np.array(np.broadcast_to(pad, (slots,) + pad.shape))
      if n:
        out[np.asarray(free[:n])] = np.asarray(values, dtype).reshape((n,) + pad.shape)
      return out

    key_data = lambda seed: np.asarray(jax.random.key_data(jax.random.key(seed)), np.uint32)
    knob = lambda name: knobs[name] if knobs is not None else []
    new = dict(
        temperature=fill(knob("temperature"), 0.0, np.float32),
        top_p=fill(knob("top_p"), 1.0, np.float32), top_k=fill(knob("top_k"), 0, np.int32),
        stops=fill(stops, np.full(self.stop_shape, -1), np.int32),
        budget=fill([r.max_new_tokens for r in reqs], 0, np.int32),
        start=fill(starts, 0, np.int32),
        key=fill([key_data(r.seed) for r in reqs], np.zeros_like(key_data(0)), np.uint32))
    src = fill([self._store_lo + self._store[k][0] for k in keys], 0, np.int32)
    admit = fill([True] * n, False, bool)
    with self._mesh():
      self.state = _admit(self.model, self.state, self.store, self._put(admit), self._put(src),
                          {k: self._put(v) for k, v in new.items()}, **self.static)
    for (ticket, r), slot, k, p in zip(batch, free, keys, starts):
      tokens, valid = grid_of[k]
      self._owner[slot] = (ticket, r, repad(tokens, pad_id, p), repad(valid, False, p))
      self._sent[slot] = None if r.on_tokens is None else [0] * self.num_threads
    self.stats.admitted += n
    self.stats.admissions += 1

  # ---- the step loop

  def submit(self, request: Request) -> int:
    """Queues a request (checked now: ValueError naming what is wrong); returns its ticket.
    Thread-safe."""
    self._check("submitted", request)
    return self._enqueue(request)

  def _enqueue(self, request: Request) -> int:
    with self._lock:
      ticket = next(self._tickets)
      self._waiting.append((ticket, request))
    return ticket

  def cancel(self, ticket: int) -> None:
    """Drops a waiting request, or frees its slot at the next step (its result is never
    returned). Thread-safe."""
    with self._lock:
      self._cancelled.add(ticket)

  @property
  def busy(self) -> bool:
    """Whether this process has a request waiting or in a slot."""
    return bool(self._waiting) or any(o is not None for o in self._owner)

  def step(self) -> list[tuple[int, Result]]:
    """Admits waiting requests into free slots, decodes up to `decode_chunk` columns, and
    returns the (ticket, result) of the lattices that finished. On several processes every
    process calls it together."""
    start = time.monotonic()
    with self._lock:
      cancelled, self._cancelled = self._cancelled, set()
      if cancelled:
        self._waiting = collections.deque(x for x in self._waiting if x[0] not in cancelled)
      free = [s for s, o in enumerate(self._owner) if o is None]
      batch, prompts = [], set()  # FIFO, at most as many distinct prompts as the store holds
      while self._waiting and len(batch) < len(free):
        key = _prompt_key(self._waiting[0][1].prompt)
        if key not in prompts and len(prompts) >= self.local_store_rows:
          break
        prompts.add(key)
        batch.append(self._waiting.popleft())
    self._release(np.asarray([o is not None and o[0] in cancelled for o in self._owner]))
    self._admit(batch, free[:len(batch)])
    waiting, running = (bool(x) for x in self._agree([len(self._waiting) > 0, self.busy]))
    done = []
    if running:
      with self._mesh():
        self.state, k, occupancy = _decode(
            self.model, self.params, self.state, jnp.int32(self.decode_chunk),
            jnp.bool_(waiting), **self.static)
      self.stats.decode_calls += 1
      self.stats.columns += int(k)
      self.stats.slot_columns += int(occupancy)
      done = self._harvest()
    self.stats.seconds += time.monotonic() - start
    return done

  def generate(self, requests: Sequence[Request], *, should_cancel=None) -> list[Result]:
    """Generates every request (in slots as they free up, FIFO) and returns their results in
    order. should_cancel: called between decode calls (it must answer the same on every
    process); True stops (`sampling.Cancelled`) and empties the slots."""
    for index, r in enumerate(requests):
      self._check(index, r)
    if self.busy:
      raise RuntimeError("generate() on an engine with requests in flight (submit/step)")
    tickets = {self._enqueue(r): i for i, r in enumerate(requests)}  # checked above
    results: list[Result | None] = [None] * len(requests)
    while self._agree([self.busy])[0]:
      for ticket, result in self.step():
        results[tickets[ticket]] = result
      if should_cancel is not None and should_cancel():
        self.reset()
        raise Cancelled("cancelled by should_cancel")
    return results

  def _harvest(self) -> list[tuple[int, Result]]:
    """Reads back this process's finished lattices (and streams new tokens), frees their
    slots."""
    running = self._get(_running_slots(self.state))
    owned = np.asarray([o is not None for o in self._owner])
    finished = owned & ~running
    streaming = [s for s in range(self.local_slots) if self._sent[s] is not None]
    done = []
    if finished.any() or streaming:
      host = {k: self._get(self.state[k])
              for k in ("out", "lps", "lengths", "done", "hidden_sum")}
      for s in streaming:
        _, r, _, _ = self._owner[s]
        new = [host["out"][s, w, self._sent[s][w]:host["lengths"][s, w]].tolist()
               for w in range(self.num_threads)]
        if any(new):
          self._sent[s] = [int(x) for x in host["lengths"][s]]
          r.on_tokens(new)
      for s in np.flatnonzero(finished):
        ticket, r, tokens, valid = self._owner[s]
        n = r.max_new_tokens
        lengths = host["lengths"][s]
        done.append((ticket, Result(
            tokens=host["out"][s, :, :n], logprobs=host["lps"][s, :, :n], lengths=lengths,
            finish_reasons=["stop" if d else "length" for d in host["done"][s]],
            prompt_tokens=tokens, prompt_valid=valid,
            mean_hidden=host["hidden_sum"][s] / np.maximum(lengths, 1)[:, None])))
        self.stats.finished += 1
    self._release(finished)
    return done

  def _release(self, local: np.ndarray) -> None:
    """Empties the local slots marked in `local` [local slots] (every process calls it)."""
    if not self._agree([local.any()])[0]:
      return
    for s in np.flatnonzero(local):
      self._owner[s] = self._sent[s] = None
    with self._mesh():
      self.state = _release(self.state, self._put(local))

  def warmup_cases(self) -> list[tuple[int, int]]:
    """(prompt width, prompts prefilled at once) of every prefill shape a request can need:
    the power-of-two widths up to max_prompt_len by the admission sizes up to the slots."""
    widths = [16 * 2**i for i in range(self.max_prompt_len.bit_length())
              if 16 * 2**i <= self.max_prompt_len]
    sizes = {}  # compiled rows -> the fewest prompts that give them
    for u in range(1, min(self.local_slots, self.local_store_rows) + 1):
      sizes.setdefault(self._rows(u), u)
    return [(w, u) for w in widths for u in sorted(sizes.values())]

  def warmup(self, progress: Callable[[int, int], None] | None = None) -> int:
    """Compiles every program a request can run (each `warmup_cases` prefill, the admission,
    the decode loop and the release) by generating throwaway one-token lattices, so that no
    later request waits for a compile; then empties the slots, the prompt store and the stats.
    progress(done, total) after each case. Returns the cases run."""
    cases = self.warmup_cases()
    for i, (width, count) in enumerate(cases):
      self._store = {}  # none of the case's grids is stored: all `count` are prefilled at once
      prompts = []
      for j in range(count):  # distinct grids of exactly `width` tokens: all prefilled at once
        p = np.zeros((width,), np.int32)
        p[0] = j + 1
        prompts.append(p.tolist())
      self.generate([Request(p, max_new_tokens=1, temperature=0.0, seed=0) for p in prompts])
      if progress is not None:
        progress(i + 1, len(cases))
    self._store = {}
    self.stats = Stats()
    return len(cases)

  def reset(self) -> None:
    """Empties every slot and the queue (the cache stays allocated)."""
    with self._lock:
      self._waiting.clear()
    self._release(np.ones((self.local_slots,), bool))


def as_sample_output(results: Sequence[Result], width: int | None = None,
                     max_new_tokens: int | None = None, pad_id: int = 0):
  """Results -> one `sampling.SampleOutput` (the sampler's batch form): prompts left-padded to
  `width` (default: the widest), tokens and logprobs padded to `max_new_tokens` columns
  (default: the longest)."""
  p = width or max(r.prompt_tokens.shape[-1] for r in results)
  n = max_new_tokens or max(r.tokens.shape[-1] for r in results)
  for i, r in enumerate(results):
    longest = int(r.prompt_valid.sum(-1).max())
    if longest > p:
      raise ValueError(f"result {i}: a prompt of {longest} tokens is wider than width={p}")

  def lpad(x, v):  # to p columns: padding added, or (invalid) padding columns dropped
    if x.shape[-1] >= p:
      return x[..., x.shape[-1] - p:]
    return np.concatenate([np.full(x.shape[:-1] + (p - x.shape[-1],), v, x.dtype), x], -1)

  rpad = lambda x, v: np.concatenate(
      [x, np.full(x.shape[:-1] + (n - x.shape[-1],), v, x.dtype)], -1)
  return SampleOutput(
      tokens=np.stack([rpad(r.tokens, pad_id) for r in results]),
      logprobs=np.stack([rpad(r.logprobs, 0.0) for r in results]),
      lengths=np.stack([r.lengths for r in results]),
      finish_reasons=[list(r.finish_reasons) for r in results],
      prompt_tokens=np.stack([lpad(r.prompt_tokens, pad_id) for r in results]),
      prompt_valid=np.stack([lpad(r.prompt_valid, False) for r in results]),
      mean_hidden=np.stack([r.mean_hidden for r in results]))


def abstract_calls(model: Model, params, *, slots: int, num_threads: int, prompt_len: int,
                   max_new_tokens: int, mesh, rules, prompt_store: int | None = None,
                   stop_ids: Sequence[int] = (0,),
                   stop_shape: tuple[int, int] = (4, 16)) -> list[tuple]:
  """The engine's jitted calls at their largest shapes, with abstract arguments laid out on
  `mesh` (nothing allocated), for the plan mode (`lace_jax.plan`): [(name, jitted, args,
  kwargs, arg groups)]: "prefill" (min(S, store) prompt grids into the store), "admit" (S requests into
  the slots) and "decode" (the column loop over S slots); the "cache" group is the slots'
  state and the store. `params`: ShapeDtypeStructs carrying
  their shardings."""
  rules = tuple(rules)
  s, w, p, n = slots, num_threads, bucket(prompt_len, 16), max_new_tokens
  static = dict(stop_ids=tuple(int(t) for t in stop_ids), pad_id=0, mesh=mesh, rules=rules)
  bs = lambda ndim: sharding.batch_sharding(mesh, ndim, rules=rules)
  sd = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=bs(len(shape)))
  one = lambda dt: jax.ShapeDtypeStruct((), dt, sharding=sharding.replicated(mesh))
  with_sharding = lambda tree, shardings: jax.tree.map(
      lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree, shardings)
  state = jax.eval_shape(functools.partial(
      _empty_state, model, slots=s, num_threads=w, length=p + n, max_new_tokens=n,
      stop_shape=tuple(stop_shape), **dict(static, mesh=None)))
  state = with_sharding(state, dict(
      {k: bs(v.ndim) for k, v in state.items() if k != "cache"},
      cache=sharding.cache_sharding(state["cache"], mesh, rules)))
  ways = sharding.batch_ways(mesh, rules)
  r = -(-(s if prompt_store is None else prompt_store) // ways) * ways  # as `Engine` rounds
  store = jax.eval_shape(functools.partial(_empty_store, model, rows=r, num_threads=w, width=p))
  store = with_sharding(store, _store_sharding(store, mesh, rules))
  u = min(s, r)  # an admission prefills at most as many grids as the store holds
  prompt, valid, rows = sd((u, w, p), jnp.int32), sd((u, w, p), jnp.bool_), sd((u,), jnp.int32)
  admit, src = sd((s,), jnp.bool_), sd((s,), jnp.int32)
  key = jax.random.key_data(jax.random.key(0))
  new = dict(temperature=sd((s,), jnp.float32), top_p=sd((s,), jnp.float32),
             top_k=sd((s,), jnp.int32), stops=sd((s, *stop_shape), jnp.int32),
             budget=sd((s,), jnp.int32), start=sd((s,), jnp.int32),
             key=sd((s, *key.shape), key.dtype))
  return [
      ("prefill", _prefill, (model, params, store, prompt, valid, rows),
       dict(mesh=mesh, rules=rules),
       {"params": params, "cache": store, "batch": (prompt, valid, rows)}),
      ("admit", _admit, (model, state, store, admit, src, new), static,
       {"cache": (state, store), "batch": (admit, src, new)}),
      ("decode", _decode, (model, params, state, one(jnp.int32), one(jnp.bool_)), static,
       {"params": params, "cache": state}),
  ]
