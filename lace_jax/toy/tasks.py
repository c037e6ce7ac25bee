"""Toy tasks and tokenizers for CPU-scale experiments.

1. The bundled `:runlocal` dataset (`assets/toy_search.jsonl`, `assets/toy_tokenizer.json`),
   described below, used by the `:runlocal` experiment variants and the tests.
2. The two tasks of the toy-scale comparison (`lace_jax.toy.comparison`, `experiments/toy_*.py`), written
   in a word-level vocabulary (`word_tokenizer`) so every word is one token and the rounds of
   different threads fall on the same grid columns:
   - relay: thread w's prompt holds a private digit d_w; every thread must answer the sum of
     all W digits. Without cross-thread communication the best possible accuracy is 10% (the
     other digits are uniform and independent of the prompt).
   - pair search: all threads share one list of N lettered items, each with two digits; exactly
     one item's digits add to the target. A trial costs 7 tokens ("F 3 + 5 = 8 no"), the
     per-thread budget is `trials` of them, and N = W * trials, so only threads that divide the
     items between them and share the one that is found are sure to answer within the budget.

The task (a cheap search with a verifiable answer): find the x in [1, n] with
(a * x + b) mod m = r, where m is a prime above n so x is unique. Thread w of W is handed the
values it should check (per-thread prompts); it reports each trial, and the thread that finds x
stops and tags itself [[best]]; the others finish their range, then take the answer found by
the other thread and tag themselves [[success]]. Only a model whose threads can read each other
can write the second kind of thread correctly.

  python -m lace_jax.toy.tasks --out lace_jax/assets   # regenerates the bundled files
"""

from __future__ import annotations

import argparse
import json
import os
import random

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from lace_jax.tokenizer import ENDOFTEXT, IM_END, IM_START, chat_prompt

from lace_jax.bundled import ASSETS, TOY_DATA, TOY_INSTRUCTION, TOY_TOKENIZER  # noqa: E402
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, "<think>", "</think>")


def _next_prime(n: int) -> int:
  p = n + 1
  while any(p % d == 0 for d in range(2, int(p**0.5) + 1)):
    p += 1
  return p


def search_record(rng: random.Random, idx: int, num_threads: int = 4,
                  per_thread: int = 4) -> dict:
  n = num_threads * per_thread
  m = _next_prime(n + rng.randint(0, 12))
  a, b = rng.randint(2, m - 1), rng.randint(0, m - 1)
  x = rng.randint(1, n)
  r = (a * x + b) % m
  base = f"Find x from 1 to {n} with ({a}*x+{b}) mod {m} = {r}."
  finder = (x - 1) // per_thread
  problems, threads, tags = [], [], []
  for w in range(num_threads):
    lo, hi = w * per_thread + 1, (w + 1) * per_thread
    problems.append(f"{base} Thread {w + 1}: check x from {lo} to {hi}.")
    stop = x if w == finder else hi
    trials = " ".join(f"x={v}: {(a * v + b) % m}." for v in range(lo, stop + 1))
    if w == finder:
      threads.append(f"{trials} Found x={x}. \\boxed{{{x}}} [[best]]")
      tags.append("[[best]]")
    else:
      threads.append(f"{trials} Not mine; thread {finder + 1} found x={x}. \\boxed{{{x}}} [[success]]")
      tags.append("[[success]]")
  return {"id": f"toy-search-{idx}", "problem": problems, "threads": threads, "answer": str(x),
          "tags": tags}


def make_records(num: int, seed: int = 0, num_threads: int = 4, per_thread: int = 4) -> list[dict]:
  rng = random.Random(seed)
  return [search_record(rng, i, num_threads, per_thread) for i in range(num)]


# ------------------------------------------------------------------ word-level toy tasks

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
RELAY_WORDS = ("my", "number", "is", "give", "the", "sum", "of", "all", "numbers", ".")
SEARCH_WORDS = ("items", "find", "item", "whose", "add", "to", "+", "=", "no", "yes", "found",
                "other", "guess", ".")


def word_tokenizer(max_number: int = 40) -> tokenizers.Tokenizer:
  """A word-level tokenizer (whitespace split, decoded by joining with spaces) covering the
  toy tasks: the chat special tokens, numbers 0..max_number, capital letters, the tasks' words,
  `\\boxed{x}` for every number and letter, and the three tags."""
  words = [*SPECIAL_TOKENS, "[UNK]", "system", "user", "assistant"]
  atoms = [str(i) for i in range(max_number + 1)] + list(LETTERS)
  words += atoms + [f"\\boxed{{{a}}}" for a in atoms] + ["[[best]]", "[[success]]", "[[fail]]"]
  words += [w for w in RELAY_WORDS + SEARCH_WORDS if w not in words]
  tok = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)},
                                              unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
  tok.add_special_tokens(list(SPECIAL_TOKENS))
  return tok


