"""Accuracy ceilings of idealised policies on the toy pair search (docs/results.md, "Why").

  python benchmarks/toy_ceilings.py [--items 12 --threads 4 --trials 3 --samples 200000]

Monte Carlo over problems whose answer is item 0 (by symmetry, any item):
  isolated     each thread tries `trials` random distinct items with no coordination; the
               system is right iff exactly one thread finds the item (one [[best]] tag)
  exclusion    threads avoid items tried in earlier rounds but pick independently within a
               round (no symmetry breaking); right iff exactly one thread finds it
  independent  W single-thread samples, each tries `trials` items, else guesses an untried one;
               majority vote (ties: first answer seen)
"""

import argparse
import random
from collections import Counter


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--items", type=int, default=12)
  p.add_argument("--threads", type=int, default=4)
  p.add_argument("--trials", type=int, default=3)
  p.add_argument("--samples", type=int, default=200_000)
  a = p.parse_args()
  n_items, w, k = a.items, a.threads, a.trials
  rng = random.Random(0)

  def isolated():
    return sum(0 in rng.sample(range(n_items), k) for _ in range(w)) == 1

  def exclusion():
    seen = set()
    for _ in range(k):
      pool = [i for i in range(n_items) if i not in seen]
      picks = [rng.choice(pool) for _ in range(w)]
      if 0 in picks:
        return picks.count(0) == 1
      seen |= set(picks)
    return False

  def independent():
    answers = []
    for _ in range(w):
      tried = rng.sample(range(n_items), k)
      answers.append(0 if 0 in tried else rng.choice([i for i in range(n_items)
                                                      if i not in tried]))
    return Counter(answers).most_common(1)[0][0] == 0

  for name, fn in (("isolated", isolated), ("exclusion", exclusion),
                   ("independent", independent)):
    print(f"{name}: {sum(fn() for _ in range(a.samples)) / a.samples:.3f}")


if __name__ == "__main__":
  main()
