"""Stage 3, Lattice GRPO, Qwen3-1.7B (the paper: 1959 RL questions).

  python -m lace_jax.main --config=experiments/grpo_1p7b.py --workdir=runs/grpo_1p7b \
      --config.model.checkpoint=runs/sft_1p7b/export
  python -m lace_jax.main --config=experiments/grpo_1p7b.py:runlocal --workdir=/tmp/grpo

One rollout = one W-thread lattice; G rollouts per question; reward = verified accuracy of the
[[best]] thread + lambda_div * thread diversity, shared by every token of the rollout.
"""

from lace_jax import experiment


def get_config(arg=None):
  return experiment.grpo_config("qwen3-1.7b", lr=1e-6, steps=500, questions_per_step=16,
                                rollouts_per_question=8, max_new_tokens=4096,
                                runlocal_=arg == "runlocal")
