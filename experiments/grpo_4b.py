"""Stage 3, Lattice GRPO, Qwen3-4B (the paper: 6474 RL questions).

  python -m lace_jax.main --config=experiments/grpo_4b.py --workdir=runs/grpo_4b \
      --config.model.checkpoint=runs/sft_4b/export
  python -m lace_jax.main --config=experiments/grpo_4b.py:runlocal --workdir=/tmp/grpo

One rollout = one W-thread lattice; G rollouts per question; reward = verified accuracy of the
[[best]] thread + lambda_div * thread diversity, shared by every token of the rollout.

The recipe of `grpo_1p7b.py` on the 4B preset (its lattice band: layers 18, 20, ..., 34), with
the learning rate for the larger model.
"""

from lace_jax import experiment


def get_config(arg=None):
  cfg = experiment.sibling(__file__, "grpo_1p7b").get_config(arg)
  if arg != "runlocal":
    experiment.with_preset(cfg, "qwen3-4b")
    cfg.optim.lr = 5e-7
  return cfg
