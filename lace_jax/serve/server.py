"""An OpenAI-compatible chat server over the lattice generation engine (`lace_jax.engine`).

  python -m lace_jax.serve --checkpoint DIR [--lattice checkpoint|none] [--port 8000]
      [--host 127.0.0.1] [--max-threads 8] [--max-prompt-tokens 2048] [--max-new-tokens 1024]
      [--max-batch 8] [--max-engines 2] [--max-body-bytes 1048576] [--model-name NAME]
      [--no-precompile]

Endpoints (FastAPI + uvicorn):
  GET  /health               {"status": "ok"}; 503 {"status": "warming", "compiled", "of"}
                             while --precompile (the default) compiles every program
  GET  /v1/models            the OpenAI model list, one model (default id: the checkpoint
                             directory's basename)
  POST /v1/chat/completions  OpenAI chat completions. `n` is the number of threads W, generated
                             TOGETHER in one lattice (the threads read each other), so the n
                             choices are one LACE answer, not n independent samples. Extensions:
                             request field `top_k`; response field `"lace": {"best_index",
                             "format_ok", "format_error", "threads"}` from `grading.parse_lattice`.

Scheduling: one background thread (JAX never runs on the asyncio loop) owns a generation
engine per thread count n (--max-batch slots each; at most --max-engines at once, an idle one
dropped for a new n). A request goes to its engine's queue and takes a free slot at the next
engine step, while the other slots' lattices keep running; each step decodes up to
DECODE_CHUNK columns, and a finished lattice frees its slot at once. temperature, top_p, top_k,
the stop sequences and the seed are per-slot values traced by the engine, so any requests
share its compiled programs (fixed shapes: the slots, power-of-two prompt widths and
admission sizes). The prompt grid of a request is prefilled once while it stays in the
engine's prompt store (a repeated prompt with the same n is not prefilled again). One INFO
line per finished request goes to stderr:

  completion n=4 prompt_tokens=31 completion_tokens=72 seconds=1.234 queued=0.012 shared=3

seconds = from arrival to the answer, queued = until it had a slot, shared = the most
requests its engine ran at once while it ran (with JAX_LOG_COMPILES=1, JAX logs each
compilation).

Disconnects: a request whose client disconnects (or stops reading its stream) is cancelled:
dropped if still queued, its slot freed at the next engine step if running.

Prompts: every message's content is encoded as plain text (`Tokenizer.encode_chat`): a
`<|im_end|>` written by a client is text, not the token, so it cannot open a turn. A prompt is
tokenized off the event loop, after a cheap bound (more characters than --max-prompt-tokens
tokens can spell is refused untokenized).

Stopping: every thread stops on `<|im_end|>` (excluded from the content). `stop` strings are
passed to the engine as token sequences (`tokenizer.encode(s)`, those of up to 32 tokens; the
thread then stops in the lattice) and also cut from the decoded text at their first occurrence, as OpenAI does, which
catches a stop string the model spelled with other tokens (that thread went on generating
inside the lattice, but its content ends before the stop string).

Streaming (`stream: true`): each thread's content is sent as it is generated, after every
engine step, as Server-Sent Events in the OpenAI `chat.completion.chunk` format (pieces of the
threads interleaved as they come), ending with `data: [DONE]`. Detokenization is incremental
(`TextStream`, O(n) per thread): a piece never ends inside a UTF-8 character, and text that a
stop string could still cut is held back. Concatenating the `delta.content` of one index gives
exactly the non-streamed content. The last chunk before `[DONE]` carries the `lace` field (and
`usage` when `stream_options.include_usage` is true). An error after the stream started is
sent as a `data: {"error": ...}` event.

Seeds: a sampled request draws with its `seed` (a fresh random one when none is given), keyed
by request, thread and column (`lace_jax.engine`): a seeded request repeats exactly whatever
else the server is generating. Temperature 0 (below sampling.GREEDY_EPSILON, e.g. 1e-300) is
greedy and needs no seed.

Errors use the OpenAI shape {"error": {"message", "type", "param", "code"}}: 400 for a bad body
or field (also JSON nested too deeply and strings with lone surrogates), 404 for an unknown
model or route, 413 for a body over --max-body-bytes (refused before it is parsed), 500 when
generation fails (the server keeps serving). The body is validated by pydantic models
(`ChatCompletionRequest`): strictly typed ("2", 2.0 or true is not an integer), a JSON null
counts as absent, unknown fields are ignored, and it must be sent with
`Content-Type: application/json` (FastAPI parses nothing else).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import logging
import os
import random
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Annotated, Any, Literal, get_args

try:
  import fastapi
except ImportError as e:  # an optional dependency: say which extra brings it
  raise ImportError("lace_jax.serve needs FastAPI: pip install 'lace_jax[serve]'") from e
import numpy as np
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import (AfterValidator, BaseModel, BeforeValidator, Field, ValidationInfo,
                      field_validator, model_validator)
from starlette.exceptions import HTTPException as StarletteHTTPException

from lace_jax import grading, sampling
from lace_jax.engine import Engine, Request
from lace_jax.hf_io import load_pretrained
from lace_jax.model import Model, Params
from lace_jax.tokenizer import ENDOFTEXT, IM_END, Tokenizer, render_messages

log = logging.getLogger("lace_jax.serve")  # not __name__: that is "__main__" under `python -m`

MAX_STOP_STRINGS = 16
STOP_SHAPE = (MAX_STOP_STRINGS, 32)  # the engine's stop sequences: count, tokens each
DECODE_CHUNK = 16  # columns per engine step: admission, streaming and cancellation between
DEFAULT_MAX_BODY_BYTES = 1 << 20


# ---------------------------------------------------------------------------------------------
# Errors


class ApiError(Exception):
  """A request the server refuses: answered with `status` and the OpenAI error shape."""

  def __init__(self, status: int, message: str, *, param: str | None = None,
               code: str | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.code = status, message, param, code


class AsciiJSONResponse(JSONResponse):
  """JSON with non-ASCII characters escaped: an error message quoting a client's lone
  surrogate ("\\ud800") still encodes (UTF-8 cannot)."""

  def render(self, content: Any) -> bytes:
    return json.dumps(content, ensure_ascii=True, allow_nan=False,
                      separators=(",", ":")).encode("ascii")


def error_response(status: int, message: str, *, param: str | None = None,
                   code: str | None = None, type_: str = "invalid_request_error") -> JSONResponse:
  """`{"error": {"message", "type", "param", "code"}}` with HTTP `status`."""
  return AsciiJSONResponse(status_code=status, content={
      "error": {"message": message, "type": type_, "param": param, "code": code}})


def _valid_unicode(text: str) -> str:
  """`text` if it encodes as UTF-8; ValueError for a lone surrogate (JSON allows "\\ud800";
  the tokenizer does not)."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise ValueError(f"contains a lone surrogate {text[e.start]!r} at character {e.start}, "
                     "which is not valid Unicode") from None
  return text


