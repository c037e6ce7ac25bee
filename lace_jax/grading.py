"""Grading: answer extraction from thread texts, lattice format accounting, answer equivalence
(math-verify behind a process pool with wall-clock timeouts), maj@k / pass@k, and the bundled
benchmark readers.

A LACE thread ends with its answer in `\\boxed{...}` followed by one self-assessment tag
(`lace_jax.tokenizer.TAGS`); the lattice's answer is the boxed answer of the one thread tagged
`[[best]]` (`parse_lattice`).

Equivalence (`is_equivalent`) runs sympy through math-verify, which can hang on adversarial
input (`10^{10^{10}}` never finishes). `is_equivalent` itself has NO timeout (math-verify's
SIGALRM timeouts are disabled so that it can run on any thread); grade untrusted model output
through `Grader`, whose worker processes are killed and replaced when a call overruns.

Worker processes are started with the 'spawn' context (never fork: the parent runs JAX
threads) and execute this file by path (`runpy.run_path`), so they import neither jax nor the
`lace_jax` package; multiprocessing still imports the parent's `__main__` module in them (the
usual spawn rule: guard scripts with `if __name__ == "__main__":`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import re
import runpy
import signal
import threading
import time
from collections.abc import Callable, Sequence

# Run name of this file inside a Grader worker process (see `Grader`). The worker needs only
# `is_equivalent`, so it skips the package import (which would import jax).
_WORKER_RUN_NAME = "__lace_grading_worker__"
if __name__ != _WORKER_RUN_NAME:
  from lace_jax.tokenizer import TAGS

log = logging.getLogger(__name__)

BEST = "[[best]]"

# ---------------------------------------------------------------------------------------------
# Extraction


_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def _braced(text: str, start: int) -> str | None:
  """The content of the brace group opening at text[start] == "{", or None if it never closes.
  Escaped characters (`\\{`, `\\}`, `\\\\`) do not count as braces."""
  depth, i = 0, start
  while i < len(text):
    ch = text[i]
    if ch == "\\":
      i += 2
      continue
    if ch == "{":
      depth += 1
    elif ch == "}":
      depth -= 1
      if depth == 0:
        return text[start + 1:i]
    i += 1
  return None


def extract_boxed(text: str) -> str | None:
  """The content of the LAST `\\boxed{...}` (or `\\fbox{...}`) in `text`, stripped.

  Nested braces are matched (`\\boxed{\\frac{1}{2}}` -> `\\frac{1}{2}`); escaped braces inside
  (`\\boxed{\\{1,2\\}}`) do not count. Returns None when there is no box, when the last box is
  unbalanced (e.g. a truncated generation), not followed by `{`, or empty: `\\boxed{}` is the
  instruction's placeholder, not an answer. Earlier boxes never stand in for a bad last one.
  """
  if not isinstance(text, str):
    raise TypeError(f"extract_boxed expects a str, got {type(text).__name__}")
  matches = list(_BOX_RE.finditer(text))
  if not matches:
    return None
  i = matches[-1].end()
  while i < len(text) and text[i].isspace():
    i += 1
  if i >= len(text) or text[i] != "{":
    return None
  content = _braced(text, i)
  if content is None or not content.strip():
    return None
  return content.strip()


def extract_tag(text: str) -> str | None:
  """The self-assessment tag of a thread: whichever of `TAGS` occurs LAST in `text` (the tag
  ends a thread; earlier mentions, e.g. while discussing the format, do not count). None if the
  text has no tag."""
  if not isinstance(text, str):
    raise TypeError(f"extract_tag expects a str, got {type(text).__name__}")
  pos, tag = max((text.rfind(t), t) for t in TAGS)
  return tag if pos >= 0 else None


@dataclasses.dataclass
class LatticeAnswer:
  """What one lattice (W threads) answered, and whether it kept the output format.

  answers[i], tags[i]: thread i's boxed answer and tag (None when absent).
  best: index of the unique `[[best]]` thread, set only when that thread has a boxed answer.
  answer: answers[best], the system's answer (None on any format failure).
  format_ok: exactly one thread is tagged `[[best]]` and it has a boxed answer.
  format_error: why not (None when format_ok).
  """

  answers: list[str | None]
  tags: list[str | None]
  best: int | None
  answer: str | None
  format_ok: bool
  format_error: str | None


def parse_lattice(thread_texts: Sequence[str]) -> LatticeAnswer:
  """Extracts every thread's boxed answer and tag and picks the system answer.

  Format failures (format_ok False, answer None): no `[[best]]` thread, more than one, or a
  `[[best]]` thread without a `\\boxed{}` answer. Raises ValueError for an empty sequence and
  TypeError for a thread that is not a str.
  """
  if isinstance(thread_texts, str):
    raise TypeError("parse_lattice expects a sequence of thread texts, got one str")
  if len(thread_texts) == 0:
    raise ValueError("parse_lattice: no threads (expected W >= 1 thread texts)")
  for i, t in enumerate(thread_texts):
    if not isinstance(t, str):
      raise TypeError(f"parse_lattice: thread {i} is a {type(t).__name__}, expected str")
  answers = [extract_boxed(t) for t in thread_texts]
  tags = [extract_tag(t) for t in thread_texts]
  best_idx = [i for i, t in enumerate(tags) if t == BEST]
  error = None
  if not best_idx:
    error = f"no {BEST} thread"
  elif len(best_idx) > 1:
    error = f"{len(best_idx)} threads tagged {BEST} (threads {best_idx})"
  elif answers[best_idx[0]] is None:
    error = f"{BEST} thread {best_idx[0]} has no \\boxed{{}} answer"
  if error is not None:
    return LatticeAnswer(answers, tags, None, None, False, error)
  best = best_idx[0]
  return LatticeAnswer(answers, tags, best, answers[best], True, None)


# ---------------------------------------------------------------------------------------------
# Aggregation


def majority_vote(answers: Sequence[str | None],
                  equal: Callable[[str, str], bool] | None = None) -> str | None:
  """The most common non-None answer; None when there is none.

  Without `equal`, answers are compared as exact strings. With `equal` (e.g.
  `Grader.grade` or `is_equivalent` for maj@W under symbolic equivalence), each answer joins
  the first earlier cluster whose representative (its first member) it equals, called as
  `equal(answer, representative)`, else starts a new cluster. The winner is the representative
  of the largest cluster; ties go to the cluster that appeared first.
  """
  reps: list[str] = []
  counts: list[int] = []
  index: dict[str, int] = {}
  for a in answers:
    if a is None:
      continue
    if not isinstance(a, str):
      raise TypeError(f"majority_vote: answer {a!r} is a {type(a).__name__}, expected str | None")
    k = index.get(a)
    if k is None and equal is not None:
      k = next((j for j, r in enumerate(reps) if equal(a, r)), None)
    if k is None:
      k = len(reps)
      reps.append(a)
      counts.append(0)
    index[a] = k
    counts[k] += 1
  if not reps:
    return None
  return reps[max(range(len(reps)), key=lambda j: (counts[j], -j))]


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k estimate from n samples of which c are correct (Chen et al. 2021):
  1 - C(n-c, k) / C(n, k).

  Computed in exact integer arithmetic, (C(n,k) - C(n-c,k)) / C(n,k), with one correctly
  rounded division at the end: no cancellation, no overflow (pass_at_k(10, 3, 1) == 0.3
  exactly). Requires 0 <= c <= n and 1 <= k <= n.
  """
  for name, v in (("n", n), ("c", c), ("k", k)):
    if isinstance(v, bool) or not isinstance(v, int):
      raise TypeError(f"pass_at_k: {name}={v!r} must be an int")
  if not 0 <= c <= n:
    raise ValueError(f"pass_at_k: c={c} correct samples; expected 0 <= c <= n={n}")
  if not 1 <= k <= n:
    raise ValueError(f"pass_at_k: k={k}; expected 1 <= k <= n={n}")
  if n - c < k:
    return 1.0
  total = math.comb(n, k)
  return (total - math.comb(n - c, k)) / total


