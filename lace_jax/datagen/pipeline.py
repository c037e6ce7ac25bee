"""Synthetic multi-thread training data (spec section 7): `mode=datagen`.

For each source problem (with a gold answer):
  1. difficulty filter: k independent samples estimate the pass rate p; the problem is kept
     iff min_pass_rate < p <= max_pass_rate (default (0, 0.5]); p is recorded.
  2. solution-history rejection sampling: W threads are built one at a time; the generator is
     told the approaches already taken; a candidate whose similarity to an earlier thread
     exceeds `max_similarity` (token n-gram Jaccard, or embedding cosine with an in-process
     model) is rejected and re-drawn, up to `max_attempts` per thread. A problem whose budget
     runs out is dropped and counted as a shortfall: never a duplicate thread.
  3. compression: a thread over `max_trace_tokens` is rewritten by the generator below
     `target_tokens`; a rewrite that loses its verified answer, or is still too long, is
     discarded (and the thread re-drawn).
  4. tags, by the verifier (default): correct -> [[success]], the shortest correct thread ->
     [[best]], wrong -> [[fail]]; a problem with no correct thread is dropped. `tags="judge"`
     asks the generator instead and falls back to the verifier when its answer is unusable.
Output: append-only JSONL in the training schema (`lace_jax.data`), one record per kept
problem, flushed as written; problems already decided (kept or filtered) are skipped on
restart, so a killed run resumes without duplicates or losses. A report (kept / filtered per
reason, pass-rate histogram, thread dissimilarity, tokens used) goes to report.json.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import difflib
import itertools
import json
import os
import random
import re
import time
import zlib
from collections import Counter
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from lace_jax import grading, sharding
from lace_jax.errors import ConfigError
from lace_jax.engine import Engine, Request, as_sample_output
from lace_jax.sampling import bucket
from lace_jax.tokenizer import TAGS, chat_prompt
from lace_jax.training.setup import load_or_init, model_configs, resolve_tokenizer

SOLVE = ("Solve the following problem. Reason step by step, and put your final answer in "
         "\\boxed{{}}.\n\n{problem}")
HISTORY = ("\n\nOther solvers have already taken these approaches:\n{history}\nTake a logically "
           "different approach from all of them.")
COMPRESS = ("Rewrite the following solution more concisely, in at most {target} tokens. Keep "
            "every essential step and the same final answer in \\boxed{{}}.\n\n{trace}")
JUDGE = ("Here are {w} solutions to one problem (gold answer: {gold}). For each, answer with "
         "one tag: [[best]] for the single solution to submit, [[success]] for other correct "
         "solutions, [[fail]] for wrong ones. Reply with a JSON list of {w} tags only.\n\n"
         "Problem: {problem}\n\n{solutions}")


class BudgetExhausted(RuntimeError):
  """The generator's request budget is spent; datagen stops and keeps what it wrote."""


class GenerationFailed(RuntimeError):
  """A request failed for good (retries or the problem's deadline spent): the problem counts as
  failed (not decided: a rerun tries it again) and datagen goes on with the next one."""


class MalformedResponse(ValueError):
  """A 200 response that holds no completion (not JSON, no choices, null content)."""


# ----------------------------------------------------------------------------- generators


class Generator:
  """Independent completions of single-turn prompts. Implementations count `tokens_used`."""

  tokens_used: int = 0

  def complete(self, prompts: Sequence[str], *, max_tokens: int, temperature: float,
               seed: int) -> list[str]:
    raise NotImplementedError

  def count_tokens(self, text: str) -> int:
    return len(text.split())

  def embed(self, texts: Sequence[str]) -> np.ndarray:
    raise ValueError(f"{type(self).__name__} has no embeddings: use similarity='jaccard'")

  def set_deadline(self, deadline: float | None, budget_s: float = 0.0) -> None:
    """Requests from now on must finish by `deadline` (time.monotonic(); None: no deadline),
    the end of `budget_s` seconds for the current problem. Generators that cannot hang (the
    in-process sampler) ignore it."""


