"""An OpenAI-compatible chat server over the lockstep lattice sampler.

  python -m lace_jax.serve --checkpoint DIR [--lattice checkpoint|none] [--port 8000]
      [--host 127.0.0.1] [--max-threads 8] [--max-prompt-tokens 2048] [--max-new-tokens 1024]
      [--max-batch 8] [--batch-window-ms 50] [--max-body-bytes 1048576] [--model-name NAME]

Endpoints (FastAPI + uvicorn):
  GET  /health               {"status": "ok"}
  GET  /v1/models            the OpenAI model list, one model (default id: the checkpoint
                             directory's basename)
  POST /v1/chat/completions  OpenAI chat completions. `n` is the number of threads W, generated
                             TOGETHER in one lattice (the threads read each other), so the n
                             choices are one LACE answer, not n independent samples. Extensions:
                             request field `top_k`; response field `"lace": {"best_index",
                             "format_ok", "format_error", "threads"}` from `grading.parse_lattice`.

Batching: requests are queued; one background thread (JAX never runs on the asyncio loop)
takes the oldest request plus every queued request compatible with it (same n and, when
sampling, the same seed), up to --max-batch, waiting until --batch-window-ms after the oldest
request arrived for more, and runs ONE `sampling.sample` call for them all. temperature,
top_p, top_k and the stop sequences are per-request arrays traced by the sampler, so requests
with different values share a batch and a compiled program. Shapes are bucketed to bound
recompilation: the batch is padded to a power of two (dummy rows, capped at --max-batch), the
prompt width to a power of two >= 16, the step count to a power of two >= 16 (capped at
--max-new-tokens) and the stop sequences to power-of-two counts and lengths; past MAX_COMPILED
distinct shapes the sampler's compilation cache is cleared. Each request's threads are then
cut to its own max_tokens. Because the sampler is causal over columns, the cut is exact:
tokens before column k never depend on later columns. One INFO line per batch goes to stderr:

  batch size=3 threads=4 prompt_tokens=96 new_tokens=72 seconds=1.234 padded_size=4
  prompt_width=32 max_new_tokens=16 stop_shape=2x4                    (one line)

size = requests in the batch, prompt_tokens = their prompt tokens (each prompt counted once),
new_tokens = completion tokens summed over every thread of every request; the last five fields
are the shape bucket, whose first batch compiles the sampler (prefill and decode; with
JAX_LOG_COMPILES=1, JAX logs each compilation).

Disconnects: a request whose client disconnects is cancelled: dropped if still queued; a
running batch returns to the host every DECODE_CHUNK columns and stops once all of its
clients are gone.

Prompts: every message's content is encoded as plain text (`Tokenizer.encode_chat`): a
`<|im_end|>` written by a client is text, not the token, so it cannot open a turn. A prompt is
tokenized off the event loop, after a cheap bound (more characters than --max-prompt-tokens
tokens can spell is refused untokenized).

Stopping: every thread stops on `<|im_end|>` (excluded from the content). `stop` strings are
passed to the sampler as token sequences (`tokenizer.encode(s)`; the thread then stops in the
lattice) and also cut from the decoded text at their first occurrence, as OpenAI does, which
catches a stop string the model spelled with other tokens (that thread went on generating
inside the lattice, but its content ends before the stop string).

Streaming (`stream: true`): the lattice sampler generates every column of every thread in one
jitted loop, so the server generates the whole answer first and then streams each thread's
text as Server-Sent Events, one piece per decoded token (pieces of the threads interleaved),
in the OpenAI `chat.completion.chunk` format, ending with `data: [DONE]`. Concatenating the
`delta.content` of one index gives exactly the non-streamed content. The last chunk before
`[DONE]` carries the `lace` field (and `usage` when `stream_options.include_usage` is true).

Seeds: with temperature > 0 a batch samples with the seed of its requests (a fresh random seed
when none was given); the draw depends on the batch's padded shape, so a seeded sampling
request repeats exactly only when it runs in a batch of the same shape (e.g. alone).
Temperature 0 (below sampling.GREEDY_EPSILON, e.g. 1e-300) is greedy and needs no seed.

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
from lace_jax.hf_io import load_pretrained
from lace_jax.model import Model, Params
from lace_jax.tokenizer import ENDOFTEXT, IM_END, Tokenizer, render_messages

log = logging.getLogger("lace_jax.serve")  # not __name__: that is "__main__" under `python -m`

MAX_STOP_STRINGS = 16
MIN_BUCKET = 16
DECODE_CHUNK = 32  # columns between checks that a running batch's clients are still there
MAX_COMPILED = 64  # distinct sampler shapes kept compiled (the cache is cleared past it)
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
  stop_tokens: tuple[tuple[int, ...], ...] = ()  # `stop` encoded (the sampler's sequences)

  @property
  def greedy(self) -> bool:
    return self.temperature < sampling.GREEDY_EPSILON

  @property
  def key(self) -> tuple:
    """Requests with equal keys can share one `sample` call: temperature, top_p, top_k and
    stop are per-example sampler inputs, so only n and the seed of a sampled request split."""
    return (self.n, None if self.greedy else self.seed)


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
  pieces: list[str] | None  # the text split at token boundaries (streamed requests only)


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


def text_pieces(tokenizer: Tokenizer, ids: Sequence[int], text: str) -> list[str]:
  """`text` (the decoding of `ids`, possibly cut short) split where the decoding of a token
  prefix ends; a prefix that ends inside a multi-byte character is skipped. The pieces
  concatenate to exactly `text`."""
  pieces, done = [], 0
  for k in range(1, len(ids) + 1):
    if done >= len(text):
      break
    prefix = tokenizer.decode(ids[:k])
    end = min(len(prefix), len(text))
    if end > done and prefix[:end] == text[:end]:
      pieces.append(text[done:end])
      done = end
  if done < len(text):
    pieces.append(text[done:])
  return pieces


def finish_thread(tokenizer: Tokenizer, tokens: np.ndarray, length: int, reason: str,
                  max_tokens: int, stop_ids: Sequence[int], stop: Sequence[str],
                  pieces: bool) -> ThreadResult:
  """One thread's sampler output -> its content, cut to `max_tokens` tokens, without the stop
  token, and before the first occurrence of any `stop` string."""
  ids = [int(t) for t in tokens[:length]]
  if len(ids) > max_tokens:
    ids, reason = ids[:max_tokens], "length"
  content = ids[:-1] if reason == "stop" and ids and ids[-1] in stop_ids else ids
  text = tokenizer.decode(content)
  hits = [i for i in (text.find(s) for s in stop) if i >= 0]
  if hits:
    text, reason = text[:min(hits)], "stop"
  return ThreadResult(text, reason, len(ids),
                      text_pieces(tokenizer, content, text) if pieces else None)


def lace_summary(texts: Sequence[str]) -> dict[str, Any]:
  parsed = grading.parse_lattice(list(texts))
  return {"best_index": parsed.best, "format_ok": parsed.format_ok,
          "format_error": parsed.format_error, "threads": len(texts)}


# ---------------------------------------------------------------------------------------------
# Batching


@dataclasses.dataclass
class Job:
  request: ChatRequest
  arrival: float  # time.monotonic()
  future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
  gone: threading.Event = dataclasses.field(default_factory=threading.Event)  # client left

  def cancel(self) -> None:
    """The client went away: a queued job is dropped; a running batch stops at its next
    decode chunk once every job in it is gone."""
    self.gone.set()
    self.future.cancel()


def _bucket(x: int, lo: int, hi: int) -> int:
  """The smallest power of two >= max(x, lo), capped at hi (x <= hi)."""
  return min(hi, max(lo, 1 << max(0, x - 1).bit_length()))


class Batcher:
  """A queue of jobs and the one thread that runs them, batched, through `sampling.sample`.

  `submit` may be called from any thread; each job's future resolves to a `Completion` or to
  the exception generation raised. `start` is idempotent; `stop` fails queued jobs and joins
  the thread (bounded by `timeout_s`)."""

  def __init__(self, model: Model, params: Params, tokenizer: Tokenizer, *, max_batch: int,
               batch_window_s: float, max_prompt_tokens: int, max_new_tokens: int,
               decode_chunk: int = DECODE_CHUNK, max_compiled: int = MAX_COMPILED):
    self.model, self.params, self.tokenizer = model, params, tokenizer
    self.max_batch, self.batch_window_s = max_batch, batch_window_s
    self.max_width = -(-max_prompt_tokens // MIN_BUCKET) * MIN_BUCKET
    self.max_new_tokens = max_new_tokens
    self.stop_ids = (tokenizer.im_end_id,)
    self.pad_id = tokenizer.pad_id
    self._pending: list[Job] = []
    self._cond = threading.Condition()
    self._stopping = False
    self._thread: threading.Thread | None = None
    self.batches_run = 0
    self.batches_cancelled = 0
    self.decode_chunk = decode_chunk
    self.max_compiled = max_compiled
    self._shapes: set[tuple] = set()  # the sampler shapes compiled since the last clear

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
      pending, self._pending = self._pending, []
      self._cond.notify_all()
    for job in pending:
      if job.future.set_running_or_notify_cancel():
        job.future.set_exception(RuntimeError("the server is shutting down"))
    if self._thread is not None:
      self._thread.join(timeout_s)

  def submit(self, request: ChatRequest) -> Job:
    """Queues `request`; its job's future resolves to the Completion."""
    self.start()
    job = Job(request, time.monotonic())
    with self._cond:
      self._pending.append(job)
      self._cond.notify_all()
    return job

  def _take_batch(self) -> list[Job] | None:
    """Blocks until a batch is ready; None once stopping."""
    with self._cond:
      while not self._pending:
        if self._stopping:
          return None
        self._cond.wait(0.5)
      if self._stopping:
        return None
      first = self._pending[0]
      deadline = first.arrival + self.batch_window_s
      while True:
        batch = [j for j in self._pending if j.request.key == first.request.key]
        batch = batch[:self.max_batch]
        remaining = deadline - time.monotonic()
        if len(batch) >= self.max_batch or remaining <= 0 or self._stopping:
          break
        self._cond.wait(remaining)
      taken = {id(j) for j in batch}
      self._pending = [j for j in self._pending if id(j) not in taken]
    # a job whose client went away (cancelled future) is dropped here
    return [j for j in batch if j.future.set_running_or_notify_cancel()]

  def _loop(self) -> None:
    while True:
      batch = self._take_batch()
      if batch is None:
        return
      if not batch:
        continue
      try:
        results = self.run_batch([j.request for j in batch],
                                 should_cancel=lambda: all(j.gone.is_set() for j in batch))
      except sampling.Cancelled as e:  # every client of the batch went away
        self.batches_cancelled += 1
        log.info("batch of %d requests cancelled: every client disconnected (%s)",
                 len(batch), e)
        for job in batch:
          job.future.set_exception(e)
        continue
      except Exception as e:  # answered as a 500; the thread keeps serving
        log.exception("generation failed for a batch of %d requests", len(batch))
        for job in batch:
          job.future.set_exception(e)
        continue
      for job, result in zip(batch, results):
        job.future.set_result(result)

  def run_batch(self, requests: Sequence[ChatRequest],
                should_cancel: Callable[[], bool] | None = None) -> list[Completion]:
    """One `sample` call for compatible requests (equal `key`); `should_cancel` is asked
    between decode chunks (`sampling.Cancelled` when it says True)."""
    first = requests[0]
    if any(r.key != first.key for r in requests):
      raise ValueError("run_batch: the requests of one batch must have equal keys")
    start = time.perf_counter()
    padded = _bucket(len(requests), 1, max(self.max_batch, len(requests)))
    rows = list(requests) + [first] * (padded - len(requests))  # dummy rows repeat the first
    prompts = [r.prompt_ids for r in rows]
    width = _bucket(max(len(p) for p in prompts), MIN_BUCKET, self.max_width)
    steps = _bucket(max(r.max_tokens for r in requests), MIN_BUCKET, self.max_new_tokens)
    seed = first.seed if first.seed is not None else random.SystemRandom().randrange(2**31)
    stops = [r.stop_tokens for r in rows]
    self._bound_compiled(first.n, padded, width, steps, stops)
    # sampling parameters and stop sequences are traced per-example arrays: any values share
    # the compiled sampler of this shape bucket
    out = sampling.sample(
        self.model, self.params, prompts, num_threads=first.n, max_new_tokens=steps,
        temperature=[r.temperature for r in rows], top_p=[r.top_p for r in rows],
        top_k=[r.top_k for r in rows], seed=seed, stop_ids=self.stop_ids, pad_id=self.pad_id,
        example_stop_sequences=stops, prompt_width=width,
        decode_chunk=self.decode_chunk if should_cancel is not None else 0,
        should_cancel=should_cancel)
    results = []
    for b, r in enumerate(requests):
      threads = [finish_thread(self.tokenizer, out.tokens[b, w], int(out.lengths[b, w]),
                               out.finish_reasons[b][w], r.max_tokens, self.stop_ids, r.stop,
                               pieces=r.stream)
                 for w in range(r.n)]
      results.append(Completion(threads, len(r.prompt_ids),
                                lace_summary([t.text for t in threads])))
    self.batches_run += 1
    log.info("batch size=%d threads=%d prompt_tokens=%d new_tokens=%d seconds=%.3f "
             "padded_size=%d prompt_width=%d max_new_tokens=%d stop_shape=%s",
             len(requests), first.n, sum(c.prompt_tokens for c in results),
             sum(c.completion_tokens for c in results), time.perf_counter() - start, padded,
             width, steps, "x".join(map(str, self._stop_shape(stops, steps))))
    return results

  @staticmethod
  def _stop_shape(stops: Sequence[Sequence[Sequence[int]]], steps: int) -> tuple[int, int]:
    """The (sequences, length) bucket of the sampler's stop array (`sampling._stop_array`)."""
    return sampling._stop_array((), stops, len(stops), steps).shape[1:]

  def _bound_compiled(self, n: int, padded: int, width: int, steps: int,
                      stops: Sequence[Sequence[Sequence[int]]]) -> None:
    """Every shape is a power-of-two bucket, so the compiled samplers are few; past
    `max_compiled` distinct shapes their cache is cleared (frees the compiled programs)."""
    shape = (n, padded, width, steps, self._stop_shape(stops, steps))
    if shape not in self._shapes and len(self._shapes) >= self.max_compiled:
      log.info("%d sampler shapes compiled: clearing the compilation cache", len(self._shapes))
      sampling._prefill.clear_cache()
      sampling._decode.clear_cache()
      self._shapes.clear()
    self._shapes.add(shape)