# ---------------------------------------------------------------------------------------------
# Requests: FastAPI parses the body with these strict models ("2", 2.0 or true is no integer);
# a failure's message quotes the field's `description`. What depends on the server's arguments
# (model name, limits) is checked after parsing, by `resolve_request`.


class TextPart(BaseModel, strict=True):
  type: Literal["text"]  # OpenAI content parts: only text parts are supported
  text: Annotated[str, AfterValidator(_valid_unicode)]


class Message(BaseModel, strict=True):
  role: Literal["system", "user", "assistant"] = Field(
      description="one of 'system', 'user', 'assistant'")
  content: Annotated[str, AfterValidator(_valid_unicode)] | list[TextPart] = Field(
      description='a string or a list of text parts {"type": "text", "text": "..."}')

  @field_validator("content")
  @classmethod
  def _join_parts(cls, content: str | list[TextPart]) -> str:
    return content if isinstance(content, str) else "".join(p.text for p in content)


class StreamOptions(BaseModel, strict=True):
  include_usage: bool = Field(False, description="true or false")


class ChatCompletionRequest(BaseModel, strict=True):
  """An OpenAI chat completion body (`top_k` is an extension). Unknown fields are ignored."""

  model: str = Field(min_length=1, description="the served model's id (GET /v1/models)")
  messages: list[Message] = Field(
      min_length=1, description="a non-empty list of {role, content} objects")
  n: int = Field(1, ge=1, description="an integer >= 1, the number of threads")
  max_completion_tokens: int | None = Field(None, ge=1, description="an integer >= 1")
  max_tokens: int | None = Field(
      None, ge=1, description="an integer >= 1, equal to 'max_completion_tokens' if both given")
  temperature: float = Field(1.0, ge=0, allow_inf_nan=False,
                             description="a number >= 0 (0 is greedy)")
  top_p: float = Field(1.0, gt=0, le=1, description="a number in (0, 1]")
  top_k: int = Field(0, ge=0, description="an integer >= 0 (0 is off)")
  seed: int | None = Field(None, ge=0, lt=2**32, description="an integer from 0 to 2**32 - 1")
  stop: Annotated[list[Annotated[str, Field(min_length=1), AfterValidator(_valid_unicode)]],
                  BeforeValidator(lambda s: [s] if isinstance(s, str) else s)] = Field(
      [], max_length=MAX_STOP_STRINGS,
      description=f"a non-empty string or a list of at most {MAX_STOP_STRINGS} non-empty strings")
  stream: bool = Field(False, description="true or false")
  stream_options: StreamOptions = Field(default_factory=StreamOptions,
                                        description='an object like {"include_usage": true}')

  @model_validator(mode="before")
  @classmethod
  def _null_is_absent(cls, body: Any) -> Any:  # JSON null means absent, as in OpenAI's API
    return {k: v for k, v in body.items() if v is not None} if isinstance(body, dict) else body

  @field_validator("max_tokens")
  @classmethod
  def _one_budget(cls, max_tokens: int | None, info: ValidationInfo) -> int | None:
    other = info.data.get("max_completion_tokens")  # validated first: declared first
    if None not in (max_tokens, other) and max_tokens != other:
      raise ValueError(f"differs from 'max_completion_tokens' {other}; give one of them")
    return max_tokens


def _describe(error: dict) -> tuple[str | None, str]:
  """A pydantic error in the body -> (the OpenAI `param`, e.g. "messages[0].role", a message
  naming that field). The walk down `loc` stops at a union member's tag (e.g. "list[TextPart]")
  or an index into a list of strings: the param is then the field the client wrote, and the
  bad value (deeper) is not quoted."""
  param, expected, model = "", "a chat completion object", ChatCompletionRequest
  for item in error["loc"][1:]:  # loc[0] is "body"
    if isinstance(item, int) and model is not None:  # an index into a list of objects
      param += f"[{item}]"
    elif model is not None and item in model.model_fields:
      field = model.model_fields[item]
      param, expected = f"{param}.{item}" if param else item, field.description
      model = next((t for t in (field.annotation, *get_args(field.annotation))
                    if isinstance(t, type) and issubclass(t, BaseModel)), None)
    else:
      got = ""
      break
  else:
    try:
      got = "" if error["type"] == "missing" else f" is {json.dumps(error['input'])[:200]}"
    except (RecursionError, TypeError, ValueError):  # deeply nested or not JSON: not quoted
      got = ""
  name = f"'{param}'" if param else "the request body"
  return param or None, f"{name}{got}: {error['msg']}; expected {expected}"