class InProcessGenerator(Generator):
  """This project's generation engine on a loaded model (each prompt one independent
  thread: an engine of W = 1, `batch_size` slots, refilled as completions finish; remade
  wider when a call needs longer prompts or completions)."""

  def __init__(self, model, params, tokenizer, *, batch_size: int = 8, top_p: float = 1.0,
               top_k: int = 0):
    self.model, self.params, self.tokenizer = model, params, tokenizer
    self.batch_size, self.top_p, self.top_k = batch_size, top_p, top_k
    self.tokens_used = 0
    self._engine = None

  def _engine_for(self, prompt_len: int, max_tokens: int) -> Engine:
    e = self._engine
    if e is None or e.max_prompt_len < prompt_len or e.max_new_tokens < max_tokens:
      self._engine = Engine(
          self.model, self.params, slots=self.batch_size, num_threads=1,
          max_prompt_len=max(prompt_len, e.max_prompt_len if e else 0),
          max_new_tokens=bucket(max(max_tokens, e.max_new_tokens if e else 0), 16),
          stop_ids=(self.tokenizer.im_end_id,), pad_id=self.tokenizer.pad_id)
    return self._engine

  def complete(self, prompts, *, max_tokens, temperature, seed):
    ids = [self.tokenizer.encode(chat_prompt(p)) for p in prompts]
    if not ids:
      return []
    engine = self._engine_for(max(map(len, ids)), max_tokens)
    results = engine.generate([
        Request(x, max_new_tokens=max_tokens, temperature=temperature, top_p=self.top_p,
                top_k=self.top_k, seed=seed + i) for i, x in enumerate(ids)])
    self.tokens_used += sum(int(r.lengths.sum()) for r in results) + sum(map(len, ids))
    out = as_sample_output(results, pad_id=self.tokenizer.pad_id)
    return [t[0] for t in out.texts(self.tokenizer)]

  def count_tokens(self, text):
    return len(self.tokenizer.encode(text))

  def embed(self, texts):
    """Mean-pooled final hidden states of the model over each text."""
    ids = [self.tokenizer.encode(t) or [self.tokenizer.pad_id] for t in texts]
    width = max(map(len, ids))
    tokens = np.full((len(ids), 1, width), self.tokenizer.pad_id, np.int32)
    valid = np.zeros(tokens.shape, bool)
    for i, x in enumerate(ids):
      tokens[i, 0, :len(x)], valid[i, 0, :len(x)] = x, True
    _, hidden = jax.jit(lambda p, t, v: self.model.apply(p, t, valid=v, return_hidden=True))(
        self.params, tokens, valid)
    h = jnp.sum(hidden * valid[..., None], axis=2) / jnp.maximum(valid.sum(2, keepdims=True), 1)
    return np.asarray(h[:, 0])