# ---------------------------------------------------------------------------------------------
# The app


def _completion_body(c: Completion, *, completion_id: str, created: int, model: str) -> dict:
  return {
      "id": completion_id, "object": "chat.completion", "created": created, "model": model,
      "choices": [{"index": i, "message": {"role": "assistant", "content": t.text},
                   "logprobs": None, "finish_reason": t.finish_reason}
                  for i, t in enumerate(c.threads)],
      "usage": c.usage(), "lace": c.lace}


def _sse_chunks(c: Completion, *, completion_id: str, created: int, model: str,
                include_usage: bool) -> list[str]:
  """Every `data: ...` event of one streamed completion, `[DONE]` last."""
  def chunk(index: int | None, delta: dict | None = None, finish: str | None = None,
            **extra) -> str:
    choices = [] if index is None else [
        {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]
    body = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
            "model": model, "choices": choices, **extra}
    return f"data: {json.dumps(body)}\n\n"

  events = [chunk(i, {"role": "assistant", "content": ""}) for i in range(len(c.threads))]
  longest = max(len(t.pieces or []) for t in c.threads)
  for k in range(longest):  # the threads' pieces interleaved, as they were generated
    for i, t in enumerate(c.threads):
      if k < len(t.pieces or []):
        events.append(chunk(i, {"content": t.pieces[k]}))
  last = len(c.threads) - 1
  for i, t in enumerate(c.threads):
    extra = {"lace": c.lace} if i == last and not include_usage else {}
    events.append(chunk(i, {}, t.finish_reason, **extra))
  if include_usage:
    events.append(chunk(None, usage=c.usage(), lace=c.lace))
  events.append("data: [DONE]\n\n")
  return events


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
                   batch_window_ms: float, max_body_bytes: int) -> Limits:
  """`create_app`'s arguments checked against each other, the model and the tokenizer ->
  the limits requests are resolved against. ValueError for a bad limit, KeyError naming a stop
  or pad token the tokenizer lacks."""
  for name, value in (("max_threads", max_threads), ("max_prompt_tokens", max_prompt_tokens),
                      ("max_new_tokens", max_new_tokens), ("max_batch", max_batch),
                      ("max_body_bytes", max_body_bytes)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}={value!r}; expected an integer >= 1")
  if not (isinstance(batch_window_ms, (int, float)) and 0 <= batch_window_ms < float("inf")):
    raise ValueError(f"batch_window_ms={batch_window_ms!r}; expected a number >= 0")
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


