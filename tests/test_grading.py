"""lace_jax.grading: extraction, lattice format accounting, maj/pass@k, answer equivalence (in
process and through the Grader's worker processes, with timeouts and crashes), and the
bundled benchmark readers. conftest imports jax first, so the pool is exercised with JAX's
threads running in the parent."""

from __future__ import annotations

import itertools
import math
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from lace_jax.grading import (BENCHMARKS, Grader, LatticeAnswer, Problem, extract_boxed,
                              extract_tag, is_equivalent, load_benchmark, maj_at_k, maj_curve,
                              majority_vote, parse_lattice, pass_at_k, read_problems)
from lace_jax.tokenizer import TAGS
from tests import grading_hooks

# Sympy never finishes this one (it expands the 10^10-digit integer): > 45 s in process.
SLOW = "10^{10^{10}}"

# (pred, gold, expected). Notes on math-verify's semantics, which these cases pin down:
# `x\%` equals both x and x/100; `\text{}` units and `^\circ` are dropped (so 30^\circ is 30,
# not pi/6); a bare comma list is a set ("1, 2" == "2, 1").
EQUIVALENCE = [
    # fractions and decimals
    (r"\frac{1}{2}", "0.5", True),
    ("1/2", r"\frac{1}{2}", True),
    (r"\frac12", r"\frac{1}{2}", True),
    (r"\dfrac{3}{4}", "0.75", True),
    ("3/4", "0.75", True),
    (r"\frac{1}{3}", "0.3333333", True),
    ("12", "12.0", True),
    ("0.50", ".5", True),
    (r"\frac{1}{2}.", "0.5", True),  # trailing sentence period
    # percentages
    (r"75\%", "0.75", True),
    (r"50\%", "50", True),
    (r"50\%", "0.5", True),
    ("50%", "50", True),
    # intervals
    ("(1,2]", "(1, 2]", True),
    (r"\left(1, 2\right]", "(1,2]", True),
    (r"(-\infty, 3)", r"(-\infty,3)", True),
    (r"[0, \infty)", r"[0,\infty)", True),
    # sets, tuples, matrices, vectors
    (r"\{1,2\}", r"\{2,1\}", True),
    ("1, 2", "2, 1", True),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\pi/2)", True),
    (r"(3, \frac{\pi}{2})", r"\left( 3, \frac{\pi}{2} \right)", True),
    (r"\begin{pmatrix}1\\2\end{pmatrix}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", True),
    (r"\begin{pmatrix} 1 & 0 \\ 0 & 1 \end{pmatrix}", r"\begin{pmatrix}1&0\\0&1\end{pmatrix}",
     True),
    (r"\begin{pmatrix}\frac12\\-1\end{pmatrix}", r"\begin{pmatrix}0.5\\-1\end{pmatrix}", True),
    # units, currency
    (r"5\text{ cm}", "5", True),
    (r"5 \text{cm}^2", "5", True),
    (r"\$18", "18", True),
    (r"\$18.00", "18", True),
    ("$18", "18", True),
    # negatives, roots, pi, degrees, powers, functions
    ("-3", "-3", True),
    (r"-\frac{1}{2}", "-0.5", True),
    (r"2\sqrt{2}", r"\sqrt{8}", True),
    (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}", True),
    (r"\sqrt{2}", "1.41421356", True),
    (r"\sqrt[3]{27}", "3", True),
    (r"\pi", "3.14159265358979", True),
    (r"\frac{\pi}{2}", r"\pi/2", True),
    (r"30^\circ", "30", True),
    (r"30^{\circ}", "30", True),
    ("30°", "30", True),
    ("2^{10}", "1024", True),
    ("10!", "3628800", True),
    (r"\binom{5}{2}", "10", True),
    # thousands separators, scientific notation
    ("1,000", "1000", True),
    ("1,000,000", "1000000", True),
    (r"1{,}000", "1000", True),
    ("1.5e3", "1500", True),  # our normalisation: math-verify reads `e` as Euler's number
    ("1.5e-3", "0.0015", True),
    (r"1.5\times 10^{3}", "1500", True),
    (r"3\times10^{8}", "300000000", True),
    # expressions, equations, text and choices
    ("x^2+2x+1", "(x+1)^2", True),
    ("x = 5", "5", True),
    ("3 + 4i", "4i+3", True),
    (r"\text{Evelyn}", "Evelyn", True),
    (r"\text{(C)}", "C", True),
    # wrong answers
    ("0.333", r"\frac{1}{3}", False),
    ("80", "80.0000001", False),
    (r"50\%", "0.25", False),
    ("(1,2)", "(1, 2]", False),
    ("[1,2]", "(1,2]", False),
    (r"\{1,2\}", r"\{1,3\}", False),
    (r"\begin{pmatrix}1\\2\end{pmatrix}", r"\begin{pmatrix}2\\1\end{pmatrix}", False),
    (r"\left( 3, \frac{\pi}{2} \right)", r"\left( 3, \frac{\pi}{4} \right)", False),
    ("-3", "3", False),
    (r"\sqrt{3}", r"\sqrt{2}", False),
    (r"2\pi", r"\pi", False),
    (r"30^\circ", "45", False),
    ("10,000", "1000", False),
    ("1000000000000000000001", "1000000000000000000000", False),
    ("x+1", "x+2", False),
    ("18", "17", False),
    (r"\text{Evelyn}", r"\text{Bob}", False),
    ("C", "D", False),
    ("", "5", False),
]