class HTTPGenerator(Generator):
  """Any OpenAI-compatible chat-completions endpoint (vLLM, SGLang, `python -m lace_jax.serve`,
  a hosted API): `concurrency` requests in flight, retries with exponential backoff on
  connection errors, 429, 5xx and malformed 200s (not JSON, no choices, null content), a
  per-request timeout, an optional deadline per problem (`set_deadline`, enforced across the
  retries), and a request budget. A request that fails for good raises `GenerationFailed`
  naming the endpoint."""

  def __init__(self, base_url: str, model: str, *, api_key: str = "", concurrency: int = 4,
               retries: int = 4, backoff_s: float = 0.5, timeout_s: float = 120.0,
               request_budget: int = 0, transport=None):
    import httpx
    self.url = base_url.rstrip("/") + "/chat/completions"
    self.model = model
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    self._client = httpx.Client(headers=headers, timeout=timeout_s, transport=transport)
    self.concurrency, self.retries, self.backoff_s = concurrency, retries, backoff_s
    self.timeout_s = timeout_s
    self.request_budget, self.requests = request_budget, 0
    self.tokens_used = 0
    self._deadline: float | None = None
    self._budget_s = 0.0

  def check_reachable(self, timeout_s: float = 10.0) -> None:
    """ConfigError if nothing answers at the endpoint's address (a server not started, a wrong
    host or port): one request to `<base>/models`; any HTTP answer, an error status included,
    means a server is there. Called once before the first problem, so that a missing server is
    one error line and not every problem failing after its retries."""
    import httpx
    base = self.url.removesuffix("/chat/completions")
    try:
      self._client.get(base + "/models", timeout=timeout_s)
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.UnsupportedProtocol) as e:
      raise ConfigError(
          f"datagen.endpoint={base}: nothing answers there ({type(e).__name__}: {e}); start "
          "the teacher's OpenAI-compatible server (vLLM, SGLang, `python -m lace_jax.serve`) "
          "or point --config.datagen.endpoint=URL at one") from None

  def set_deadline(self, deadline: float | None, budget_s: float = 0.0) -> None:
    self._deadline, self._budget_s = deadline, budget_s

  def _content(self, r) -> str:
    """The completion text of a 200 response; MalformedResponse if it holds none."""
    try:
      data = r.json()
    except ValueError:
      raise MalformedResponse(f"200 response that is not JSON (content-type "
                              f"{r.headers.get('content-type', '?')!r}): {r.text[:200]!r}") \
          from None
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices:
      raise MalformedResponse(f"200 response without choices: {r.text[:200]!r}")
    message = choices[0].get("message") if isinstance(choices[0], dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
      raise MalformedResponse(f"200 response whose choices[0].message.content is "
                              f"{type(content).__name__}, not a string: {r.text[:200]!r}")
    usage = data.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("total_tokens"), int):
      self.tokens_used += usage["total_tokens"]
    return content

  def _one(self, prompt: str, max_tokens: int, temperature: float, seed: int) -> str:
    import httpx
    body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "n": 1,
            "max_tokens": max_tokens, "temperature": temperature, "seed": seed}
    deadline = self._deadline
    last: Exception | None = None
    for attempt in range(self.retries + 1):
      left = None if deadline is None else deadline - time.monotonic()
      if left is not None and left <= 0:
        raise GenerationFailed(
            f"{self.url}: the problem's deadline of {self._budget_s:g}s "
            f"(datagen.problem_deadline_s) passed after {attempt} attempt(s)"
            + (f"; last error: {type(last).__name__}: {last}" if last else ""))
      if self.request_budget and self.requests >= self.request_budget:
        raise BudgetExhausted(f"request budget of {self.request_budget} requests spent")
      self.requests += 1
      try:
        timeout = self.timeout_s if left is None else min(self.timeout_s, left)
        r = self._client.post(self.url, json=body, timeout=timeout)
        if r.status_code == 429 or r.status_code >= 500:
          raise httpx.HTTPStatusError(f"{r.status_code}", request=r.request, response=r)
        if r.status_code >= 400:
          raise ValueError(f"{self.url} rejected the request ({r.status_code}): {r.text[:300]}")
        return self._content(r)
      except (httpx.TransportError, httpx.HTTPStatusError, MalformedResponse) as e:
        last = e
        if attempt == self.retries:
          raise GenerationFailed(f"{self.url}: failed after {attempt + 1} attempts: "
                                 f"{type(e).__name__}: {e}") from e
        pause = self.backoff_s * 2**attempt * (1 + random.random())
        if deadline is not None:
          pause = max(min(pause, deadline - time.monotonic()), 0.0)
        time.sleep(pause)
    raise AssertionError("unreachable")

  def complete(self, prompts, *, max_tokens, temperature, seed):
    with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
      futures = [pool.submit(self._one, p, max_tokens, temperature, seed + i)
                 for i, p in enumerate(prompts)]
      return [f.result() for f in futures]


# ----------------------------------------------------------------------------- similarity


def ngrams(text: str, n: int = 3) -> set[tuple[str, ...]]:
  toks = re.findall(r"\w+|[^\w\s]", text.lower())
  return {tuple(toks[i:i + n]) for i in range(max(len(toks) - n + 1, 1))} if toks else set()


def jaccard(a: str, b: str, n: int = 3) -> float:
  x, y = ngrams(a, n), ngrams(b, n)
  return len(x & y) / len(x | y) if x | y else 1.0


def cosine(u: np.ndarray, v: np.ndarray) -> float:
  return float(u @ v / max(np.linalg.norm(u) * np.linalg.norm(v), 1e-12))