# ---------------------------------------------------------------------------------------------
# Equivalence


# `\\` (a matrix row break) is matched first so that its second backslash is never read as
# the start of a spacing command such as `\ `.
_SPACING_RE = re.compile(r"(\\\\)|\\(?:left|right|displaystyle)(?![A-Za-z])|\\[,!;: ]|\s+")
_SCI_RE = re.compile(r"([+-]?\d+(?:\.\d+)?)[eE]([+-]?\d+)")
_DOLLAR_RE = re.compile(r"(?<!\\)\$")


def _normalise(s: str) -> str:
  """A cheap canonical string: no math-mode spacing, `\\left`/`\\right`, `\\dfrac`/`\\tfrac`,
  unescaped `$` or trailing period. Equal results are equal answers (the fast path)."""
  s = _DOLLAR_RE.sub("", s)
  s = _SPACING_RE.sub(lambda m: m.group(1) or "", s)
  s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
  return s.rstrip(".")


def _prepare(s: str) -> str:
  """Rewrites for what math-verify does not parse: unescaped `$` (the model's own math-mode
  delimiters) and a trailing period are dropped, and a bare scientific-notation number
  `1.5e3` becomes `1.5\\times10^{3}` (math-verify reads `e` as Euler's number)."""
  s = _DOLLAR_RE.sub("", s).strip().rstrip(".").rstrip()
  m = _SCI_RE.fullmatch(s)
  if m:
    s = f"{m.group(1)}\\times10^{{{m.group(2)}}}"
  return s