@dataclasses.dataclass(frozen=True)
class ChatRequest:
  """A validated chat completion request."""

  prompt_ids: list[int]
  n: int
  max_tokens: int
  temperature: float
  top_p: float
  top_k: int
  seed: int | None
  stop: tuple[str, ...]
  stream: bool
  include_usage: bool
  stop_tokens: tuple[tuple[int, ...], ...] = ()  # `stop` encoded (the engine's sequences)

  @property
  def greedy(self) -> bool:
    return self.temperature < sampling.GREEDY_EPSILON


@dataclasses.dataclass(frozen=True)
class Limits:
  model_name: str
  max_threads: int
  max_prompt_tokens: int
  max_new_tokens: int
  vocab_size: int
  max_prompt_chars: int  # more characters than this cannot fit max_prompt_tokens tokens


def resolve_request(body: ChatCompletionRequest, tokenizer: Tokenizer,
                    limits: Limits) -> ChatRequest:
  """A parsed body -> the request to run, with the defaults that depend on the server filled
  in; raises ApiError naming the field that breaks one of the server's limits."""
  if body.model != limits.model_name:
    raise ApiError(404, f"the model {body.model!r} does not exist; this server serves "
                   f"{limits.model_name!r}", param="model", code="model_not_found")
  budget = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
  max_tokens = body.max_completion_tokens or body.max_tokens or limits.max_new_tokens
  for param, value, lo, hi, why in (
      ("n", body.n, 1, limits.max_threads, "the server's --max-threads"),
      (budget, max_tokens, 1, limits.max_new_tokens, "the server's --max-new-tokens"),
      ("top_k", body.top_k, 0, limits.vocab_size, "the vocabulary size")):
    if value > hi:
      raise ApiError(400, f"'{param}' is {value}; expected an integer from {lo} to {hi} ({why})",
                     param=param)
  messages = [m.model_dump() for m in body.messages]
  # a cheap bound before tokenizing: a token spells at most max_token_chars characters
  chars = sum(len(m["content"]) for m in messages)
  if chars > limits.max_prompt_chars:
    raise ApiError(400, f"the messages have {chars} characters, more than the server's "
                   f"--max-prompt-tokens {limits.max_prompt_tokens} tokens can hold",
                   param="messages", code="context_length_exceeded")
  # content is encoded as plain text: a "<|im_end|>" typed by a client opens no turn
  prompt_ids = tokenizer.encode_chat(messages)
  if len(prompt_ids) > limits.max_prompt_tokens:
    raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens, more than the server's "
                   f"--max-prompt-tokens {limits.max_prompt_tokens}", param="messages",
                   code="context_length_exceeded")
  greedy = body.temperature < sampling.GREEDY_EPSILON  # the filters do not matter
  return ChatRequest(prompt_ids=prompt_ids, n=body.n, max_tokens=max_tokens,
                     temperature=0.0 if greedy else body.temperature,
                     top_p=1.0 if greedy else body.top_p,
                     top_k=0 if greedy else body.top_k, seed=None if greedy else body.seed,
                     stop=tuple(body.stop),
                     stop_tokens=tuple(tuple(tokenizer.encode(s)) for s in body.stop),
                     stream=body.stream, include_usage=body.stream_options.include_usage)


# ---------------------------------------------------------------------------------------------
# Results


@dataclasses.dataclass
class ThreadResult:
  text: str
  finish_reason: str  # "stop" | "length"
  completion_tokens: int  # tokens emitted up to the cut, a stop token included


@dataclasses.dataclass
class Completion:
  threads: list[ThreadResult]
  prompt_tokens: int
  lace: dict[str, Any]

  @property
  def completion_tokens(self) -> int:
    return sum(t.completion_tokens for t in self.threads)

  def usage(self) -> dict[str, int]:
    return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens}


def finish_thread(tokenizer: Tokenizer, tokens: np.ndarray, length: int, reason: str,
                  max_tokens: int, stop_ids: Sequence[int], stop: Sequence[str]) -> ThreadResult:
  """One thread's generated tokens -> its content, cut to `max_tokens` tokens, without the
  stop token, and before the first occurrence of any `stop` string."""
  ids = [int(t) for t in tokens[:length]]
  if len(ids) > max_tokens:
    ids, reason = ids[:max_tokens], "length"
  content = ids[:-1] if reason == "stop" and ids and ids[-1] in stop_ids else ids
  text = tokenizer.decode(content)
  hits = [i for i in (text.find(s) for s in stop) if i >= 0]
  if hits:
    text, reason = text[:min(hits)], "stop"
  return ThreadResult(text, reason, len(ids))


def lace_summary(texts: Sequence[str]) -> dict[str, Any]:
  parsed = grading.parse_lattice(list(texts))
  return {"best_index": parsed.best, "format_ok": parsed.format_ok,
          "format_error": parsed.format_error, "threads": len(texts)}


# ---------------------------------------------------------------------------------------------
# Streaming text