@pytest.fixture(scope="module")
def pool_results() -> dict[tuple[str, str], bool]:
  """Every EQUIVALENCE pair graded once, in one batch, through the worker pool."""
  pairs = [(p, g) for p, g, _ in EQUIVALENCE]
  with Grader(num_workers=2, timeout_s=20.0) as grader:
    results = grader.grade_many(pairs)
    assert grader.stats["timeouts"] == 0 and grader.stats["crashes"] == 0, grader.stats
  return dict(zip(pairs, results))


def test_equivalence_table_size():
  assert len(EQUIVALENCE) >= 40
  assert sum(not e for _, _, e in EQUIVALENCE) >= 10
  assert len({(p, g) for p, g, _ in EQUIVALENCE}) == len(EQUIVALENCE)


@pytest.mark.parametrize("pred,gold,expected", EQUIVALENCE)
def test_equivalence(pred, gold, expected, pool_results):
  assert pool_results[(pred, gold)] is expected, "through the Grader pool"
  assert is_equivalent(pred, gold) is expected, "in process"


def test_is_equivalent_rejects_non_strings():
  with pytest.raises(TypeError, match="gold NoneType"):
    is_equivalent("1", None)


# Cut-off or partial answers (issue 16, item 8): math-verify's plain-expression extraction
# reads a number out of them (`1+1+` -> 1), a reward hack in GRPO. Equivalent to nothing,
# themselves included.
PARTIAL = [("1+1+", "1"), ("1+1+", "2"), ("7-", "7"), ("7-", "7-"), ("x=", "x"), ("=3", "3"),
           (r"2\times", "2"), ("3)", "3"), ("(1+1", "2"), ("1,2,", "1.2"), ("1+*1", "1"),
           (r"\frac{1}{", "1"), ("1}+{2", "1"), ("5", "5+")]


@pytest.mark.parametrize("pred,gold", PARTIAL)
def test_partial_answers_are_not_equivalent(pred, gold):
  assert is_equivalent(pred, gold) is False


def test_long_dangling_answer_is_rejected_quickly():
  start = time.perf_counter()
  assert is_equivalent("1+" * 50000, "1") is False
  assert time.perf_counter() - start < 2.0
  assert is_equivalent("2**3", "8") is True  # a whole plain expression still parses

# ---------------------------------------------------------------------------------------------
# Extraction and lattice format


