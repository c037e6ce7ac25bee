"""Answers out of thread texts: the last `\\boxed{...}`, the self-assessment tag, the lattice's
system answer (`parse_lattice`), and the aggregates maj@k (`majority_vote`) and pass@k.

A LACE thread ends with its answer in `\\boxed{...}` followed by one self-assessment tag
(`lace_jax.tokenizer.TAGS`); the lattice's answer is the boxed answer of the one thread tagged
`[[best]]`. Pure string work: no sympy, no worker processes (see `verify` for equivalence).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Callable, Sequence

from lace_jax.tokenizer import TAGS

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


def maj_at_k(answers: Sequence[str | None], correct: Callable[[str], bool], k: int) -> float:
  """maj@k: the expected correctness of `majority_vote` over a uniformly random k of the n
  threads' answers (kept in thread order, so ties go to the earlier thread's answer, as in
  maj@n). `correct(answer)` grades one distinct answer; a subset with no answer is wrong.

  Exact: every one of the C(n, k) subsets is counted (n is the lattice's W, at most a few
  dozen; C(16, 8) = 12,870 subsets). maj@n is `majority_vote` of all n; maj@1 is the mean
  correctness of the threads.
  """
  n = len(answers)
  if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
    raise ValueError(f"maj_at_k: k={k!r}; expected an int in 1..n={n}")
  ids: dict[str, int] = {}
  cluster = [None if a is None else ids.setdefault(a, len(ids)) for a in answers]
  right = [False] * len(ids)
  for a, i in ids.items():
    right[i] = bool(correct(a))
  wins = 0
  for subset in itertools.combinations(range(n), k):
    counts: dict[int, int] = {}
    first: dict[int, int] = {}  # cluster -> its first position in the subset
    for pos, t in enumerate(subset):
      c = cluster[t]
      if c is not None:
        counts[c] = counts.get(c, 0) + 1
        first.setdefault(c, pos)
    if counts:
      winner = max(counts, key=lambda c: (counts[c], -first[c]))
      wins += right[winner]
  return wins / math.comb(n, k)


def maj_curve(answers: Sequence[str | None], correct: Callable[[str], bool]) -> list[float]:
  """[maj@1, ..., maj@n] of the n answers: `maj_at_k` for every k at once, exactly, without
  enumerating subsets (n = 64 samples has 2^64 of them), so a budget curve over many
  independent samples can be read off one draw.

  Counted with generating functions: a k-subset's vote goes to cluster c, first chosen at
  thread p, with j of its members, when every other cluster has fewer than j members in the
  subset, or j all after p (the tie goes to the earlier first occurrence, as in
  `majority_vote`). For each correct (c, p, j) the product over the other clusters of
  sum_m (ways to choose m of them) x^m, times the unanswered threads' (1 + x)^u, counts the
  subsets by size. Integer arithmetic, one division per k: equal to `maj_at_k` to the last
  bit.
  """
  n = len(answers)
  members: dict[str, list[int]] = {}
  for i, a in enumerate(answers):
    if a is not None:
      members.setdefault(a, []).append(i)
  unanswered = n - sum(len(m) for m in members.values())
  wins = [0] * (n + 1)
  for a, own in members.items():
    if not correct(a):
      continue
    others = [m for b, m in members.items() if b != a]
    for first, p in enumerate(own):
      after = len(own) - first - 1  # c's members after p: the other j - 1 come from these
      for j in range(1, after + 2):
        poly = [math.comb(unanswered, m) for m in range(unanswered + 1)]
        for m_d in others:
          later = sum(q > p for q in m_d)
          g = [math.comb(len(m_d), m) for m in range(min(j, len(m_d) + 1))]
          if later >= j:  # a tie at j members, all after p: c still wins
            g += [math.comb(later, j)]
          poly = _poly_mul(poly, g)
        ways = math.comb(after, j - 1)
        for r, coef in enumerate(poly):
          if j + r <= n:
            wins[j + r] += ways * coef
  return [wins[k] / math.comb(n, k) for k in range(1, n + 1)]


def _poly_mul(a: list[int], b: list[int]) -> list[int]:
  out = [0] * (len(a) + len(b) - 1)
  for i, x in enumerate(a):
    if x:
      for j, y in enumerate(b):
        out[i + j] += x * y
  return out