class TextStream:
  """One thread's content as its tokens arrive -> text pieces safe to send: never part of a
  UTF-8 character, never text that a stop string could still cut (the last len(stop) - 1
  characters wait), nothing after a stop string. O(n) in the thread's tokens: each new token
  is decoded with the few tokens before it (the tokens since the last complete character)."""

  def __init__(self, tokenizer: Tokenizer, stop_ids: Sequence[int], stop: Sequence[str]):
    self.tokenizer, self.stop_ids, self.stop = tokenizer, set(stop_ids), tuple(stop)
    self.hold = max((len(x) for x in stop), default=1) - 1
    self.ids: list[int] = []
    self.prefix = self.read = 0  # ids[prefix:read] decode to the end of `text`
    self.text = ""  # the content decoded so far (complete characters)
    self.sent = 0  # characters of `text` handed out
    self.stopped = False  # a stop string was found: nothing more is sent

  def add(self, ids: Sequence[int]) -> str:
    """The new piece to send after `ids` (possibly "")."""
    if self.stopped:
      return ""
    self.ids += [int(t) for t in ids if int(t) not in self.stop_ids]
    before = self.tokenizer.decode(self.ids[self.prefix:self.read])
    now = self.tokenizer.decode(self.ids[self.prefix:])
    if len(now) > len(before) and not now.endswith("\ufffd"):
      self.text += now[len(before):]
      self.prefix, self.read = self.read, len(self.ids)
    end = len(self.text) - self.hold
    # a stop string can only start in the text not yet sent, or in the held-back tail
    look = max(0, self.sent - self.hold)
    hits = [i for i in (self.text.find(x, look) for x in self.stop) if i >= 0]
    if hits:
      end, self.stopped = min(hits), True
    piece = self.text[self.sent:max(end, self.sent)]
    self.sent += len(piece)
    return piece

  def finish(self, text: str) -> str:
    """The rest of the thread's final content `text` (what `finish_thread` gives), once it is
    done; its sent pieces are a prefix of it."""
    rest = text[self.sent:]
    self.sent = len(text)
    return rest


# ---------------------------------------------------------------------------------------------
# Scheduling


@dataclasses.dataclass
class Job:
  """A request and its client's side: the future of its Completion, whether the client has
  gone, and (streamed requests) `on_text(index, piece)`, called on the generation thread."""

  request: ChatRequest
  arrival: float  # time.monotonic()
  future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
  gone: threading.Event = dataclasses.field(default_factory=threading.Event)  # client left
  on_text: Callable[[int, str], None] | None = None
  streams: list[TextStream] | None = None
  admitted: float | None = None  # when it got a slot
  shared: int = 0  # the most lattices its engine ran beside it

  def cancel(self) -> None:
    """The client went away: a queued job is dropped, a running one frees its slot at the
    generation thread's next step."""
    self.gone.set()
    self.future.cancel()