@pytest.mark.parametrize("text,expected", [
    (r"so \boxed{\frac{1}{2}} [[best]]", r"\frac{1}{2}"),
    (r"\boxed{\sqrt{\frac{a}{b^{2}}}}", r"\sqrt{\frac{a}{b^{2}}}"),
    (r"first \boxed{3}, then \boxed{4}.", "4"),
    (r"\boxed{1} and finally \fbox{2}", "2"),
    (r"\boxed {  7 }", "7"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),  # escaped braces do not count
    (r"\boxed{\begin{pmatrix}1\\2\end{pmatrix}}", r"\begin{pmatrix}1\\2\end{pmatrix}"),
    ("no answer here", None),
    (r"\boxed{\frac{1}{2}", None),  # unbalanced (truncated)
    (r"\boxed{3} then truncated \boxed{\frac{1", None),  # the last box decides
    (r"put it in \boxed{}", None),  # the placeholder is not an answer
    (r"\boxed 5", None),
    (r"\boxedfoo{5}", None),
])
def test_extract_boxed(text, expected):
  assert extract_boxed(text) == expected


def test_extract_tag():
  assert extract_tag(r"\boxed{3} [[best]]") == "[[best]]"
  assert extract_tag("I will say [[best]] only if sure... \\boxed{3}\n[[fail]]") == "[[fail]]"
  assert extract_tag("[[success]]") == "[[success]]"
  assert extract_tag("no tag [best]") is None
  assert all(extract_tag(f"x {t}") == t for t in TAGS)


def test_parse_lattice_one_best():
  out = parse_lattice([r"\boxed{4} [[success]]", r"\boxed{\frac{1}{2}} [[best]]",
                       "gave up [[fail]]"])
  assert out == LatticeAnswer(answers=["4", r"\frac{1}{2}", None],
                              tags=["[[success]]", "[[best]]", "[[fail]]"], best=1,
                              answer=r"\frac{1}{2}", format_ok=True, format_error=None)


@pytest.mark.parametrize("threads,error", [
    ([r"\boxed{4} [[success]]", r"\boxed{5} [[fail]]"], "no [[best]] thread"),
    ([r"\boxed{4} [[best]]", r"\boxed{5}"], None),
    ([r"\boxed{4} [[best]]", r"\boxed{5} [[best]]"], "2 threads tagged [[best]]"),
    (["I think [[best]]", r"\boxed{5} [[success]]"], "[[best]] thread 0 has no \\boxed{}"),
    ([r"\boxed{4} [[best]] wait, no [[fail]]", r"\boxed{5} [[success]]"], "no [[best]] thread"),
])
def test_parse_lattice_format(threads, error):
  out = parse_lattice(threads)
  assert out.format_ok is (error is None)
  if error is None:
    assert (out.best, out.answer, out.format_error) == (0, "4", None)
  else:
    assert out.best is None and out.answer is None
    assert error in out.format_error


def test_parse_lattice_bad_input():
  with pytest.raises(ValueError, match="no threads"):
    parse_lattice([])
  with pytest.raises(TypeError, match="thread 1 is a NoneType"):
    parse_lattice(["a", None])
  with pytest.raises(TypeError, match="one str"):
    parse_lattice("a thread")


# ---------------------------------------------------------------------------------------------
# Aggregation


def test_majority_vote():
  assert majority_vote(["3", "4", "4", None, "3", "4"]) == "4"
  assert majority_vote(["3", "4", "4", "3"]) == "3"  # tie: first occurrence
  assert majority_vote([None, "5", None]) == "5"
  assert majority_vote([None, None]) is None
  assert majority_vote([]) is None
  answers = [r"\frac{1}{2}", "2", "0.5", "1/2", "2", None, "2.0"]
  assert majority_vote(answers) == "2"  # strings: "2" x2 beats the rest
  # symbolically, 1/2 has 3 votes (\frac{1}{2}, 0.5, 1/2) and 2 has 3 (2, 2, 2.0): tie, first
  assert majority_vote(answers, equal=is_equivalent) == r"\frac{1}{2}"
  assert majority_vote(answers[:-2] + ["0.50"], equal=is_equivalent) == r"\frac{1}{2}"
  assert majority_vote(["2", "2.0", "0.5", "1/2", "2"], equal=is_equivalent) == "2"


