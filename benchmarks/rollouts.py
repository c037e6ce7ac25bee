"""GRPO-shaped rollouts: useful tokens/s of the generation engine (`lace_jax.engine`) vs the
static lockstep sampler (`lace_jax.sample`), in one run, and the prefill work prompt sharing
saves.

  python benchmarks/rollouts.py                      # tiny preset, W = 4, G = 8, 4 questions
  python benchmarks/rollouts.py --max_new_tokens=256 --questions=8

Rollouts: `questions` prompts x G rollouts of W threads, sampled (temperature 1). Each rollout
gets a length, the column its lattice ends at, as reasoning produces them: log-normal (median
30% of max_new_tokens), clipped to [10%, 100%] of it ("skewed"), or all max_new_tokens
("equal"). The engine gets each rollout's length as its max_new_tokens and S = `slots` slots;
`sample` runs the G rollouts of a question as one batch of the same S rows (the same cache
memory), with max_new_tokens = that batch's longest length, as if every thread had stopped
exactly at its length and the batch's early exit came at once (the best case for `sample`:
no wasted column after its longest lattice). Useful tokens: the rollouts' lengths x W, the
same for both. Every shape is compiled before the timed run.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

import lace_jax as lj
from lace_jax import engine, sampling


def _lengths(kind: str, count: int, n: int, rng: np.random.Generator) -> np.ndarray:
  if kind == "equal":
    return np.full(count, n, np.int64)
  drawn = n * np.exp(rng.normal(np.log(0.3), 0.6, count))
  return np.clip(np.round(drawn), max(1, n // 10), n).astype(np.int64)


def _run_sample(model, params, prompts, lengths, args) -> float:
  """Seconds for `sample` over the rollouts, one batch per question (its G rollouts)."""
  g, w = args.group, args.threads
  start = time.perf_counter()
  for q in range(0, len(prompts), g):
    out = sampling.sample(model, params, prompts[q:q + g], num_threads=w,
                          max_new_tokens=int(lengths[q:q + g].max()), temperature=1.0, seed=q,
                          prompt_width=args.prompt_len)
    out.tokens.sum()  # on the host: the call has finished
  return time.perf_counter() - start


def _run_engine(eng, prompts, lengths) -> float:
  requests = [engine.Request(p, int(n), temperature=1.0, seed=i)
              for i, (p, n) in enumerate(zip(prompts, lengths))]
  start = time.perf_counter()
  eng.generate(requests)
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="tiny")
  parser.add_argument("--threads", type=int, default=4, help="W")
  parser.add_argument("--group", type=int, default=8, help="G, rollouts per question")
  parser.add_argument("--questions", type=int, default=4)
  parser.add_argument("--slots", type=int, default=8, help="the engine's S (= sample's batch)")
  parser.add_argument("--max_new_tokens", type=int, default=128)
  parser.add_argument("--prompt_len", type=int, default=32, help="tokens per question prompt")
  parser.add_argument("--decode_chunk", type=int, default=16)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  cfg = lj.ModelConfig.preset(args.preset)
  model, params = lj.build_model(cfg, lj.LatticeConfig.default(cfg), seed=args.seed)
  rng = np.random.default_rng(args.seed)
  questions = [rng.integers(1, cfg.vocab_size, args.prompt_len).tolist()
               for _ in range(args.questions)]
  prompts = [q for q in questions for _ in range(args.group)]  # G rollouts per question
  n = args.max_new_tokens
  # a fresh engine per run (an empty prompt store); its programs are compiled once
  new_engine = lambda: engine.Engine(model, params, slots=args.slots, num_threads=args.threads,
                                     max_prompt_len=args.prompt_len, max_new_tokens=n,
                                     decode_chunk=args.decode_chunk)
  report = dict(device=jax.devices()[0].device_kind, preset=args.preset, W=args.threads,
                G=args.group, questions=args.questions, slots=args.slots, max_new_tokens=n)
  for kind in ("skewed", "equal"):
    lengths = _lengths(kind, len(prompts), n, rng)
    useful = int(lengths.sum()) * args.threads
    # compile every shape first (the same calls, untimed)
    _run_sample(model, params, prompts, lengths, args)
    _run_engine(new_engine(), prompts, lengths)
    eng = new_engine()
    t_engine = _run_engine(eng, prompts, lengths)
    t_sample = _run_sample(model, params, prompts, lengths, args)
    prefilled = eng.stats.prefill_rows
    report[kind] = dict(
        useful_tokens=useful, length_mean=float(lengths.mean()), length_min=int(lengths.min()),
        sample_s=round(t_sample, 3), engine_s=round(t_engine, 3),
        sample_tokens_per_s=round(useful / t_sample, 1),
        engine_tokens_per_s=round(useful / t_engine, 1),
        engine_over_sample=round(t_sample / t_engine, 3),
        engine_columns=eng.stats.columns,
        sample_columns=int(sum(lengths[q:q + args.group].max()
                               for q in range(0, len(prompts), args.group))),
        prompt_grids_prefilled=prefilled, rollouts=eng.stats.admitted,
        sample_prompt_grids_prefilled=len(prompts))
    print(f"{kind:6s}: engine {useful / t_engine:8.1f} tok/s, sample {useful / t_sample:8.1f} "
          f"tok/s, ratio {t_sample / t_engine:.2f}x; prompt grids prefilled: engine {prefilled},"
          f" sample {len(prompts)} ({len(prompts)} rollouts of {args.questions} questions)",
          flush=True)
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