class Scheduler:
  """The generation thread: requests go to the generation engine (`lace_jax.engine`) of their
  thread count n (one engine per n, with --max-batch slots each, at most `max_engines` at
  once; an idle one is dropped for a new n), which admits them into free slots while others
  run. Each engine step decodes up to `decode_chunk` columns; between steps new requests are
  admitted, streamed tokens are handed out and abandoned requests free their slots.

  `submit` may be called from any thread; each job's future resolves to a `Completion` or to
  the exception generation raised. `start` is idempotent; `stop` fails the jobs not finished
  and joins the thread (bounded by `timeout_s`)."""

  def __init__(self, model: Model, params: Params, tokenizer: Tokenizer, *, max_batch: int,
               max_prompt_tokens: int, max_new_tokens: int, max_engines: int = 2,
               decode_chunk: int = DECODE_CHUNK):
    self.model, self.params, self.tokenizer = model, params, tokenizer
    self.max_batch, self.max_engines = max_batch, max_engines
    self.max_prompt_tokens, self.max_new_tokens = max_prompt_tokens, max_new_tokens
    self.decode_chunk = decode_chunk
    self.stop_ids = (tokenizer.im_end_id,)
    self.pad_id = tokenizer.pad_id
    self.engines: dict[int, Engine] = {}  # n -> its engine, least recently used first
    self._pending: list[Job] = []  # submitted, not yet handed to an engine
    self._running: dict[tuple[int, int], Job] = {}  # (n, ticket) -> job
    self._cond = threading.Condition()
    self._stopping = False
    self._thread: threading.Thread | None = None
    self.completed = 0
    self.cancelled = 0
    self.warm_threads: tuple[int, ...] = ()  # thread counts n to compile for before serving
    self.warm_progress = (0, 0)  # (cases compiled, of)
    self.ready = threading.Event()  # set once the warm-up is done (at once without one)

  def start(self) -> None:
    with self._cond:
      if self._thread is not None and self._thread.is_alive():
        return
      self._stopping = False
      self._thread = threading.Thread(target=self._loop, name="lace-generation", daemon=True)
      self._thread.start()

  def stop(self, timeout_s: float = 10.0) -> None:
    with self._cond:
      self._stopping = True
      self._cond.notify_all()
    if self._thread is not None:
      self._thread.join(timeout_s)
    with self._cond:
      jobs, self._pending = self._pending + list(self._running.values()), []
      self._running.clear()
    for job in jobs:
      self._fail(job, RuntimeError("the server is shutting down"))

  def submit(self, request: ChatRequest, on_text: Callable[[int, str], None] | None = None
             ) -> Job:
    """Queues `request`; its job's future resolves to the Completion. on_text(index, piece):
    the content of thread `index` as it is generated (streamed requests)."""
    self.start()
    job = Job(request, time.monotonic(), on_text=on_text)
    with self._cond:
      self._pending.append(job)
      self._cond.notify_all()
    return job

  @staticmethod
  def _fail(job: Job, error: BaseException) -> None:
    if not job.future.done():
      job.future.set_exception(error)

  def _engine(self, n: int) -> Engine | None:
    """The engine of n threads (made if there is room: an idle engine of another n is
    dropped, its cache freed), or None while every engine is busy."""
    if n in self.engines:
      self.engines[n] = self.engines.pop(n)  # most recently used last
      return self.engines[n]
    if len(self.engines) >= self.max_engines:
      idle = [k for k, e in self.engines.items() if not e.busy]
      if not idle:
        return None
      del self.engines[idle[0]]
      log.info("dropped the idle engine of n=%d threads (--max-engines %d)", idle[0],
               self.max_engines)
    start = time.perf_counter()
    self.engines[n] = Engine(
        self.model, self.params, slots=self.max_batch, num_threads=n,
        max_prompt_len=self.max_prompt_tokens, max_new_tokens=self.max_new_tokens,
        stop_ids=self.stop_ids, pad_id=self.pad_id, stop_shape=STOP_SHAPE,
        decode_chunk=self.decode_chunk)
    log.info("engine for n=%d threads: %d slots of %d prompt + %d new tokens (%.1f s)", n,
             self.max_batch, self.max_prompt_tokens, self.max_new_tokens,
             time.perf_counter() - start)
    return self.engines[n]

  def _request(self, job: Job) -> Request:
    r = job.request

    def on_tokens(new: list[list[int]]) -> None:  # streamed: each thread's new text
      for i, ids in enumerate(new):
        piece = job.streams[i].add(ids)
        if piece:
          job.on_text(i, piece)

    if job.on_text is not None:
      job.streams = [TextStream(self.tokenizer, self.stop_ids, r.stop) for _ in range(r.n)]

    seed = r.seed if r.seed is not None else random.SystemRandom().randrange(2**31)
    # stop strings go to the engine as token sequences when they fit its stop array; the text
    # cut (`finish_thread`) catches the others
    stops = [q for q in r.stop_tokens if len(q) <= STOP_SHAPE[1]]
    return Request(r.prompt_ids, max_new_tokens=r.max_tokens, temperature=r.temperature,
                   top_p=r.top_p, top_k=r.top_k, stop_sequences=stops, seed=seed,
                   on_tokens=on_tokens if job.on_text is not None else None)

  def _dispatch(self) -> None:
    """Pending jobs -> their engines' queues (FIFO per n); abandoned jobs dropped or their
    slots freed."""
    with self._cond:
      pending, self._pending = self._pending, []
    kept = []
    for job in pending:
      if job.gone.is_set():
        self.cancelled += 1
        continue
      engine = self._engine(job.request.n)
      if engine is None:  # every engine busy with other n: wait
        kept.append(job)
        continue
      if not job.future.set_running_or_notify_cancel():
        continue
      self._running[(job.request.n, engine.submit(self._request(job)))] = job
    for (n, ticket), job in list(self._running.items()):
      if job.gone.is_set():
        self.engines[n].cancel(ticket)
        del self._running[(n, ticket)]
        self.cancelled += 1
        log.info("client disconnected: request (n=%d, max_tokens=%d) cancelled, its slot "
                 "freed", n, job.request.max_tokens)
    with self._cond:
      self._pending = kept + self._pending

  def _warm_up(self) -> None:
    """Compiles every engine program of each n in `warm_threads` (`Engine.warmup`) before the
    first request is served: requests that come meanwhile wait in the queue."""
    try:
      start, done, total = time.perf_counter(), 0, 0
      for n in self.warm_threads:
        engine = self._engine(n)
        per_n = len(engine.warmup_cases())  # the same for every n (slots, prompt widths)
        total = total or per_n * len(self.warm_threads)
        self.warm_progress = (done, total)
        engine.warmup(lambda i, _, base=done: setattr(self, "warm_progress", (base + i, total)))
        done += per_n
        log.info("warm-up: compiled for n=%d threads (%d/%d cases, %.1f s)", n, done, total,
                 time.perf_counter() - start)
      log.info("ready: every program compiled for n in %s (%.1f s)", list(self.warm_threads),
               time.perf_counter() - start)
    except Exception:  # noqa: BLE001 (requests then compile as they come; the server serves)
      log.exception("warm-up failed; requests will compile their programs as they come")
    finally:
      self.ready.set()

  def _loop(self) -> None:
    if self.warm_threads:
      self._warm_up()
    self.ready.set()
    while True:
      with self._cond:
        while not (self._stopping or self._pending or self._running):
          self._cond.wait(0.5)
        if self._stopping:
          return
      self._dispatch()
      for n, engine in list(self.engines.items()):
        if not engine.busy:
          continue
        try:
          finished = engine.step()
        except Exception as e:  # answered as 500s; the thread keeps serving
          log.exception("generation failed on the engine of n=%d threads", n)
          for key in [k for k in self._running if k[0] == n]:
            self._fail(self._running.pop(key), e)
          del self.engines[n]  # its state may be half-updated: a fresh one next time
          continue
        now = time.monotonic()
        live = sum(1 for k in self._running if k[0] == n)
        for (k, _), job in self._running.items():
          if k == n:
            job.admitted = job.admitted or now
            job.shared = max(job.shared, live)
        for ticket, result in finished:
          job = self._running.pop((n, ticket), None)
          if job is not None and not job.future.done():
            try:
              job.future.set_result(self._completion(job, result))
            except Exception as e:  # noqa: BLE001  (a 500 for this request only)
              log.exception("finishing a request failed")
              self._fail(job, e)

  def _completion(self, job: Job, result) -> Completion:
    r = job.request
    threads = [finish_thread(self.tokenizer, result.tokens[w], int(result.lengths[w]),
                             result.finish_reasons[w], r.max_tokens, self.stop_ids, r.stop)
               for w in range(r.n)]
    completion = Completion(threads, len(r.prompt_ids), lace_summary([t.text for t in threads]))
    self.completed += 1
    now = time.monotonic()
    log.info("completion n=%d prompt_tokens=%d completion_tokens=%d seconds=%.3f "
             "queued=%.3f shared=%d", r.n, completion.prompt_tokens,
             completion.completion_tokens, now - job.arrival,
             (job.admitted or now) - job.arrival, job.shared)
    return completion


# ---------------------------------------------------------------------------------------------
# The app


def _completion_body(c: Completion, *, completion_id: str, created: int, model: str) -> dict:
  return {
      "id": completion_id, "object": "chat.completion", "created": created, "model": model,
      "choices": [{"index": i, "message": {"role": "assistant", "content": t.text},
                   "logprobs": None, "finish_reason": t.finish_reason}
                  for i, t in enumerate(c.threads)],
      "usage": c.usage(), "lace": c.lace}