def test_pass_at_k():
  assert pass_at_k(10, 3, 1) == 0.3
  assert pass_at_k(5, 0, 2) == 0.0
  assert pass_at_k(4, 4, 2) == 1.0
  assert pass_at_k(5, 4, 2) == 1.0  # every 2-subset holds a correct sample
  assert pass_at_k(4, 1, 2) == 0.5  # 1 - C(3,2)/C(4,2) = 1 - 3/6
  assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
  assert pass_at_k(10, 10, 10) == 1.0
  big = pass_at_k(10_000, 1, 100)  # 1 - C(9999,100)/C(10000,100) = 100/10000
  assert big == pytest.approx(0.01, rel=1e-12)
  for args in [(3, 4, 1), (3, -1, 1), (3, 1, 0), (3, 1, 4)]:
    with pytest.raises(ValueError, match="pass_at_k"):
      pass_at_k(*args)


# ---------------------------------------------------------------------------------------------
# Grader: timeouts, crashes, recycling


def _wait_ready(grader: Grader) -> None:
  assert grader.grade("1/2", "0.5") is True  # one call: at least the first worker is up


def test_grader_timeout_does_not_stall_others():
  normal = [(r"\frac{1}{2}", "0.5", True), ("3", "4", False), (r"\{1,2\}", r"\{2,1\}", True),
            ("1,000", "1000", True), (r"\sqrt{8}", r"2\sqrt{2}", True), (None, "7", False),
            ("(1,2)", "(1,2]", False)]
  pairs = [(SLOW, "5")] + [(p, g) for p, g, _ in normal]
  with Grader(num_workers=2, timeout_s=1.0) as grader:
    _wait_ready(grader)
    pids = grader.worker_pids()
    start = time.monotonic()
    results = grader.grade_many(pairs)
    elapsed = time.monotonic() - start
    assert results == [False] + [e for _, _, e in normal]
    assert 1.0 <= elapsed < 5.0
    assert grader.stats["timeouts"] == 1 and grader.stats["restarts"] == 1, grader.stats
    assert grader.stats["crashes"] == 0
    assert grader.stats["calls"] == 1 + len(pairs) - 1  # warm-up + all but the None pred
    assert len(set(grader.worker_pids()) & set(pids)) == 1  # one replaced, one kept
    # still works, on both workers
    assert grader.grade_many([("2", "2.0"), ("x", "y"), ("1/4", "0.25"), ("5", "5")]) == \
        [True, False, True, True]
    assert grader.stats["timeouts"] == 1


def test_grader_survives_killed_worker():
  with Grader(num_workers=1, timeout_s=60.0) as grader:
    _wait_ready(grader)
    (pid,) = grader.worker_pids()
    killer = threading.Timer(0.5, os.kill, (pid, signal.SIGKILL))
    killer.start()
    start = time.monotonic()
    assert grader.grade(SLOW, "5") is False  # killed mid-task
    assert time.monotonic() - start < 5.0
    killer.join()
    assert grader.stats["crashes"] == 1 and grader.stats["restarts"] == 1
    assert grader.stats["timeouts"] == 0
    assert grader.worker_pids() != [pid]
    assert grader.grade(r"\frac{3}{4}", "0.75") is True
    # a worker killed while idle is replaced before it is given a call
    os.kill(grader.worker_pids()[0], signal.SIGKILL)
    time.sleep(0.2)
    assert grader.grade_many([("1", "1.0"), ("1", "2")]) == [True, False]
    assert grader.stats["crashes"] == 2


def test_grader_injected_crash_among_other_calls():
  with Grader(num_workers=2, timeout_s=30.0, grade_fn=grading_hooks.hang_or_crash) as grader:
    results = grader.grade_many([("2", "2"), (grading_hooks.CRASH, "1"), ("3", "3"), ("4", "5"),
                                 ("sleep:0.1", "1"), ("0.5", r"\frac12")])
    assert results == [True, False, True, False, False, True]
    assert grader.stats["crashes"] == 1 and grader.stats["restarts"] == 1, grader.stats
    assert grader.stats["timeouts"] == 0
    assert grader.grade("7", "7.0") is True


