"""Evaluation of a LACE Qwen3-4B checkpoint on AIME 2024/2025, AMC 2023, MATH-500 and GSM8K,
side by side with the same weights without the lattice (the Isolated Parallel ablation).

  python -m lace_jax.main --config=experiments/eval_4b.py --workdir=runs/eval_4b \
      --config.model.checkpoint=runs/grpo_4b/export
  python -m lace_jax.main --config=experiments/eval_4b.py:runlocal --workdir=/tmp/eval

Reports LACE accuracy (the [[best]] thread), Independent + Voting (maj@W), mean@W, pass@k,
format adherence, exploration diversity, tokens per query and latency (results.md / .json).
"""

from lace_jax import experiment


def get_config(arg=None):
  return experiment.eval_config("qwen3-4b", num_threads=4, max_new_tokens=8192,
                                runlocal_=arg == "runlocal")