def _sse_event(completion_id: str, created: int, model: str, index: int | None,
               delta: dict | None = None, finish: str | None = None, **extra) -> str:
  """One `data: ...` event of a streamed completion (a `chat.completion.chunk`)."""
  choices = [] if index is None else [
      {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]
  body = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
          "model": model, "choices": choices, **extra}
  return f"data: {json.dumps(body)}\n\n"


class BodyTooLarge(StarletteHTTPException):
  """A request body over the server's --max-body-bytes (an HTTPException, so that FastAPI
  passes it through while reading the body)."""

  def __init__(self, max_bytes: int):
    super().__init__(413, f"the request body is larger than the server's --max-body-bytes "
                     f"{max_bytes}")
    self.max_bytes = max_bytes

  def response(self) -> JSONResponse:
    return error_response(413, self.detail, code="request_too_large")


class BodyLimit:
  """ASGI middleware refusing a request body over `max_bytes` with 413, before anything parses
  it. A declared Content-Length over the limit is answered without buffering the body: it is
  read and discarded (up to DRAIN_LIMIT_BYTES, so that a client that sends the whole body
  before reading gets the answer), then refused. A body without a length is counted as it
  arrives."""

  DRAIN_LIMIT_BYTES = 256 << 20

  def __init__(self, app, max_bytes: int):
    self.app, self.max_bytes = app, max_bytes

  async def __call__(self, scope, receive, send) -> None:
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    length = dict(scope["headers"]).get(b"content-length", b"")
    if length.isdigit() and int(length) > self.max_bytes:
      drained, more = 0, True
      while more and drained <= self.DRAIN_LIMIT_BYTES:
        message = await receive()
        if message["type"] != "http.request":
          return  # the client left
        drained += len(message.get("body", b""))
        more = message.get("more_body", False)
      log.info("refused a request body of %s bytes (limit %d)", length.decode(),
               self.max_bytes)
      return await BodyTooLarge(self.max_bytes).response()(scope, receive, send)
    received = 0

    async def counted():
      nonlocal received
      message = await receive()
      if message["type"] == "http.request":
        received += len(message.get("body", b""))
        if received > self.max_bytes:
          raise BodyTooLarge(self.max_bytes)
      return message

    await self.app(scope, counted, send)


async def _disconnected(request: fastapi.Request) -> None:
  """Returns once the client of `request` (whose body was read) has disconnected."""
  while (await request.receive())["type"] != "http.disconnect":
    pass


def _server_limits(model: Model, tokenizer: Tokenizer, *, model_name: str, max_threads: int,
                   max_prompt_tokens: int, max_new_tokens: int, max_batch: int,
                   max_engines: int, max_body_bytes: int) -> Limits:
  """`create_app`'s arguments checked against each other, the model and the tokenizer ->
  the limits requests are resolved against. ValueError for a bad limit, KeyError naming a stop
  or pad token the tokenizer lacks."""
  for name, value in (("max_threads", max_threads), ("max_prompt_tokens", max_prompt_tokens),
                      ("max_new_tokens", max_new_tokens), ("max_batch", max_batch),
                      ("max_engines", max_engines), ("max_body_bytes", max_body_bytes)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}={value!r}; expected an integer >= 1")
  cfg = model.config
  if max_prompt_tokens + max_new_tokens > cfg.max_position_embeddings:
    raise ValueError(f"max_prompt_tokens + max_new_tokens = {max_prompt_tokens} + "
                     f"{max_new_tokens} exceeds the model's max_position_embeddings "
                     f"{cfg.max_position_embeddings}")
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(f"the tokenizer {tokenizer.source} has {tokenizer.vocab_size} tokens, more "
                     f"than the model's vocab_size {cfg.vocab_size}: not this model's tokenizer")
  for token in (IM_END, ENDOFTEXT):  # the stop and pad tokens: KeyError naming a missing one
    tokenizer.token_id(token)
  return Limits(model_name, max_threads, max_prompt_tokens, max_new_tokens, cfg.vocab_size,
                max_prompt_tokens * tokenizer.max_token_chars)


def _lifespan(scheduler: Scheduler) -> Callable[[fastapi.FastAPI],
                                                contextlib.AbstractAsyncContextManager[None]]:
  """The app's lifespan: the generation thread runs from startup to shutdown (joined off the
  event loop, which keeps answering while a batch finishes)."""

  @contextlib.asynccontextmanager
  async def lifespan(app: fastapi.FastAPI) -> AsyncIterator[None]:
    scheduler.start()
    yield
    await asyncio.to_thread(scheduler.stop)

  return lifespan


# Errors raised while a request is handled -> the OpenAI error shape.


async def _http_error(request: fastapi.Request, exc: StarletteHTTPException) -> JSONResponse:
  """Starlette's HTTP errors (an unknown route, a body over the limit, JSON too deep for
  FastAPI's parser)."""
  if isinstance(exc, BodyTooLarge):
    return exc.response()
  if isinstance(exc.__cause__, RecursionError):  # FastAPI's json.loads gave up
    return error_response(400, "the request body is nested too deeply to parse; expected "
                          "a chat completion object", code="invalid_json")
  code = "not_found" if exc.status_code == 404 else None
  return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                        code=code)


async def _api_error(request: fastapi.Request, exc: ApiError) -> JSONResponse:
  """A request `resolve_request` refused."""
  return error_response(exc.status, exc.message, param=exc.param, code=exc.code)