def edit_distance(a: str, b: str) -> float:
  """Normalised character edit dissimilarity in [0, 1] (1 - difflib's matching ratio)."""
  return 1.0 - difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def strip_tags(text: str) -> str:
  for tag in TAGS:
    text = text.replace(tag, "")
  return text.rstrip()


# ----------------------------------------------------------------------------- the pipeline


@dataclasses.dataclass
class Settings:
  num_threads: int = 4
  samples_for_difficulty: int = 8
  min_pass_rate: float = 0.0
  max_pass_rate: float = 0.5
  similarity: str = "jaccard"  # jaccard | embedding
  max_similarity: float = 0.7
  max_attempts: int = 4
  max_tokens: int = 4096
  temperature: float = 1.0
  max_trace_tokens: int = 8000
  target_tokens: int = 3000
  tags: str = "verifier"  # verifier | judge
  keep_unsolved: bool = False  # smoke tests only: keep problems no thread solved, all [[fail]]
  problem_deadline_s: float = 0.0  # total time for one problem's requests, retries included;
  # 0 = none (each request is still bounded by the generator's timeout and retries)
  seed: int = 0


def _history_prompt(problem: str, threads: list[str], chars: int = 400) -> str:
  prompt = SOLVE.format(problem=problem)
  if threads:
    summary = "\n".join(f"{i + 1}. {t[:chars]}" for i, t in enumerate(threads))
    prompt += HISTORY.format(history=summary)
  return prompt


def verifier_tags(correct: Sequence[bool], lengths: Sequence[int]) -> list[str] | None:
  """[[best]] for the shortest correct thread, [[success]] other correct, [[fail]] wrong;
  None when no thread is correct."""
  if not any(correct):
    return None
  best = min((i for i, c in enumerate(correct) if c), key=lambda i: lengths[i])
  return ["[[best]]" if i == best else "[[success]]" if c else "[[fail]]"
          for i, c in enumerate(correct)]


def build_record(problem: grading.Problem, gen: Generator, grader, s: Settings,
                 stats: Counter) -> tuple[dict | None, str, dict]:
  """(record or None, outcome: "kept" or the reason it was filtered, info for the report)."""
  seed = s.seed + zlib.crc32(problem.id.encode()) % 1_000_003  # stable across processes
  info: dict = {}
  if s.samples_for_difficulty:
    outs = gen.complete([SOLVE.format(problem=problem.problem)] * s.samples_for_difficulty,
                        max_tokens=s.max_tokens, temperature=s.temperature, seed=seed)
    verdicts = grader.grade_many([(grading.extract_boxed(o), problem.answer) for o in outs])
    rate = float(np.mean(verdicts))
    info["pass_rate"] = rate
    if not s.min_pass_rate < rate <= s.max_pass_rate:
      return None, "too_easy" if rate > s.max_pass_rate else "too_hard", info
  threads: list[str] = []
  embeddings: list[np.ndarray] = []
  attempts = rejections = 0
  for w in range(s.num_threads):
    for attempt in itertools.count():
      if attempt >= s.max_attempts:
        stats["shortfall_threads"] += s.num_threads - len(threads)
        info.update(attempts=attempts, rejections=rejections, threads_built=len(threads))
        return None, "rejection_budget", info
      attempts += 1
      cand = gen.complete([_history_prompt(problem.problem, threads)], max_tokens=s.max_tokens,
                          temperature=s.temperature, seed=seed + 1000 * (w + 1) + attempt)[0]
      cand = strip_tags(cand)
      if gen.count_tokens(cand) > s.max_trace_tokens:
        cand = _compress(cand, problem, gen, grader, s, seed + 7 * attempt, stats)
        if cand is None:
          rejections += 1
          continue
      if s.similarity == "embedding":
        emb = gen.embed([cand])[0]
        sims = [cosine(emb, e) for e in embeddings]
      else:
        emb, sims = None, [jaccard(cand, t) for t in threads]
      if sims and max(sims) > s.max_similarity:
        rejections += 1
        stats["rejected_similar"] += 1
        continue
      threads.append(cand)
      if emb is not None:
        embeddings.append(emb)
      break
  answers = [grading.extract_boxed(t) for t in threads]
  correct = grader.grade_many([(a, problem.answer) for a in answers])
  tags = None
  if s.tags == "judge":
    tags = _judge(problem, threads, gen, s, seed)
    stats["judge_fallbacks"] += tags is None
  tags = tags or verifier_tags(correct, [len(t) for t in threads])
  if tags is None:
    if not s.keep_unsolved:
      return None, "no_correct_thread", info
    tags = ["[[fail]]"] * len(threads)
    stats["kept_unsolved"] += 1
  record = {"id": problem.id, "problem": problem.problem,
            "threads": [f"{t} {tag}" for t, tag in zip(threads, tags)], "answer": problem.answer,
            "tags": tags, "pass_rate": info.get("pass_rate"), "attempts": attempts,
            "rejections": rejections, "source": problem.source}
  info.update(attempts=attempts, rejections=rejections)
  return record, "kept", info