def _lifespan(batcher: Batcher) -> Callable[[fastapi.FastAPI],
                                            contextlib.AbstractAsyncContextManager[None]]:
  """The app's lifespan: the generation thread runs from startup to shutdown (joined off the
  event loop, which keeps answering while a batch finishes)."""

  @contextlib.asynccontextmanager
  async def lifespan(app: fastapi.FastAPI) -> AsyncIterator[None]:
    batcher.start()
    yield
    await asyncio.to_thread(batcher.stop)

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


def _add_model_routes(app: fastapi.FastAPI, model_name: str, created_at: int) -> None:
  """GET /health, /v1/models and /v1/models/{id}: the server's one model, `model_name`."""

  @app.get("/health")
  async def health() -> dict:
    return {"status": "ok"}

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


def _completion_response(completion: Completion, req: ChatRequest, model_name: str) -> Any:
  """A finished request's answer: the `chat.completion` body, or its Server-Sent Events when
  the request asked for a stream."""
  completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
  if not req.stream:
    return _completion_body(completion, completion_id=completion_id, created=created,
                            model=model_name)
  events = _sse_chunks(completion, completion_id=completion_id, created=created,
                       model=model_name, include_usage=req.include_usage)

  async def stream() -> AsyncIterator[str]:
    for event in events:
      yield event

  return StreamingResponse(stream(), media_type="text/event-stream",
                           headers={"Cache-Control": "no-cache"})