def relay_record(rng: random.Random, idx: int, num_threads: int) -> dict:
  digits = [rng.randint(0, 9) for _ in range(num_threads)]
  total = sum(digits)
  return {"id": f"relay-{idx}",
          "problem": [f"my number is {d} . give the sum of all numbers ." for d in digits],
          "threads": [f"\\boxed{{{total}}}"] * num_threads, "answer": str(total)}


def pair_search_problem(rng: random.Random, num_items: int) -> tuple[str, list[tuple], int]:
  """(problem text, [(letter, a, b)], index of the one item whose digits add to the target)."""
  if num_items > len(LETTERS):
    raise ValueError(f"num_items={num_items} > {len(LETTERS)} letters")
  target_idx = rng.randrange(num_items)
  a, b = rng.randint(0, 9), rng.randint(0, 9)
  target = a + b
  items = []
  for i in range(num_items):
    if i == target_idx:
      items.append((LETTERS[i], a, b))
      continue
    while True:
      x, y = rng.randint(0, 9), rng.randint(0, 9)
      if x + y != target:
        items.append((LETTERS[i], x, y))
        break
  listing = " ".join(f"{c} {x} {y}" for c, x, y in items)
  return (f"items {listing} . find the item whose numbers add to {target} .", items, target_idx)


def _trial(item, target: int) -> str:
  c, x, y = item
  return f"{c} {x} + {y} = {x + y} {'yes' if x + y == target else 'no'}"


def pair_search_record(rng: random.Random, idx: int, num_threads: int, num_items: int,
                       trials: int, problem: tuple[str, list[tuple], int] | None = None) -> dict:
  """One problem with W coordinated threads (W = 1: one thread on its own budget).

  W > 1: the items are dealt out, round r giving thread w item order[r * W + w]; every thread
  reports its trial each round; in the round the item is found, its finder ends with
  "found X \\boxed{X} [[best]]" and every other thread with "other X \\boxed{X} [[success]]"
  (which only a thread that reads the finder can write). W = 1: the thread tries `trials`
  random items; found -> "found X ..."; not found -> "guess Y \\boxed{Y} [[best]]" with Y a
  random untried item (the single thread always ships its answer). `problem`: a problem from
  `pair_search_problem` (default: a fresh one).
  """
  problem, items, t = problem or pair_search_problem(rng, num_items)
  target = items[t][1] + items[t][2]
  answer = items[t][0]
  order = list(range(num_items))
  rng.shuffle(order)
  if num_threads == 1:
    tried = order[:trials]
    lines = []
    for i in tried:
      lines.append(_trial(items[i], target))
      if i == t:
        break
    if t in tried:
      lines.append(f"found {answer} \\boxed{{{answer}}} [[best]]")
    else:
      guess = items[rng.choice([i for i in order if i not in tried])][0]
      lines.append(f"guess {guess} \\boxed{{{guess}}} [[best]]")
    return {"id": f"pair-{idx}", "problem": problem, "threads": [" ".join(lines)],
            "answer": answer, "tags": ["[[best]]"]}
  if num_threads * trials < num_items:
    raise ValueError(f"W={num_threads} threads x {trials} trials cannot cover {num_items} items")
  pos = order.index(t)
  rounds, finder = pos // num_threads + 1, pos % num_threads
  threads, tags = [], []
  for w in range(num_threads):
    lines = [_trial(items[order[r * num_threads + w]], target) for r in range(rounds)
             if r * num_threads + w < num_items]
    tag = "[[best]]" if w == finder else "[[success]]"
    lines.append(f"{'found' if w == finder else 'other'} {answer} \\boxed{{{answer}}} {tag}")
    threads.append(" ".join(lines))
    tags.append(tag)
  return {"id": f"pair-{idx}", "problem": problem, "threads": threads, "answer": answer,
          "tags": tags}


def train_tokenizer(texts: list[str], vocab_size: int = 1024) -> tokenizers.Tokenizer:
  """Byte-level BPE with single-digit tokens and the Qwen3 chat special tokens."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(texts, trainer)
  return tok


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=ASSETS)
  parser.add_argument("--num", type=int, default=256)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  records = make_records(args.num, args.seed)
  with open(os.path.join(args.out, os.path.basename(TOY_DATA)), "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  texts = [chat_prompt(p) + t for r in records for p, t in zip(r["problem"], r["threads"])]
  texts.append(TOY_INSTRUCTION)
  train_tokenizer(texts).save(os.path.join(args.out, os.path.basename(TOY_TOKENIZER)))
  print(f"wrote {len(records)} records and a tokenizer to {args.out}")


if __name__ == "__main__":
  main()