def _compress(trace: str, problem, gen: Generator, grader, s: Settings, seed: int,
              stats: Counter) -> str | None:
  stats["compressions"] += 1
  short = strip_tags(gen.complete([COMPRESS.format(target=s.target_tokens, trace=trace)],
                                  max_tokens=s.target_tokens, temperature=0.0, seed=seed)[0])
  before, after = grading.extract_boxed(trace), grading.extract_boxed(short)
  same, after_ok, before_ok = grader.grade_many(
      [(after, before or ""), (after, problem.answer), (before, problem.answer)])
  keeps_answer = after is not None and same and after_ok == before_ok
  if not keeps_answer or gen.count_tokens(short) > s.target_tokens:
    stats["compressions_discarded"] += 1
    return None
  return short


def _judge(problem, threads, gen: Generator, s: Settings, seed: int) -> list[str] | None:
  sols = "\n\n".join(f"Solution {i + 1}:\n{t}" for i, t in enumerate(threads))
  reply = gen.complete([JUDGE.format(w=len(threads), gold=problem.answer,
                                     problem=problem.problem, solutions=sols)],
                       max_tokens=256, temperature=0.0, seed=seed)[0]
  try:
    tags = json.loads(reply[reply.index("["):reply.rindex("]") + 1])
  except (ValueError, json.JSONDecodeError):
    return None
  if (not isinstance(tags, list) or len(tags) != len(threads) or any(t not in TAGS for t in tags)
      or tags.count("[[best]]") != 1):
    return None
  return tags


def _finished(path: str) -> set[str]:
  """Ids already decided in an append-only JSONL file; a torn last line (killed mid-write) is
  cut off so the file stays valid."""
  if not os.path.exists(path):
    return set()
  ids, good = set(), 0
  with open(path, "rb") as f:
    data = f.read()
  for line in data.split(b"\n"):
    if not line.strip():
      good += len(line) + 1
      continue
    try:
      ids.add(json.loads(line)["id"])
    except (json.JSONDecodeError, KeyError):
      break
    good += len(line) + 1
  if good < len(data):
    with open(path, "r+b") as f:
      f.truncate(min(good, len(data)))
  return ids


def report(output: str, decisions: str, stats: Counter, tokens_used: int, *,
           failures: Sequence[str] = ()) -> dict:
  records = [json.loads(l) for l in open(output)] if os.path.exists(output) else []
  decided = [json.loads(l) for l in open(decisions)] if os.path.exists(decisions) else []
  outcomes = Counter(d["outcome"] for d in decided)
  rates = [d["pass_rate"] for d in decided if d.get("pass_rate") is not None]
  hist, edges = np.histogram(rates, bins=10, range=(0, 1)) if rates else (np.zeros(10), None)
  pairs = [(a, b) for r in records for a, b in itertools.combinations(
      [strip_tags(t) for t in r["threads"]], 2)]
  return {
      "kept": len(records), "outcomes": dict(outcomes),
      "pass_rate_histogram": {f"{i / 10:.1f}-{(i + 1) / 10:.1f}": int(n)
                              for i, n in enumerate(hist)},
      "mean_pairwise_edit_distance": float(np.mean([edit_distance(a, b) for a, b in pairs]))
      if pairs else None,
      "mean_pairwise_ngram_dissimilarity": float(np.mean([1 - jaccard(a, b) for a, b in pairs]))
      if pairs else None,
      "rejected_similar": int(stats["rejected_similar"]),
      "shortfall_threads": int(stats["shortfall_threads"]),
      "compressions": int(stats["compressions"]),
      "compressions_discarded": int(stats["compressions_discarded"]),
      "kept_unsolved": int(stats["kept_unsolved"]),
      # problems whose requests failed for good in this run (not decided: a rerun retries them)
      "generation_failed": int(stats["generation_failed"]),
      "first_generation_failure": failures[0] if failures else None,
      "tokens_used": int(tokens_used),
  }


