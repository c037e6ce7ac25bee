"""Evaluation of a LACE Qwen3-4B checkpoint on AIME 2024/2025, AMC 2023, MATH-500 and GSM8K,
side by side with the same weights without the lattice (the Isolated Parallel ablation).

  python -m lace_jax.main --config=experiments/eval_4b.py --workdir=runs/eval_4b \
      --config.model.checkpoint=runs/grpo_4b/export
  python -m lace_jax.main --config=experiments/eval_4b.py:runlocal --workdir=/tmp/eval

Reports LACE accuracy (the [[best]] thread), Independent + Voting (maj@W), mean@W, pass@k,
format adherence, exploration diversity, tokens per query and latency (results.md / .json).
"""

import ml_collections

from lace_jax import experiment


def get_config(arg=None):
  cfg = experiment.base_config("eval", "qwen3-4b")
  cfg.eval = ml_collections.ConfigDict({
      # bundled benchmark names, or JSONL files of problems (labelled by file name)
      "datasets": ("aime24", "aime25", "amc2023", "math500", "gsm8k_test"),
      "num_threads": 4,  # W
      "max_new_tokens": 8192,
      "temperature": 0.6, "top_p": 0.95, "top_k": 20,  # Qwen3's thinking-mode sampling
      "batch_size": 8,  # problems per lockstep batch (each W threads)
      "limit": 0,  # problems per dataset; 0 = all
      # lattice_off: same weights, no side path; add "budget" for Independent + Voting at
      # the "model" variant's total tokens (eval.budget)
      "variants": ("model", "lattice_off"),
      "checkpoints": (),  # more HF directories to compare side by side
      "instruction": "default",  # format note appended to each prompt; "" for none
      "thinking": True,
      "grader_workers": 4, "grader_timeout_s": 10.0,
      # lattices of each dataset's first batch measured for the thread-level diagnostics
      # (lattice/cross_thread, lattice/entropy, lattice/gate; lace_jax.diagnostics); 0 = none
      "diagnostics_rollouts": 8,
      # the "budget" variant: `samples` independent samples per problem (enough to pass the
      # matched budget: 2-4 x num_threads) from `checkpoint` (a base model's HF directory; ""
      # = these weights without the lattice), read at the total tokens of variant `match`
      "budget": {"samples": 16, "checkpoint": "", "match": "model"},
  })
  # the accelerators this recipe is made to fit: --config.plan.target=default plans them
  cfg.plan = experiment.plan_section("cuda:h100x8", "tpu:v5p:2x2x2", "cuda:rtx6000pro")
  if arg == "runlocal":
    experiment.runlocal(cfg)
    cfg.eval.update(max_new_tokens=32, limit=4, batch_size=4, grader_workers=2,
                    variants=("model", "lattice_off", "budget"))
    cfg.eval.budget.samples = 8
  return cfg