_MV = None


def _math_verify():
  """(parse, verify, extraction configs), imported on first use (sympy takes ~0.4 s) with
  math-verify's "Timeout is disabled" warning silenced: disabling it is deliberate here."""
  global _MV
  if _MV is None:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    def drop_timeout_note(record: logging.LogRecord) -> bool:
      return not record.getMessage().startswith("Timeout is disabled")

    for name in ("math_verify.parser", "math_verify.grader"):
      logging.getLogger(name).addFilter(drop_timeout_note)
    _MV = (parse, verify, [LatexExtractionConfig(), ExprExtractionConfig()])
  return _MV


def _parse(s: str) -> list:
  """math-verify's parse of a bare answer string. The answer is wrapped in `$...$` (math-verify
  extracts LaTeX only from math environments, so `\\frac12`, `(1,2]`, `\\{1,2\\}`, `\\$18` fail
  bare); if that yields nothing, in `\\boxed{}`, then as is."""
  parse, _, config = _math_verify()
  for text in (f"${s}$", f"\\boxed{{{s}}}", s):
    parsed = parse(text, extraction_config=config, parsing_timeout=None)
    if parsed:
      return parsed
  return []


def is_equivalent(pred: str, gold: str) -> bool:
  """Whether the predicted answer `pred` equals the `gold` answer, both bare answer strings
  (e.g. boxed contents), in-process.

  Fast path: equal normalised strings (`_normalise`). Otherwise both are parsed by math-verify
  (LaTeX and plain-expression extraction) and compared with `verify(gold, pred)`: numeric
  equality to 6 decimals, symbolic equality, sets, intervals, tuples, matrices, equations.
  Semantics inherited from math-verify: `\\text{}` units are dropped (`5\\text{ cm}` == 5 ==
  `5\\text{ m}`), `^\\circ` is dropped, `x\\%` equals both x and x/100, and a bare comma list
  `1,2` is a set. Any parsing or comparison error gives False. NO timeout: math-verify's
  SIGALRM timeouts are disabled (so this is safe on any thread); use `Grader` for untrusted
  input.
  """
  if not isinstance(pred, str) or not isinstance(gold, str):
    raise TypeError(f"is_equivalent expects two str, got pred {type(pred).__name__}, "
                    f"gold {type(gold).__name__}")
  p, g = _normalise(pred), _normalise(gold)
  if not p or not g:
    return False
  if p == g:
    return True
  _, verify, _ = _math_verify()
  try:
    gold_parsed = _parse(_prepare(gold))
    pred_parsed = _parse(_prepare(pred))
    if not gold_parsed or not pred_parsed:
      return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))
  except Exception:  # math-verify catches its own errors; this is the backstop
    log.debug("is_equivalent(%r, %r) raised", pred, gold, exc_info=True)
    return False


# ---------------------------------------------------------------------------------------------
# Grader: is_equivalent in a pool of worker processes with a wall-clock timeout per call


def _worker_main(conn, test_hooks: bool) -> None:
  """A Grader worker's loop (on the worker's main thread): warm up, say ("ready", pid), then
  answer each (task_id, pred, gold) with (task_id, bool) until it receives None or EOF.

  Test hook (only with test_hooks): pred `__lace_sleep__:N` sleeps N seconds, then answers
  False; `__lace_crash__` exits the process at once (a crash in the middle of a task).
  """
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
  is_equivalent("1/2", "0.5")  # imports sympy / math-verify before declaring ready
  conn.send(("ready", os.getpid()))
  while True:
    try:
      msg = conn.recv()
    except (EOFError, OSError):
      return
    if msg is None:
      return
    task_id, pred, gold = msg
    if test_hooks and pred.startswith("__lace_sleep__:"):
      time.sleep(float(pred.split(":", 1)[1]))
      result = False
    elif test_hooks and pred == "__lace_crash__":
      os._exit(3)
    else:
      try:
        result = is_equivalent(pred, gold)
      except Exception:
        result = False
    conn.send((task_id, result))