def generate(problems: Sequence[grading.Problem], gen: Generator, grader, s: Settings, *,
             output: str, progress: bool = True,
             on_record: Callable[[dict], None] | None = None) -> dict:
  """Runs the pipeline over `problems`, appending to `output` (and its decisions log); skips
  problems decided by an earlier run. Returns the report."""
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  decisions = output + ".decisions.jsonl"
  done = _finished(decisions)
  kept_ids = _finished(output)
  todo = [p for p in problems if p.id not in done]
  stats: Counter = Counter()
  failures: list[str] = []
  deadline = (f"deadline {s.problem_deadline_s:g}s/problem" if s.problem_deadline_s > 0
              else "no deadline per problem")
  bar = tqdm(total=len(problems), initial=len(problems) - len(todo),
             desc=f"datagen ({deadline})", disable=not progress, dynamic_ncols=True)
  try:
    with open(output, "a") as out, open(decisions, "a") as log:
      for p in todo:
        if s.problem_deadline_s > 0:
          gen.set_deadline(time.monotonic() + s.problem_deadline_s, s.problem_deadline_s)
        try:
          record, outcome, info = build_record(p, gen, grader, s, stats)
        except GenerationFailed as e:
          # not logged as decided: a rerun tries the problem again
          stats["generation_failed"] += 1
          failures.append(f"problem {p.id}: {e}")
          tqdm.write(f"datagen: problem {p.id} failed: {e}")
          bar.update(1)
          bar.set_postfix(kept=stats["kept"], failed=stats["generation_failed"],
                          tokens=gen.tokens_used)
          continue
        finally:
          gen.set_deadline(None)
        if record is not None and p.id not in kept_ids:
          out.write(json.dumps(record) + "\n")
          out.flush()
          os.fsync(out.fileno())
          if on_record:
            on_record(record)
        # the decision is logged after the record: a kill in between redoes the problem, and
        # the kept-id check above keeps the record single
        log.write(json.dumps({"id": p.id, "outcome": outcome, **info}) + "\n")
        log.flush()
        os.fsync(log.fileno())
        stats[outcome] += 1
        bar.update(1)
        bar.set_postfix(kept=stats["kept"], failed=stats["generation_failed"],
                        tokens=gen.tokens_used)
  except BudgetExhausted as e:
    print(f"datagen: {e}; stopping with what is written (rerun with a larger budget to go on)")
  finally:
    bar.close()
  return report(output, decisions, stats, gen.tokens_used, failures=failures) | {
      "stats": dict(stats), "failures": failures}


def merge_processes(workdir: str, problems: Sequence[grading.Problem], mine: dict) -> dict:
  """After every process ran `generate` on its share (its report `mine`, its files in
  WORKDIR/process_<i>/): process 0 writes WORKDIR/threads.jsonl and its decisions log, every
  record once in the order of `problems`, and the report of the whole run (returned on every
  process). Every process calls it; it waits for the slowest."""
  share = jax.process_index()
  every = sharding.gather_blocks([{k: mine[k] for k in ("stats", "failures")}], share)
  stats: Counter = Counter()
  for part in every:
    stats.update(part["stats"])
  failures = [f for part in every for f in part["failures"]]
  tokens = sum(int(part["stats"].get("tokens_used", 0)) for part in every)
  output = os.path.join(workdir, "threads.jsonl")
  decisions = output + ".decisions.jsonl"
  if jax.process_index() == 0:
    order = {p.id: i for i, p in enumerate(problems)}
    for name, path in (("threads.jsonl", output),
                       ("threads.jsonl.decisions.jsonl", decisions)):
      rows = []
      for i in range(jax.process_count()):
        part = os.path.join(workdir, f"process_{i}", name)
        if os.path.exists(part):
          rows += [json.loads(x) for x in open(part) if x.strip()]
      rows.sort(key=lambda r: order.get(r["id"], len(order)))
      with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
      os.replace(path + ".tmp", path)
  multihost_utils.sync_global_devices("datagen: merged")  # the files exist for every process
  return report(output, decisions, stats, tokens, failures=failures)


