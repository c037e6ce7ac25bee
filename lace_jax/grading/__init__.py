"""Grading: answers out of thread texts and their aggregates (`answers`), answer equivalence
with math-verify behind a process pool with wall-clock timeouts (`verify`), and problems with
gold answers, bundled or from JSONL (`problems`).

The modules here import neither jax nor sympy (sympy loads on the first equivalence check):
Grader workers import them by name, and light tools can use them without the model stack.
"""

from lace_jax.grading.answers import (BEST, LatticeAnswer, extract_boxed, extract_tag,
                                      maj_at_k, maj_curve, majority_vote, parse_lattice, pass_at_k)
from lace_jax.grading.problems import BENCHMARKS, Problem, load_benchmark, read_problems
from lace_jax.grading.verify import Grader, is_equivalent

__all__ = ["BENCHMARKS", "BEST", "Grader", "LatticeAnswer", "Problem", "extract_boxed",
           "extract_tag", "is_equivalent", "load_benchmark", "maj_at_k", "maj_curve", "majority_vote",
           "parse_lattice", "pass_at_k", "read_problems"]