async def _validation_error(request: fastapi.Request,
                            exc: RequestValidationError) -> JSONResponse:
  """A body that is not JSON, or that `ChatCompletionRequest` rejects: 400 naming the field."""
  error = exc.errors()[0]
  if error["type"] == "json_invalid":
    return error_response(400, f"the request body is not valid JSON ({error['ctx']['error']} "
                          f"at character {error['loc'][1]}); expected a chat completion "
                          "object", code="invalid_json")
  if isinstance(error["input"], bytes):  # FastAPI parses only a body sent as JSON
    return error_response(400, "the request body was not sent as JSON; send it with "
                          "Content-Type: application/json", code="invalid_json")
  # the deepest error: for a union (`content`), the member the value was meant for
  param, message = _describe(max(exc.errors(), key=lambda e: len(e["loc"])))
  return error_response(400, message, param=param)


async def _server_error(request: fastapi.Request, exc: Exception) -> JSONResponse:
  """Anything else: logged with its traceback, answered as a 500."""
  log.exception("unhandled error for %s %s", request.method, request.url.path)
  return error_response(500, f"internal error: {type(exc).__name__}: {exc}",
                        type_="server_error")


def _add_error_handlers(app: fastapi.FastAPI) -> None:
  """Answers every error in the OpenAI shape (module docstring: which status for what)."""
  app.add_exception_handler(StarletteHTTPException, _http_error)
  app.add_exception_handler(ApiError, _api_error)
  app.add_exception_handler(RequestValidationError, _validation_error)
  app.add_exception_handler(Exception, _server_error)


def _add_model_routes(app: fastapi.FastAPI, model_name: str, created_at: int,
                      scheduler: Scheduler) -> None:
  """GET /health, /v1/models and /v1/models/{id}: the server's one model, `model_name`.
  /health is {"status": "ok"} once the warm-up compiled every program; before, 503 with
  {"status": "warming", "compiled": k, "of": n} (requests are accepted and queued)."""

  @app.get("/health")
  async def health() -> Any:
    if scheduler.ready.is_set():
      return {"status": "ok"}
    done, total = scheduler.warm_progress
    return JSONResponse({"status": "warming", "compiled": done, "of": total}, status_code=503)

  def model_card() -> dict:
    return {"id": model_name, "object": "model", "created": created_at, "owned_by": "lace_jax"}

  @app.get("/v1/models")
  async def list_models() -> dict:
    return {"object": "list", "data": [model_card()]}

  @app.get("/v1/models/{model_id:path}")
  async def get_model(model_id: str) -> Any:
    if model_id != model_name:
      return error_response(404, f"the model {model_id!r} does not exist; this server serves "
                            f"{model_name!r}", param="model", code="model_not_found")
    return model_card()


def _stream_response(scheduler: Scheduler, req: ChatRequest, model_name: str
                     ) -> StreamingResponse:
  """A streamed request: queued now; its Server-Sent Events are sent as its threads'
  content is generated (one chunk per piece of one thread), then each thread's finish chunk,
  the `lace` field (and `usage`) and `[DONE]`. A client that goes away frees its slot."""
  completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
  event = functools.partial(_sse_event, completion_id, created, model_name)
  loop = asyncio.get_running_loop()
  pieces: asyncio.Queue = asyncio.Queue()
  job = scheduler.submit(req, on_text=lambda i, piece: loop.call_soon_threadsafe(
      pieces.put_nowait, (i, piece)))
  done = asyncio.wrap_future(job.future)

  async def stream() -> AsyncIterator[str]:
    try:
      for i in range(req.n):
        yield event(i, {"role": "assistant", "content": ""})
      while True:
        getter = asyncio.ensure_future(pieces.get())
        await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
        if not getter.done():
          getter.cancel()
          break
        i, piece = getter.result()
        yield event(i, {"content": piece})
      while not pieces.empty():  # pieces handed out just before the completion
        i, piece = pieces.get_nowait()
        yield event(i, {"content": piece})
      try:
        c: Completion = done.result()
      except Exception as e:  # after the 200: the error as an event, as OpenAI does
        yield f"data: {json.dumps({'error': {'message': f'generation failed: {e}', 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
        yield "data: [DONE]\n\n"
        return
      for i, t in enumerate(c.threads):
        rest = job.streams[i].finish(t.text)
        if rest:
          yield event(i, {"content": rest})
      last = len(c.threads) - 1
      for i, t in enumerate(c.threads):
        extra = {"lace": c.lace} if i == last and not req.include_usage else {}
        yield event(i, {}, t.finish_reason, **extra)
      if req.include_usage:
        yield event(None, usage=c.usage(), lace=c.lace)
      yield "data: [DONE]\n\n"
    finally:
      if not job.future.done():  # the client went away mid-stream
        job.cancel()
        log.info("client disconnected from a stream: request (n=%d, max_tokens=%d) "
                 "cancelled", req.n, req.max_tokens)

  return StreamingResponse(stream(), media_type="text/event-stream",
                           headers={"Cache-Control": "no-cache"})


def _add_chat_route(app: fastapi.FastAPI, scheduler: Scheduler, tokenizer: Tokenizer,
                    limits: Limits) -> None:
  """POST /v1/chat/completions: the request is resolved off the event loop and queued on
  `scheduler`; a streamed one is answered at once with its events, another awaited. A client
  that disconnects first cancels its job (answered 499, which nobody reads); a failed
  generation is a 500."""

  @app.post("/v1/chat/completions")
  async def chat_completions(body: ChatCompletionRequest, request: fastapi.Request) -> Any:
    # tokenizing takes time for a long prompt: off the event loop, which keeps serving
    req = await asyncio.to_thread(resolve_request, body, tokenizer, limits)
    if req.stream:
      return _stream_response(scheduler, req, limits.model_name)
    job = scheduler.submit(req)
    result = asyncio.wrap_future(job.future)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
      await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
      gone.cancel()
    if not result.done():  # the client disconnected: nobody reads the answer
      job.cancel()
      result.cancel()
      log.info("client disconnected: request (n=%d, max_tokens=%d) cancelled", req.n,
               req.max_tokens)
      return fastapi.Response(status_code=499)
    try:
      completion: Completion = result.result()
    except Exception as e:
      return error_response(500, f"generation failed: {type(e).__name__}: {e}",
                            type_="server_error")
    return _completion_body(completion, completion_id=f"chatcmpl-{uuid.uuid4().hex}",
                            created=int(time.time()), model=limits.model_name)