def test_grader_injected_hang_times_out_alone():
  pairs = [("sleep:60", "1")] + [(str(i), f"{i}.0") for i in range(6)]
  with Grader(num_workers=2, timeout_s=1.0, grade_fn=grading_hooks.hang_or_crash) as grader:
    _wait_ready(grader)
    start = time.monotonic()
    assert grader.grade_many(pairs) == [False] + [True] * 6
    assert 1.0 <= time.monotonic() - start < 5.0  # the other worker graded the rest meanwhile
    assert grader.stats["timeouts"] == 1 and grader.stats["restarts"] == 1, grader.stats
    assert grader.stats["crashes"] == 0
    assert grader.grade("sleep:0", "1") is False and grader.grade("1/2", "0.5") is True


def test_grader_rejects_unsendable_grade_fn():
  with pytest.raises(TypeError, match="module-level function"):
    Grader(grade_fn=lambda p, g: True)


def test_grader_reports_missing_math_verify(monkeypatch):
  monkeypatch.setitem(sys.modules, "math_verify", None)  # find_spec then finds nothing
  with pytest.raises(RuntimeError, match="math-verify is not installed"):
    Grader(num_workers=1)


def test_grader_recycles_workers():
  with Grader(num_workers=1, timeout_s=30.0, max_tasks_per_worker=2) as grader:
    results = grader.grade_many([(str(i), str(i)) for i in range(5)])
    assert results == [True] * 5
    assert grader.stats["recycles"] == 2 and grader.stats["restarts"] == 2
    assert grader.stats["calls"] == 5


def test_grader_bad_arguments_and_close():
  with pytest.raises(ValueError, match="num_workers=0"):
    Grader(num_workers=0)
  with pytest.raises(ValueError, match="timeout_s=0"):
    Grader(timeout_s=0)
  grader = Grader(num_workers=1)
  with pytest.raises(TypeError, match=r"pairs\[1\]"):
    grader.grade_many([("1", "1"), ("1", None)])
  assert grader.grade_many([]) == []
  assert grader.grade(None, "1") is False
  assert grader.stats["calls"] == 0
  grader.close()
  grader.close()
  with pytest.raises(RuntimeError, match="closed"):
    grader.grade("1", "1")


# ---------------------------------------------------------------------------------------------
# Benchmark readers


@pytest.mark.parametrize("name,count", [("aime24", 30), ("aime25", 30), ("amc2023", 40),
                                        ("math500", 500), ("gsm8k_test", 1319),
                                        ("gsm8k_train", 7473)])
def test_load_benchmark(name, count):
  problems = load_benchmark(name)
  assert len(problems) == count
  assert len({p.id for p in problems}) == count
  for p in problems:
    assert isinstance(p, Problem) and p.source == name
    assert p.problem and p.answer
    assert "Please reason step by step" not in p.problem
  if name.startswith("gsm8k"):
    assert all("," not in p.answer and "####" not in p.answer for p in problems)


def test_benchmark_golds():
  first = load_benchmark("gsm8k_test")[0]
  assert first.answer == "18" and first.problem.startswith("Janet")
  assert first.id == "gsm8k_test-0"
  math500 = load_benchmark("math500")[0]
  assert math500.answer == r"\left( 3, \frac{\pi}{2} \right)"
  assert math500.problem.endswith(r"$0 \le \theta < 2 \pi.$")
  assert set(BENCHMARKS) == {"aime24", "aime25", "amc2023", "math500", "gsm8k_test",
                             "gsm8k_train"}
  with pytest.raises(ValueError, match="unknown benchmark 'aime23'.*'aime24'"):
    load_benchmark("aime23")


def test_read_problems_formats(tmp_path):
  path = tmp_path / "mixed.jsonl"
  path.write_text("\n".join([
      json.dumps({"question": "How many?", "answer": "2 + 2 = 4\n#### 1,234"}),
      "",
      json.dumps({"problem": "Find x.\nPlease reason step by step, and put your final answer "
                             "within \\boxed{}.", "answer": 12, "id": "p7"}),
  ]) + "\n")
  a, b = read_problems(str(path), name="mix")
  assert a == Problem("mix-0", "How many?", "1234", "mix")
  assert b == Problem("p7", "Find x.", "12", "mix")


