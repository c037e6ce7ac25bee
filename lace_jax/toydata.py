"""A small multi-thread dataset and tokenizer bundled with the package, for `:runlocal`
experiments and tests on CPU.

The task (a cheap search with a verifiable answer): find the x in [1, n] with
(a * x + b) mod m = r, where m is a prime above n so x is unique. Thread w of W is handed the
values it should check (per-thread prompts); it reports each trial, and the thread that finds x
stops and tags itself [[best]]; the others finish their range, then take the answer found by
the other thread and tag themselves [[success]]. Only a model whose threads can read each other
can write the second kind of thread correctly.

  python -m lace_jax.toydata --out lace_jax/assets   # regenerates the bundled files
"""

from __future__ import annotations

import argparse
import json
import os
import random

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from lace_jax.tokenizer import ENDOFTEXT, IM_END, IM_START, chat_prompt

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
TOY_DATA = os.path.join(ASSETS, "toy_search.jsonl")
TOY_TOKENIZER = os.path.join(ASSETS, "toy_tokenizer.json")
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, "<think>", "</think>")
TOY_INSTRUCTION = "You are one of {num_threads} threads. End with \\boxed{{x}} and one tag."


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