def create_app(model: Model, params: Params, tokenizer: Tokenizer, *, model_name: str,
               max_threads: int = 8, max_prompt_tokens: int = 2048, max_new_tokens: int = 1024,
               max_batch: int = 8, max_engines: int = 2,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               precompile: bool = False) -> fastapi.FastAPI:
  """The FastAPI app serving `model` with `params` (module docstring: endpoints, scheduling,
  streaming). max_batch: slots (lattices generated at once) per thread count n; max_engines:
  thread counts served at once (each its own slots and KV cache).

  The generation thread starts with the app's lifespan (or on the first request) and stops at
  shutdown; `app.state.scheduler` is the `Scheduler`. precompile: the thread first compiles
  every program of every n in 1..max_threads (`Engine.warmup`; /health says "warming" until it
  is done), so that no request waits for a compile (the CLI's default). Raises ValueError for a limit below 1, a
  prompt + completion budget beyond the model's max_position_embeddings, or a tokenizer that
  does not fit the model.
  """
  limits = _server_limits(model, tokenizer, model_name=model_name, max_threads=max_threads,
                          max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens,
                          max_batch=max_batch, max_engines=max_engines,
                          max_body_bytes=max_body_bytes)
  scheduler = Scheduler(model, params, tokenizer, max_batch=max_batch, max_engines=max_engines,
                        max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens)
  if precompile:
    scheduler.warm_threads = tuple(range(1, max_threads + 1))
  created_at = int(time.time())
  app = fastapi.FastAPI(title="lace_jax", lifespan=_lifespan(scheduler))
  app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
  app.state.scheduler = scheduler
  app.state.limits = limits
  _add_error_handlers(app)
  _add_model_routes(app, model_name, created_at, scheduler)
  _add_chat_route(app, scheduler, tokenizer, limits)
  return app


# ---------------------------------------------------------------------------------------------
# CLI


def _positive(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"{value} is not >= 1")
  return value


def _non_negative(text: str) -> float:
  value = float(text)
  if not value >= 0:
    raise argparse.ArgumentTypeError(f"{value} is not >= 0")
  return value


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m lace_jax.serve",
                              description="OpenAI-compatible chat server over the LACE "
                              "generation engine")
  p.add_argument("--checkpoint", required=True, help="Hugging Face Qwen3 directory (with "
                 "config.json, safetensors and tokenizer.json), e.g. from save_pretrained")
  p.add_argument("--lattice", choices=("checkpoint", "none"), default="checkpoint",
                 help="'checkpoint': the stored lattice; 'none': the base model (Isolated "
                 "Parallel ablation)")
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--max-threads", type=_positive, default=8, help="largest n per request")
  p.add_argument("--max-prompt-tokens", type=_positive, default=2048)
  p.add_argument("--max-new-tokens", type=_positive, default=1024,
                 help="largest max_tokens per request (also its default)")
  p.add_argument("--max-batch", type=_positive, default=8,
                 help="requests generated at once per thread count n (the engine's slots)")
  p.add_argument("--max-engines", type=_positive, default=2,
                 help="thread counts n served at once (each its own slots and KV cache)")
  p.add_argument("--max-body-bytes", type=_positive, default=DEFAULT_MAX_BODY_BYTES,
                 help="largest request body; a larger one is refused with 413")
  p.add_argument("--precompile", action=argparse.BooleanOptionalAction, default=True,
                 help="compile every program (each n up to --max-threads, each prompt width "
                 "and admission size) at start, so that no request waits for a compile; "
                 "/health answers 503 'warming' until it is done")
  p.add_argument("--model-name", default=None,
                 help="model id to serve (default: the checkpoint directory's basename)")
  return p


def main(argv: Sequence[str] | None = None) -> None:
  """Loads the checkpoint and its tokenizer and serves until interrupted."""
  args = build_parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                      format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  import uvicorn  # noqa: PLC0415  (only the CLI needs it)

  ckpt = os.path.normpath(args.checkpoint)
  if not os.path.isdir(ckpt):
    sys.exit(f"lace_jax.serve: --checkpoint {args.checkpoint} is not a directory")
  tok_path = os.path.join(ckpt, "tokenizer.json")
  if not os.path.isfile(tok_path):
    sys.exit(f"lace_jax.serve: {tok_path} does not exist; the server needs the checkpoint's "
             "tokenizer.json (copy it from the base model's directory)")
  tokenizer = Tokenizer.from_dir(ckpt)
  model, params = load_pretrained(ckpt, lattice=None if args.lattice == "none" else "checkpoint")
  name = args.model_name or os.path.basename(os.path.abspath(ckpt))
  try:
    app = create_app(model, params, tokenizer, model_name=name,
                     max_threads=args.max_threads,
                     max_prompt_tokens=args.max_prompt_tokens,
                     max_new_tokens=args.max_new_tokens, max_batch=args.max_batch,
                     max_engines=args.max_engines,
                     max_body_bytes=args.max_body_bytes, precompile=args.precompile)
  except (ValueError, KeyError) as e:
    sys.exit(f"lace_jax.serve: {e}")
  log.info("serving %s as %r (lattice=%s) on http://%s:%d", ckpt, name,
           "none" if model.lattice is None else "checkpoint", args.host, args.port)
  uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
  main()