class _Worker:
  """One worker process and the parent's end of its pipe."""

  def __init__(self, ctx, test_hooks: bool, startup_timeout_s: float):
    parent_conn, child_conn = ctx.Pipe(duplex=True)
    self.proc = ctx.Process(
        target=runpy.run_path, args=(os.path.abspath(__file__),),
        kwargs={"init_globals": {"_WORKER_ARGS": (child_conn, test_hooks)},
                "run_name": _WORKER_RUN_NAME},
        name="lace-grader", daemon=True)
    self.proc.start()
    child_conn.close()  # the child's copy keeps it open; ours would hide EOF on a crash
    self.conn = parent_conn
    self.ready = False
    self.boot_deadline = time.monotonic() + startup_timeout_s
    self.task: int | None = None
    self.deadline = math.inf
    self.done = 0

  def stop(self) -> None:
    """Kills the process (idle or stuck alike: it holds no state worth a graceful exit)."""
    if self.proc.is_alive():
      self.proc.kill()
    self.proc.join(5.0)
    self.conn.close()


class Grader:
  """`is_equivalent` in `num_workers` worker processes, with a wall-clock timeout per call.

  grade(pred, gold) -> bool; grade_many([(pred, gold), ...]) -> [bool] runs the pairs
  concurrently across workers (a None pred is False without a worker call). A call that runs
  longer than `timeout_s` (measured from when a ready worker receives it) is False: its worker
  is killed and replaced while the other workers keep going. A worker that dies mid-call gives
  False and is replaced too; each worker is also replaced after `max_tasks_per_worker` calls
  (bounding math-verify's caches). `stats` counts calls (pairs sent to a worker), timeouts,
  crashes, restarts (replacement workers started, for any of the three reasons) and recycles.

  Workers are 'spawn'ed (safe with JAX threads in the parent) and run this file standalone
  (no jax import); each takes ~0.5 s to start, in the background. Calls from several threads
  are serialised (close() waits for a running batch). Use as a context manager or call
  close(). A worker that dies before it is ready (e.g. math-verify missing) raises
  RuntimeError; so does one not ready within `startup_timeout_s`. `_test_hooks` (tests only)
  enables the worker's `__lace_sleep__:N` / `__lace_crash__` predictions (`_worker_main`).
  """

  def __init__(self, num_workers: int = 2, timeout_s: float = 5.0,
               max_tasks_per_worker: int = 500, *, startup_timeout_s: float = 120.0,
               _test_hooks: bool = False):
    if not isinstance(num_workers, int) or num_workers < 1:
      raise ValueError(f"Grader: num_workers={num_workers!r}; expected an int >= 1")
    if not timeout_s > 0:
      raise ValueError(f"Grader: timeout_s={timeout_s!r}; expected > 0 seconds")
    if not isinstance(max_tasks_per_worker, int) or max_tasks_per_worker < 1:
      raise ValueError(f"Grader: max_tasks_per_worker={max_tasks_per_worker!r}; expected an "
                       f"int >= 1")
    self.num_workers = num_workers
    self.timeout_s = float(timeout_s)
    self.max_tasks_per_worker = max_tasks_per_worker
    self.startup_timeout_s = float(startup_timeout_s)
    self._test_hooks = _test_hooks
    self._ctx = multiprocessing.get_context("spawn")
    self._lock = threading.RLock()  # close() takes it too, also from inside grade_many
    self.stats = {"calls": 0, "timeouts": 0, "crashes": 0, "restarts": 0, "recycles": 0}
    self._workers: list[_Worker] = []
    self._closed = False
    try:
      for _ in range(num_workers):
        self._workers.append(self._start())
    except BaseException:
      self.close()
      raise

  def _start(self) -> _Worker:
    return _Worker(self._ctx, self._test_hooks, self.startup_timeout_s)

  def _replace(self, w: _Worker) -> None:
    w.stop()
    self._workers[self._workers.index(w)] = self._start()
    self.stats["restarts"] += 1

  def worker_pids(self) -> list[int | None]:
    """Process ids of the current workers (diagnostics and tests)."""
    return [w.proc.pid for w in self._workers]

  def grade(self, pred: str | None, gold: str) -> bool:
    """Whether pred equals gold (`is_equivalent`), False on a None pred, timeout or crash."""
    return self.grade_many([(pred, gold)])[0]

  def grade_many(self, pairs: Sequence[tuple[str | None, str]]) -> list[bool]:
    """`grade` for every (pred, gold) pair, run concurrently across the workers; results in
    the order of `pairs`."""
    pairs = list(pairs)
    for i, pair in enumerate(pairs):
      if (not isinstance(pair, tuple) or len(pair) != 2 or not isinstance(pair[1], str)
          or not (pair[0] is None or isinstance(pair[0], str))):
        raise TypeError(f"grade_many: pairs[{i}]={pair!r:.200}; expected (str | None, str)")
    with self._lock:
      if self._closed:
        raise RuntimeError("Grader is closed")
      results = [False] * len(pairs)
      queue = collections.deque(i for i, (p, _) in enumerate(pairs) if p is not None)
      try:
        while queue or any(w.task is not None for w in self._workers):
          self._dispatch(queue, pairs)
          self._wait(results)
          self._expire(results)
      except BaseException:  # e.g. KeyboardInterrupt: no call of this batch may outlive it
        for w in list(self._workers):
          if w.task is not None:
            self._replace(w)
        raise
      return results

  def _dispatch(self, queue: collections.deque, pairs: list) -> None:
    for w in list(self._workers):
      if not queue:
        return
      if w.ready and w.task is None:
        if not w.proc.is_alive():  # died while idle (e.g. killed from outside)
          self.stats["crashes"] += 1
          self._replace(w)
          continue
        i = queue.popleft()
        try:
          w.conn.send((i, *pairs[i]))
        except OSError:  # died while idle: the call never ran, so it goes back in the queue
          queue.appendleft(i)
          self.stats["crashes"] += 1
          self._replace(w)
          continue
        w.task, w.deadline = i, time.monotonic() + self.timeout_s
        self.stats["calls"] += 1

  def _wait(self, results: list[bool]) -> None:
    now = time.monotonic()
    deadlines = [w.deadline if w.ready else w.boot_deadline for w in self._workers
                 if w.task is not None or not w.ready]
    timeout = max(0.0, min(deadlines) - now) if deadlines else None
    handles = {}
    for w in self._workers:
      handles[w.conn] = w
      handles[w.proc.sentinel] = w
    ready = multiprocessing.connection.wait(list(handles), timeout)
    for w in {id(handles[h]): handles[h] for h in ready}.values():
      self._service(w, results)

  def _service(self, w: _Worker, results: list[bool]) -> None:
    """Reads what worker w sent; replaces it if it died or is due for recycling."""
    dead = False
    try:
      while w.conn.poll():
        msg = w.conn.recv()
        if msg[0] == "ready":
          w.ready = True
        else:
          task_id, ok = msg
          if task_id == w.task:
            results[task_id] = bool(ok)
            w.task, w.deadline = None, math.inf
            w.done += 1
    except (EOFError, OSError):
      dead = True
    if dead or not w.proc.is_alive():
      if not w.ready:
        code = w.proc.exitcode
        self._workers.remove(w)
        w.stop()
        self.close()
        raise RuntimeError(f"Grader worker exited with code {code} before it was ready (see "
                           f"its traceback above; is math-verify installed?)")
      if w.task is not None:
        log.warning("grader worker %s died (exit code %s) grading pair %d; counted False",
                    w.proc.pid, w.proc.exitcode, w.task)
      self.stats["crashes"] += 1
      self._replace(w)
    elif w.done >= self.max_tasks_per_worker and w.task is None:
      self.stats["recycles"] += 1
      self._replace(w)

  def _expire(self, results: list[bool]) -> None:
    now = time.monotonic()
    for w in list(self._workers):
      if w.task is not None and now >= w.deadline:
        log.warning("grader call %d ran past %.3g s; worker %s killed and replaced", w.task,
                    self.timeout_s, w.proc.pid)
        results[w.task] = False
        self.stats["timeouts"] += 1
        self._replace(w)
      elif not w.ready and now >= w.boot_deadline:
        self.close()
        raise RuntimeError(f"Grader worker not ready after startup_timeout_s="
                           f"{self.startup_timeout_s:g} s")

  def close(self) -> None:
    """Stops every worker; idempotent. Later calls raise RuntimeError."""
    with self._lock:
      self._closed = True
      workers, self._workers = self._workers, []
      for w in workers:
        w.stop()

  def __enter__(self) -> Grader:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:
      pass


