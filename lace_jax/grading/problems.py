"""Problems with gold answers: `Problem`, the one reader `read_problems` (a bundled benchmark
name or a JSONL path), and the bundled benchmarks (`BENCHMARKS`, `load_benchmark`).

Every caller that needs problems with gold answers (evaluation, Lattice GRPO, datagen, the toy
comparison) reads them here, so a file means the same to all of them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

from lace_jax.bundled import BENCHMARK_DIR

BENCHMARKS: dict[str, str] = {
    name: os.path.join(BENCHMARK_DIR, f"{name}.jsonl")
    for name in ("aime24", "aime25", "amc2023", "math500", "gsm8k_test", "gsm8k_train")
}


@dataclasses.dataclass(frozen=True)
class Problem:
  """One problem and its gold answer.

  problem: the user turn, or W per-thread user turns (a tuple of W strings, for tasks that
    hand threads different material; `tokenizer.thread_prompts` takes either).
  answer: the gold answer string (GSM8K: the number after `#### `, commas removed).
  source: the benchmark name, or the file name without extension.
  """

  id: str
  problem: str | tuple[str, ...]
  answer: str
  source: str


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


def _problem_text(rec: dict, where: str) -> str | tuple[str, ...]:
  """The 'problem' field: one string, or a non-empty list of W per-thread strings; the
  trailing boxed-answer instruction is removed from each (the prompt template adds its own)."""
  v = rec["problem"]
  if not isinstance(v, list):
    return _INSTRUCTION_RE.sub("", _field(rec, "problem", where))
  if not v:
    raise ValueError(f"{where}: field 'problem' is an empty list; expected a string or one "
                     f"string per thread")
  texts = []
  for k, t in enumerate(v):
    if not isinstance(t, str) or not t.strip():
      raise ValueError(f"{where}: field 'problem'[{k}] is {t!r}; expected a non-empty string")
    texts.append(_INSTRUCTION_RE.sub("", t.strip()))
  return tuple(texts)


def _gsm8k_gold(solution: str, where: str) -> str:
  if "####" not in solution:
    raise ValueError(f"{where}: GSM8K field 'answer' has no '#### <gold>' line")
  gold = solution.rsplit("####", 1)[1].strip()
  if _NUMBER_RE.fullmatch(gold):
    gold = gold.replace(",", "")
  if not gold:
    raise ValueError(f"{where}: GSM8K field 'answer' has an empty gold after '####'")
  return gold


def read_problems(path_or_name: str, name: str | None = None) -> list[Problem]:
  """Problems with gold answers from a bundled benchmark name (one of BENCHMARKS) or a JSONL
  file, one problem per non-blank line.

  Formats: GSM8K `{"question", "answer"}` (gold after `#### `, commas stripped from numbers);
  `{"problem", "answer"}` (MATH-500 / AIME / AMC, and this repo's own files; numeric answers
  are stringified), where "problem" may also be a list of W per-thread strings (kept as a
  tuple). An `id` or `unique_id` field is kept, else the id is `{name}-{k}` (k = 0-based record
  index); other fields are ignored. `name` (the Problem.source) defaults to the benchmark name
  or the file name without extension. The trailing "Please reason step by step, and put your
  final answer within \\boxed{}." is removed from problems. Raises FileNotFoundError, or
  ValueError naming `path:line` for invalid JSON or a missing or empty field, and naming the
  path for a file with no problems.
  """
  if path_or_name in BENCHMARKS:
    path, source = BENCHMARKS[path_or_name], name or path_or_name
  else:
    path = path_or_name
    if os.path.isdir(path):
      raise IsADirectoryError(f"problems file {path} is a directory; expected a JSONL file of "
                              f'{{"problem", "answer"}} records or one of the bundled benchmarks '
                              f"{sorted(BENCHMARKS)}")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"problems file {path} does not exist (nor is it one of the "
                              f"bundled benchmarks {sorted(BENCHMARKS)})")
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
        text, answer = _problem_text(rec, where), _field(rec, "answer", where)
      elif "question" in rec:
        text = _INSTRUCTION_RE.sub("", _field(rec, "question", where))
        answer = _gsm8k_gold(_field(rec, "answer", where), where)
      else:
        raise ValueError(f"{where}: missing field 'problem' (or GSM8K's 'question'); found "
                         f"fields {sorted(rec)}")
      pid = rec.get("id", rec.get("unique_id"))
      pid = f"{source}-{len(problems)}" if pid is None else str(pid)
      problems.append(Problem(pid, text, answer, source))
  if not problems:
    raise ValueError(f"{path}: no problems (the file is empty)")
  return problems


def load_benchmark(name: str) -> list[Problem]:
  """The bundled benchmark `name` (one of BENCHMARKS): `read_problems` restricted to names, for
  callers whose dataset names must not be taken as paths (e.g. output file names)."""
  if name not in BENCHMARKS:
    raise ValueError(f"unknown benchmark {name!r}; expected one of {sorted(BENCHMARKS)}")
  return read_problems(name)