@pytest.mark.parametrize("line,error", [
    ("{not json", "invalid JSON"),
    (json.dumps({"problem": "p"}), "field 'answer' is missing"),
    (json.dumps({"text": "p", "answer": "1"}), "missing field 'problem'"),
    (json.dumps({"question": "q", "answer": "no marker"}), "no '#### <gold>' line"),
    (json.dumps(["problem", "answer"]), "a JSON list"),
    (json.dumps({"problem": "p", "answer": " "}), "field 'answer' is empty"),
])
def test_read_problems_bad_line(tmp_path, line, error):
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps({"problem": "ok", "answer": "1"}) + "\n" + line + "\n")
  with pytest.raises(ValueError, match=f"bad.jsonl:2: .*{error}"):
    read_problems(str(path))


def test_read_problems_missing_or_empty(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    read_problems(str(tmp_path / "nope.jsonl"))
  (tmp_path / "empty.jsonl").write_text("\n")
  with pytest.raises(ValueError, match="no problems"):
    read_problems(str(tmp_path / "empty.jsonl"))


def test_read_problems_directory_is_reported_as_one(tmp_path):
  with pytest.raises(IsADirectoryError, match=rf"problems file {tmp_path} is a directory; "
                                              r"expected a JSONL file"):
    read_problems(str(tmp_path))


def test_read_problems_is_the_one_reader(tmp_path):
  """GSM8K golds, the instruction stripped, per-thread problems (the toy tasks' and GRPO's
  files) and bundled names, all through read_problems."""
  path = tmp_path / "train.jsonl"
  instruction = "Please reason step by step, and put your final answer within \\boxed{}."
  path.write_text("\n".join([
      json.dumps({"question": f"Ann has 1,000 apples. How many?\n{instruction}",
                  "answer": "She keeps them all.\n#### 1,000"}),
      json.dumps({"id": "relay-3", "problem": ["clue A", f"clue B {instruction}", "clue C"],
                  "answer": "7", "threads": ["ignored"]}),
  ]) + "\n")
  gsm, relay = read_problems(str(path))
  assert gsm == Problem("train-0", "Ann has 1,000 apples. How many?", "1000", "train")
  assert relay == Problem("relay-3", ("clue A", "clue B", "clue C"), "7", "train")
  assert read_problems("aime24") == load_benchmark("aime24")
  with pytest.raises(FileNotFoundError, match="nor is it one of the bundled benchmarks"):
    read_problems("aime23")


@pytest.mark.parametrize("line,error", [
    ("{not json", r"bad.jsonl:2: invalid JSON"),
    (json.dumps({"problem": [], "answer": "1"}), r"bad.jsonl:2: field 'problem' is an empty list"),
    (json.dumps({"problem": ["a", 3], "answer": "1"}),
     r"bad.jsonl:2: field 'problem'\[1\] is 3"),
])
def test_read_problems_bad_per_thread_line(tmp_path, line, error):
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps({"problem": ["a", "b"], "answer": "1"}) + "\n" + line + "\n")
  with pytest.raises(ValueError, match=error):
    read_problems(str(path))