# ---------------------------------------------------------------------------------------------
# Benchmarks


@dataclasses.dataclass(frozen=True)
class Problem:
  """One benchmark problem: `answer` is the gold answer string (GSM8K: the number after
  `#### `, commas removed); `source` is the benchmark name."""

  id: str
  problem: str
  answer: str
  source: str


from lace_jax.bundled import BENCHMARK_DIR as _DATA_DIR  # noqa: E402

BENCHMARKS: dict[str, str] = {
    name: os.path.join(_DATA_DIR, f"{name}.jsonl")
    for name in ("aime24", "aime25", "amc2023", "math500", "gsm8k_test", "gsm8k_train")
}

_INSTRUCTION_RE = re.compile(
    r"\s*Please reason step by step,? and put your final answer within \\boxed\{\}\.?\s*$")
_NUMBER_RE = re.compile(r"[+-]?[\d,]*\d(?:\.\d+)?")


def _field(rec: dict, key: str, where: str) -> str:
  v = rec.get(key)
  if isinstance(v, bool) or not isinstance(v, (str, int, float)):
    raise ValueError(f"{where}: field {key!r} is {'missing' if v is None else repr(v)}; "
                     f"expected a string")
  v = str(v).strip()
  if not v:
    raise ValueError(f"{where}: field {key!r} is empty")
  return v