def _add_chat_route(app: fastapi.FastAPI, batcher: Batcher, tokenizer: Tokenizer,
                    limits: Limits) -> None:
  """POST /v1/chat/completions: the request is resolved off the event loop, queued on
  `batcher` and awaited; a client that disconnects first cancels its job (answered 499, which
  nobody reads), and a batch that failed is a 500."""

  @app.post("/v1/chat/completions")
  async def chat_completions(body: ChatCompletionRequest, request: fastapi.Request) -> Any:
    # tokenizing takes time for a long prompt: off the event loop, which keeps serving
    req = await asyncio.to_thread(resolve_request, body, tokenizer, limits)
    job = batcher.submit(req)
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
    return _completion_response(completion, req, limits.model_name)


def create_app(model: Model, params: Params, tokenizer: Tokenizer, *, model_name: str,
               max_threads: int = 8, max_prompt_tokens: int = 2048, max_new_tokens: int = 1024,
               max_batch: int = 8, batch_window_ms: float = 50.0,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> fastapi.FastAPI:
  """The FastAPI app serving `model` with `params` (module docstring: endpoints, batching,
  streaming).

  The generation thread starts with the app's lifespan (or on the first request) and stops at
  shutdown; `app.state.batcher` is the `Batcher`. Raises ValueError for a limit below 1, a
  prompt + completion budget beyond the model's max_position_embeddings, or a tokenizer that
  does not fit the model.
  """
  limits = _server_limits(model, tokenizer, model_name=model_name, max_threads=max_threads,
                          max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens,
                          max_batch=max_batch, batch_window_ms=batch_window_ms,
                          max_body_bytes=max_body_bytes)
  batcher = Batcher(model, params, tokenizer, max_batch=max_batch,
                    batch_window_s=batch_window_ms / 1e3,
                    max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens)
  created_at = int(time.time())
  app = fastapi.FastAPI(title="lace_jax", lifespan=_lifespan(batcher))
  app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
  app.state.batcher = batcher
  app.state.limits = limits
  _add_error_handlers(app)
  _add_model_routes(app, model_name, created_at)
  _add_chat_route(app, batcher, tokenizer, limits)
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
                              description="OpenAI-compatible chat server over the LACE sampler")
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
  p.add_argument("--max-batch", type=_positive, default=8, help="requests per sample call")
  p.add_argument("--batch-window-ms", type=_non_negative, default=50.0,
                 help="how long the oldest queued request waits for others to batch with")
  p.add_argument("--max-body-bytes", type=_positive, default=DEFAULT_MAX_BODY_BYTES,
                 help="largest request body; a larger one is refused with 413")
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
                     batch_window_ms=args.batch_window_ms,
                     max_body_bytes=args.max_body_bytes)
  except (ValueError, KeyError) as e:
    sys.exit(f"lace_jax.serve: {e}")
  log.info("serving %s as %r (lattice=%s) on http://%s:%d", ckpt, name,
           "none" if model.lattice is None else "checkpoint", args.host, args.port)
  uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
  main()
