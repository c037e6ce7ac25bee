"""Answer equivalence: `is_equivalent` (math-verify, in process) and `Grader`, which runs a
grading function (default `is_equivalent`) in a pebble process pool with a wall-clock timeout
per call.

Equivalence runs sympy through math-verify, which can hang on adversarial input
(`10^{10^{10}}` never finishes). `is_equivalent` itself has NO timeout (math-verify's SIGALRM
timeouts are disabled so that it can run on any thread); grade untrusted model output through
`Grader`, whose worker processes are killed and replaced when a call overruns.
"""

from __future__ import annotations

import collections
import concurrent.futures
import importlib.util
import logging
import multiprocessing
import os
import pickle
import re
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool

import pebble

log = logging.getLogger(__name__)

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
  delimiters) and a trailing period are dropped, a degree sign `°` becomes `^\\circ` (which
  math-verify drops), and a bare scientific-notation number `1.5e3` becomes
  `1.5\\times10^{3}` (math-verify reads `e` as Euler's number)."""
  s = _DOLLAR_RE.sub("", s).strip().rstrip(".").rstrip().replace("°", "^\\circ")
  m = _SCI_RE.fullmatch(s)
  if m:
    s = f"{m.group(1)}\\times10^{{{m.group(2)}}}"
  return s


# An answer ending in a binary operator or relation (`1+1+`, `7-`, `x=`, `2\times`), or
# starting with one that cannot be unary (`=3`, `*2`), is cut off: math-verify's plain-expression
# extraction would read a number out of it (`1+1+` -> 1), which in GRPO is a reward hack.
_TRAILING_OP_RE = re.compile(
    r"(?:[+\-*/^_=<>,;:×÷·]|\\(?:times|cdot|div|pm|mp|le|leq|ge|geq|ne|neq|lt|gt|approx|cup"
    r"|cap|setminus|in|to|mid))$")
_LEADING_OP_RE = re.compile(r"^(?:[*/^_=<>,;:×÷·!)\]]|\\(?:times|cdot|div)(?![A-Za-z]))")


def _malformed(s: str) -> str | None:
  """Why the normalised answer `s` is not a complete expression (a dangling operator,
  unbalanced braces or brackets), else None. String work only, linear in len(s)."""
  if _TRAILING_OP_RE.search(s):
    return "ends in an operator"
  if _LEADING_OP_RE.match(s):
    return "starts with a binary operator"
  braces = brackets = 0  # `{}`; `(` `[` `\{` against `)` `]` `\}` (intervals mix them: `(1,2]`)
  i = 0
  while i < len(s):
    ch = s[i]
    if ch == "\\":
      nxt = s[i + 1:i + 2]
      brackets += (nxt == "{") - (nxt == "}")
      i += 2
    else:
      braces += (ch == "{") - (ch == "}")
      brackets += (ch in "([") - (ch in ")]")
      i += 1
    if braces < 0 or brackets < 0:
      return "closes a bracket it never opened"
  if braces or brackets:
    return "leaves a bracket open"
  return None


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
  """math-verify's parse of a bare answer string, of the WHOLE string or nothing. The answer is
  read as LaTeX wrapped in `$...$` (math-verify extracts LaTeX only from math environments, so
  `\\frac12`, `(1,2]`, `\\{1,2\\}`, `\\$18` fail bare), else in `\\boxed{}`; a LaTeX parse
  either reads the whole expression or fails. If both fail, as a plain expression (`2**3`), but
  only when the one match math-verify extracts is the whole answer: its expression regex
  otherwise reads a number out of any text (`1+1+` -> 1, `3)` -> 3, `1,2,` -> 1.2). A string
  nothing parses gives [] (not equivalent to anything, itself included)."""
  parse, _, (latex, expr) = _math_verify()
  for text in (f"${s}$", f"\\boxed{{{s}}}"):
    parsed = parse(text, extraction_config=[latex], fallback_mode="no_fallback",
                   parsing_timeout=None)
    if parsed:
      return parsed
  # first_match: only the first match is tried, and its string comes back after its value
  parsed = parse(s, extraction_config=[expr], fallback_mode="first_match",
                 extraction_mode="first_match", parsing_timeout=None)
  if len(parsed) == 2 and "".join(parsed[1].split()) == "".join(s.split()):
    return parsed[:1]
  return []


def is_equivalent(pred: str, gold: str) -> bool:
  """Whether the predicted answer `pred` equals the `gold` answer, both bare answer strings
  (e.g. boxed contents), in-process.

  Fast path: equal normalised strings (`_normalise`). Otherwise both are parsed by math-verify
  (LaTeX and plain-expression extraction) and compared with `verify(gold, pred)`: numeric
  equality to 6 decimals, symbolic equality, sets, intervals, tuples, matrices, equations.
  Semantics inherited from math-verify: `\\text{}` units are dropped (`5\\text{ cm}` == 5 ==
  `5\\text{ m}`), `^\\circ` is dropped, `x\\%` equals both x and x/100, and a bare comma list
  `1,2` is a set. An answer that does not parse as a whole is equivalent to nothing (itself
  included): a dangling operator (`1+1+`, `7-`, `=3`) or an unbalanced bracket is rejected before
  parsing (`_malformed`), and a parse of only part of the string is not used (`_parse`). Any
  parsing or comparison error gives False. NO timeout: math-verify's
  SIGALRM timeouts are disabled (so this is safe on any thread); use `Grader` for untrusted
  input.
  """
  if not isinstance(pred, str) or not isinstance(gold, str):
    raise TypeError(f"is_equivalent expects two str, got pred {type(pred).__name__}, "
                    f"gold {type(gold).__name__}")
  p, g = _normalise(pred), _normalise(gold)
  if not p or not g or _malformed(p) or _malformed(g):
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
# Grader: a grading function in a pool of worker processes with a wall-clock timeout per call


def _init_worker() -> None:
  """Runs once in every new worker before it takes a call: makes SIGTERM kill it at once, and
  imports sympy / math-verify (~0.5 s) before the first call's clock starts.

  pebble stops a timed-out worker with SIGTERM and, 3 s later, SIGKILL. Its own SIGTERM handler
  is Python code, which cannot run while sympy is stuck inside one C call (the 10^10-digit
  power of `10^{10^{10}}`), so every timeout would cost 3 s more; the default action needs no
  Python. pebble signals a worker only while it holds the channel lock, i.e. never in the middle
  of a worker's send or receive, so dying at once leaves the pool consistent."""
  signal.signal(signal.SIGTERM, signal.SIG_DFL)
  is_equivalent("1/2", "0.5")


def _call(fn: Callable[[str, str], bool], pred: str, gold: str) -> tuple[int, bool]:
  """One call in a worker (on its main thread): (the worker's pid, fn(pred, gold)), False if fn
  raised. The pid lets the parent count each worker's calls (`Grader.stats['recycles']`)."""
  try:
    ok = bool(fn(pred, gold))
  except Exception:
    log.debug("grading %r against %r raised", pred, gold, exc_info=True)
    ok = False
  return os.getpid(), ok


class Grader:
  """`grade_fn` (default `is_equivalent`) in `num_workers` worker processes, with a wall-clock
  timeout per call.

  grade(pred, gold) -> bool; grade_many([(pred, gold), ...]) -> [bool] runs the pairs
  concurrently across workers, results in the order of the pairs (a None pred is False without
  a worker call). A call that runs longer than `timeout_s` (measured from when a worker takes
  it) is False: its worker is killed and replaced while the other workers keep going. A worker
  that dies mid-call gives False and is replaced too; each worker is also replaced after
  `max_tasks_per_worker` calls (bounding math-verify's caches). `stats` counts calls (pairs sent
  to a worker), timeouts, crashes, restarts (workers started to replace others, for any of the
  three reasons) and recycles.

  The pool is pebble's `ProcessPool`; workers are 'spawn'ed (safe with JAX threads in the
  parent), start on the first call (~0.5 s each, in parallel) and import this module by name,
  so `grade_fn` must be a module-level function the workers can import (tests pass one that
  sleeps or crashes on chosen inputs). multiprocessing also imports the parent's `__main__` in
  them (the usual spawn rule: guard scripts with `if __name__ == "__main__":`).

  A worker that dies while pebble sees no call running on it (killed while idle, or failing at
  startup) makes pebble fail every pending call of its pool: the Grader then starts a new pool
  and reruns those calls once (counted as one crash). pebble ties a call to its worker when it
  reads the worker's acknowledgement, so a worker dying within a few milliseconds of taking a
  call can be counted as that call's timeout (after timeout_s) instead. Two pools in a row that die before
  finishing any call raise RuntimeError (e.g. a worker that cannot import its modules); so does
  a batch in which no call starts within `startup_timeout_s`, and a missing math-verify is
  reported at construction. Calls from several threads are serialised (close() waits for a
  running batch). Use as a context manager or call close().
  """

  def __init__(self, num_workers: int = 2, timeout_s: float = 5.0,
               max_tasks_per_worker: int = 500, *,
               grade_fn: Callable[[str, str], bool] = is_equivalent,
               startup_timeout_s: float = 120.0):
    if not isinstance(num_workers, int) or num_workers < 1:
      raise ValueError(f"Grader: num_workers={num_workers!r}; expected an int >= 1")
    if not timeout_s > 0:
      raise ValueError(f"Grader: timeout_s={timeout_s!r}; expected > 0 seconds")
    if not isinstance(max_tasks_per_worker, int) or max_tasks_per_worker < 1:
      raise ValueError(f"Grader: max_tasks_per_worker={max_tasks_per_worker!r}; expected an "
                       f"int >= 1")
    if importlib.util.find_spec("math_verify") is None:  # the workers would die at startup
      raise RuntimeError("Grader: math-verify is not installed (pip install math-verify); the "
                         "workers grade with it")
    try:
      pickle.dumps(grade_fn)
    except Exception as e:
      raise TypeError(f"Grader: grade_fn={grade_fn!r} cannot be sent to a worker process ({e}); "
                      f"expected a module-level function") from None
    self.num_workers = num_workers
    self.timeout_s = float(timeout_s)
    self.max_tasks_per_worker = max_tasks_per_worker
    self.startup_timeout_s = float(startup_timeout_s)
    self._fn = grade_fn
    self._lock = threading.RLock()  # close() takes it too, also from inside grade_many
    self.stats = {"calls": 0, "timeouts": 0, "crashes": 0, "restarts": 0, "recycles": 0}
    self._calls_of: collections.Counter[int] = collections.Counter()  # finished calls by pid
    self._pool_done = 0  # calls the current pool finished
    self._dead_pools = 0  # pools in a row that died before finishing a call
    self._closed = False
    self._pool = self._new_pool()

  def _new_pool(self) -> pebble.ProcessPool:
    self._calls_of.clear()
    self._pool_done = 0
    return pebble.ProcessPool(max_workers=self.num_workers, max_tasks=self.max_tasks_per_worker,
                              initializer=_init_worker,
                              context=multiprocessing.get_context("spawn"))

  @staticmethod
  def _stop(pool: pebble.ProcessPool) -> None:
    pool.stop()  # kills the workers, running calls and all
    pool.join()

  def worker_pids(self) -> list[int]:
    """Process ids of the current workers (diagnostics and tests); [] before the first call.
    pebble has no public accessor, so this reads its worker table."""
    try:
      workers = self._pool._pool_manager.worker_manager.workers
    except AttributeError:  # another pebble layout
      return []
    while True:
      try:  # pebble's manager thread adds and drops workers concurrently
        return sorted(workers)
      except RuntimeError:
        pass

  def grade(self, pred: str | None, gold: str) -> bool:
    """Whether pred equals gold (`grade_fn`), False on a None pred, timeout or crash."""
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
      todo = [i for i, (p, _) in enumerate(pairs) if p is not None]
      self.stats["calls"] += len(todo)
      rerun = set()
      while todo:
        lost = self._run(todo, pairs, results)
        if not lost:
          break
        # The pool broke (see the class docstring): a new one reruns the lost calls, once each.
        self.stats["crashes"] += 1
        self.stats["restarts"] += self.num_workers
        self._stop(self._pool)
        self._pool = self._new_pool()
        todo = [i for i in lost if i not in rerun]
        rerun.update(todo)
      return results

  def _run(self, todo: list[int], pairs: list, results: list[bool]) -> list[int]:
    """Runs the calls `todo` (indices into pairs) on the pool and writes their results; returns
    the indices whose calls a broken pool lost (none if it did not break)."""
    futures: dict = {}
    broken = False
    try:
      for i in todo:
        futures[self._pool.schedule(_call, (self._fn, *pairs[i]), timeout=self.timeout_s)] = i
    except RuntimeError:  # pebble refuses new calls once its pool broke
      broken = True
    lost = todo[len(futures):]
    pending = set(futures)
    last_progress = time.monotonic()
    try:
      while pending and not broken:
        done, pending = concurrent.futures.wait(
            pending, timeout=1.0, return_when=concurrent.futures.FIRST_COMPLETED)
        for f in done:
          i = futures[f]
          try:
            pid, results[i] = f.result()
          except TimeoutError:
            log.warning("grader call %d ran past %.3g s; its worker was killed and replaced", i,
                        self.timeout_s)
            self.stats["timeouts"] += 1
            self.stats["restarts"] += 1
          except pebble.ProcessExpired as e:
            log.warning("grader worker %s died (exit code %s) grading pair %d; counted False",
                        e.pid, e.exitcode, i)
            self.stats["crashes"] += 1
            self.stats["restarts"] += 1
          except BrokenProcessPool:
            broken = True
            lost.append(i)
          else:
            self._finished(pid)
        now = time.monotonic()
        if done or any(f.running() for f in pending):
          last_progress = now
        elif now - last_progress > self.startup_timeout_s:
          self.close()
          raise RuntimeError(f"Grader: no worker took a call within startup_timeout_s="
                             f"{self.startup_timeout_s:g} s")
    except BaseException:  # e.g. KeyboardInterrupt: no call of this batch may outlive it
      for f in pending:
        f.cancel()  # pebble kills the worker of a running call it cancels
      raise
    if not broken:
      return []
    lost += [futures[f] for f in pending]
    for f in pending:
      f.cancel()
    self._dead_pools = 0 if self._pool_done else self._dead_pools + 1
    if self._dead_pools >= 2:
      self.close()
      raise RuntimeError("Grader workers keep dying before they finish a call (see their "
                         "traceback above; do they import lace_jax.grading and grade_fn's "
                         "module?)")
    return sorted(lost)

  def _finished(self, pid: int) -> None:
    """Counts a call worker `pid` finished: pebble replaces a worker after max_tasks calls."""
    self._pool_done += 1
    self._calls_of[pid] += 1
    if self._calls_of[pid] >= self.max_tasks_per_worker:
      del self._calls_of[pid]
      self.stats["recycles"] += 1
      self.stats["restarts"] += 1

  def close(self) -> None:
    """Stops every worker; idempotent. Later calls raise RuntimeError."""
    with self._lock:
      if not self._closed:
        self._closed = True
        self._stop(self._pool)

  def __enter__(self) -> Grader:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:
      pass