def _gsm8k_gold(solution: str, where: str) -> str:
  if "####" not in solution:
    raise ValueError(f"{where}: GSM8K field 'answer' has no '#### <gold>' line")
  gold = solution.rsplit("####", 1)[1].strip()
  if _NUMBER_RE.fullmatch(gold):
    gold = gold.replace(",", "")
  if not gold:
    raise ValueError(f"{where}: GSM8K field 'answer' has an empty gold after '####'")
  return gold


def read_problems(path: str, name: str | None = None) -> list[Problem]:
  """Reads a JSONL benchmark file, one problem per non-blank line.

  Formats: GSM8K `{"question", "answer"}` (gold after `#### `, commas stripped from numbers);
  MATH-500 / AIME / AMC style `{"problem", "answer"}` (numeric answers are stringified). An
  `id` or `unique_id` field is kept, else the id is `{name}-{k}` (k = 0-based record index).
  `name` (the Problem.source) defaults to the file name without extension. The trailing
  "Please reason step by step, and put your final answer within \\boxed{}." is removed from
  problems. Raises FileNotFoundError, or ValueError naming `path:line` for invalid JSON, a
  missing or empty field, or a file with no problems.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"benchmark file {path} does not exist")
  source = name or os.path.splitext(os.path.basename(path))[0]
  problems = []
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{line_no}"
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e.msg}); expected one object per line") \
            from None
      if not isinstance(rec, dict):
        raise ValueError(f"{where}: a JSON {type(rec).__name__}; expected an object with "
                         f"'problem'/'question' and 'answer'")
      if "problem" in rec:
        text, answer = _field(rec, "problem", where), _field(rec, "answer", where)
      elif "question" in rec:
        text = _field(rec, "question", where)
        answer = _gsm8k_gold(_field(rec, "answer", where), where)
      else:
        raise ValueError(f"{where}: missing field 'problem' (or GSM8K's 'question'); found "
                         f"fields {sorted(rec)}")
      text = _INSTRUCTION_RE.sub("", text)
      pid = rec.get("id", rec.get("unique_id"))
      pid = f"{source}-{len(problems)}" if pid is None else str(pid)
      problems.append(Problem(pid, text, answer, source))
  if not problems:
    raise ValueError(f"{path}: no problems (the file is empty)")
  return problems


def load_benchmark(name: str) -> list[Problem]:
  """The bundled benchmark `name` (one of BENCHMARKS)."""
  if name not in BENCHMARKS:
    raise ValueError(f"unknown benchmark {name!r}; expected one of {sorted(BENCHMARKS)}")
  return read_problems(BENCHMARKS[name], name)


if __name__ == _WORKER_RUN_NAME:  # a Grader worker process (see _Worker): serve, then exit
  _worker_main(*globals()["_WORKER_ARGS"])