def run(cfg, workdir: str | None) -> dict:
  """The `datagen` mode."""
  if not workdir:
    raise ValueError("mode 'datagen' needs --workdir (the output and its report go there)")
  g = cfg.datagen
  problems = grading.read_problems(g.source)
  if any(not isinstance(p.problem, str) for p in problems):  # the prompts hold one problem
    raise ValueError(f"datagen.source={g.source}: per-thread (list) problems are not supported")
  if g.limit:
    problems = problems[:g.limit]
  if g.generator == "http":
    gen: Generator = HTTPGenerator(g.endpoint, g.endpoint_model,
                                   api_key=os.environ.get(g.api_key_env, "") if g.api_key_env
                                   else "", concurrency=g.concurrency, retries=g.retries,
                                   timeout_s=g.timeout_s, request_budget=g.request_budget)
    gen.check_reachable()
  elif g.generator == "in_process":
    model_cfg, lattice = model_configs(cfg)
    tokenizer, _ = resolve_tokenizer(cfg)
    model, params = load_or_init(cfg, model_cfg, lattice)
    gen = InProcessGenerator(model, params, tokenizer, batch_size=g.batch_size)
  else:
    raise ValueError(f"datagen.generator={g.generator!r}; expected 'in_process' or 'http'")
  settings = Settings(
      num_threads=g.num_threads, samples_for_difficulty=g.samples_for_difficulty,
      min_pass_rate=g.min_pass_rate, max_pass_rate=g.max_pass_rate, similarity=g.similarity,
      max_similarity=g.max_similarity, max_attempts=g.max_attempts, max_tokens=g.max_tokens,
      temperature=g.temperature, max_trace_tokens=g.max_trace_tokens,
      target_tokens=g.target_tokens, tags=g.tags, keep_unsolved=g.keep_unsolved,
      problem_deadline_s=g.problem_deadline_s, seed=cfg.seed)
  output = os.path.join(workdir, "threads.jsonl")
  everything = problems
  if jax.process_count() > 1:  # every process its share (each n-th problem), on its own devices
    problems = problems[jax.process_index()::jax.process_count()]
    output = os.path.join(workdir, f"process_{jax.process_index()}", "threads.jsonl")
    print(f"datagen: process {jax.process_index()} of {jax.process_count()}: {len(problems)} of "
          f"{len(everything)} problems -> {output}", flush=True)
  if g.generator == "http":
    limit = (f"a deadline of {g.problem_deadline_s:g}s per problem" if g.problem_deadline_s > 0
             else "no deadline per problem")
    print(f"datagen: {len(problems)} problems via {gen.url}; each request {g.timeout_s:g}s x "
          f"{g.retries + 1} attempts at most, {limit} (datagen.problem_deadline_s)", flush=True)
  with grading.Grader(num_workers=g.grader_workers, timeout_s=g.grader_timeout_s) as grader:
    rep = generate(problems, gen, grader, settings, output=output,
                   progress=jax.process_index() == 0)
  rep["stats"]["tokens_used"] = int(gen.tokens_used)
  if jax.process_count() > 1:
    rep = merge_processes(workdir, everything, rep)
    output = os.path.join(workdir, "threads.jsonl")
  else:
    rep = {k: v for k, v in rep.items() if k not in ("stats", "failures")}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "report.json"), "w") as f:
      json.dump(rep, f, indent=2)
    print(json.dumps(rep, indent=2), flush=True)
    print(f"wrote {rep['kept']} records to {output}")
  return rep