def test_grading_modules_import_no_heavy_stack():
  """The grading modules (what a Grader worker imports) pull in no jax, torch, fastapi or
  matplotlib, nor sympy before the first equivalence check. The package's own __init__ is
  bypassed: whether `import lace_jax` is light is that module's concern."""
  import lace_jax
  code = ("import sys, types\n"
          "pkg = types.ModuleType('lace_jax')\n"
          f"pkg.__path__ = [{os.path.dirname(lace_jax.__file__)!r}]\n"
          "sys.modules['lace_jax'] = pkg\n"
          "import lace_jax.grading\n"
          "print(sorted(m for m in ('jax', 'torch', 'fastapi', 'matplotlib', 'sympy') "
          "if m in sys.modules))\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout + out.stderr


# ----- budget metrics (issue 29): pass@k and maj@k for every k, against brute-force enumeration

def _subsets(n, k):
  return list(itertools.combinations(range(n), k))


@pytest.mark.parametrize("answers,gold", [
    (["4", "5", "4", None, "5", "5"], "4"),  # a 2-2 tie inside many subsets: the earlier wins
    (["1", "2", "3", "4"], "3"),
    ([None, None, "7"], "7"),
    (["a", "b", "a", "b", "c", "a", "b", "c", "c"], "c"),
    ([None] * 4, "1"),
])
def test_maj_at_k_equals_majority_vote_over_every_subset(answers, gold):
  n = len(answers)
  for k in range(1, n + 1):
    votes = [majority_vote([answers[t] for t in s]) for s in _subsets(n, k)]
    brute = sum(v == gold for v in votes) / len(votes)
    assert maj_at_k(answers, lambda a: a == gold, k) == pytest.approx(brute, abs=1e-15), k
  assert maj_at_k(answers, lambda a: a == gold, n) == float(majority_vote(answers) == gold)


@pytest.mark.parametrize("n,c", [(1, 0), (1, 1), (4, 0), (4, 1), (4, 3), (6, 2), (8, 8)])
def test_pass_at_k_equals_the_share_of_subsets_with_a_correct_thread(n, c):
  right = [True] * c + [False] * (n - c)
  for k in range(1, n + 1):
    subsets = _subsets(n, k)
    brute = sum(any(right[t] for t in s) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-15)


def test_eval_budget_metrics_on_a_hand_made_batch():
  """Two problems of W = 4 threads with known lengths and answers: every metric by hand."""
  from lace_jax import evaluate
  p1 = LatticeAnswer(answers=["4", "4", "5", None], tags=[None] * 4, best=2, answer="5",
                     format_ok=True, format_error=None)
  p2 = LatticeAnswer(answers=["7", "8", "8", "7"], tags=[None] * 4, best=0, answer="7",
                     format_ok=True, format_error=None)
  # verdicts: [[best]] answer, the W-thread vote, then each thread (gold 4, then gold 7)
  r1 = evaluate.problem_metrics(p1, [False, True, True, True, False, False], [10, 30, 20, 5])
  r2 = evaluate.problem_metrics(p2, [True, True, True, False, False, True], [8, 8, 8, 8])
  assert (r1["tokens_per_query"], r1["critical_path_tokens"]) == (65, 30)
  assert (r2["tokens_per_query"], r2["critical_path_tokens"]) == (32, 8)
  assert r1["mean_acc"] == 0.5 and r1["lace_acc"] == 0.0 and r2["lace_acc"] == 1.0
  # pass@k with 2 of 4 right: 1 - C(2, k) / C(4, k)
  assert r1["pass@k"] == [0.5, 1 - 1 / 6, 1.0, 1.0] == r2["pass@k"]
  # maj@k by hand. Problem 1 (4, 4, 5, None; gold 4): k=1 -> 2/4; k=2: of the 6 pairs, {0,1}
  # {0,3} {1,3} vote 4, {0,2} {1,2} vote 4 (the tie goes to the earlier thread), {2,3} votes 5:
  # 5/6; k=3: {0,1,2} {0,1,3} {0,2,3} {1,2,3} -> 4, 4, 4 (tie, earlier), 4: 1; k=4: 1.
  assert r1["maj@k"] == pytest.approx([0.5, 5 / 6, 1.0, 1.0])
  # problem 2 (7, 8, 8, 7; gold 7): k=1 1/2; k=2: {0,1} 7 (tie) {0,2} 7 {0,3} 7 {1,2} 8 {1,3} 8
  # {2,3} 8 -> 1/2; k=3: {0,1,2} 8, {0,1,3} 7, {0,2,3} 7, {1,2,3} 8 -> 1/2; k=4: tie, 7 first: 1
  assert r2["maj@k"] == pytest.approx([0.5, 0.5, 0.5, 1.0])
  m = evaluate.aggregate([{**r1, "diversity": 0.0, "seconds_per_query": 1.0},
                          {**r2, "diversity": 0.0, "seconds_per_query": 3.0}], 4)
  assert m["tokens_per_query"] == 48.5 and m["critical_path_tokens"] == 19.0
  assert m["tokens_per_correct"] == 97 / 1  # 97 tokens, one problem right by [[best]]
  assert m["maj@2"] == pytest.approx((5 / 6 + 0.5) / 2) and m["pass@4"] == 1.0
  assert m["seconds_per_query"] == 2.0 and m["problems"] == 2
  none = evaluate.aggregate([{**r1, "diversity": 0.0, "seconds_per_query": 1.0}], 4)
  assert none["tokens_per_correct"] is None


def test_maj_curve_equals_maj_at_k_for_every_k_on_random_votes():
  """The generating-function count of maj@1..n against the subset enumeration, bit for bit,
  on 400 random vote patterns (ties, unanswered threads, several correct clusters)."""
  rng = random.Random(0)
  for _ in range(400):
    n = rng.randint(1, 10)
    pool = [None] + [str(i) for i in range(rng.randint(1, 5))]
    answers = [rng.choice(pool) for _ in range(n)]
    good = {a: rng.random() < 0.5 for a in pool if a is not None}
    assert maj_curve(answers, good.__getitem__) == [
        maj_at_k(answers, good.__getitem__, k) for k in range(1, n + 1)], (answers, good)


def test_maj_curve_is_fast_and_exact_for_many_samples():
  n = 64  # 2^64 subsets: no enumeration could count them
  curve = maj_curve(["1"] * 40 + ["2"] * 24, lambda a: a == "1")
  assert len(curve) == n and curve[0] == 40 / 64 and curve[-1] == 1.0
  assert all(0.0 <= a <= 1.0 for a in curve)
  assert curve[31] < curve[63]  # more samples, closer to the majority's answer
  # every answer different: the vote is the subset's first thread (every count ties at 1),
  # right when that thread is one of the first 16: 1 - C(48, k) / C(64, k)
  distinct = maj_curve([str(i) for i in range(n)], lambda a: int(a) < 16)
  assert distinct == pytest.approx([1 - math.comb(48, k) / math.comb(64, k)
                                    for k in range(1, n + 1)], abs=1e-15)
  assert maj_curve([None] * 5, lambda a: True) == [0.0] * 5


def test_budget_curve_and_the_matched_reading():
  """Independent + Voting's curve from an n-sample evaluation, read at a token budget."""
  from lace_jax import evaluate
  # 4 samples per problem, 40 tokens per problem on average: 10 per sample
  m = {"tokens_per_query": 40.0, "maj@1": 0.3, "maj@2": 0.4, "maj@3": 0.6, "maj@4": 0.7}
  curve = evaluate.budget_curve(m, 4)
  assert curve == [(10.0, 0.3), (20.0, 0.4), (30.0, 0.6), (40.0, 0.7)]
  hit = evaluate.at_budget(curve, 25.0)  # 2.5 samples: halfway between maj@2 and maj@3
  assert hit == {"tokens": 25.0, "samples": 2.5, "acc": pytest.approx(0.5), "covered": True}
  assert evaluate.at_budget(curve, 30.0)["acc"] == 0.6
  assert evaluate.at_budget(curve, 40.0) == {"tokens": 40.0, "samples": 4.0, "acc": 0.7,
                                              "covered": True}
  over = evaluate.at_budget(curve, 55.0)  # more than 4 samples buy: the end, marked
  assert over["acc"] == 0.7 and over["samples"] == 5.5 and not over["covered"]
  under = evaluate.at_budget(curve, 5.0)
  assert under["acc"] == 0.3 and not under["covered"]
  b = evaluate.budget_metrics(m, 4, 25.0)
  assert b["matched_acc"] == pytest.approx(0.5) and b["matched_samples"] == 2.5
  assert b["tokens_per_sample"] == 10.0 and b["budget_curve"] == curve and b["samples"] == 4
  rows = evaluate.budget_table({"budget": {"toy": {**m, **b}}}).splitlines()
  assert rows[-1] == "| budget | toy | 25.0 | 10.0 | 2.50 | 50.0 | 30.0 | 4 | 70.0 |"
  assert evaluate.budget_table({"model": {"toy": m}}) == ""
