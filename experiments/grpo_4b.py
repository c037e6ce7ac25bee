"""Stage 3, Lattice GRPO, Qwen3-4b (qwen3-4b; the paper used 6474 RL questions at this size).

  python -m lace_jax.main --config=experiments/grpo_4b.py --workdir=runs/grpo_4b \
      --config.model.checkpoint=runs/sft_4b/export
  python -m lace_jax.main --config=experiments/grpo_4b.py:runlocal --workdir=/tmp/grpo

One rollout = one W-thread lattice; G rollouts per question; reward = verified accuracy of the
[[best]] thread + lambda_div * thread diversity, shared by every token of the rollout.
"""

import ml_collections

from lace_jax import experiment


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  cfg = experiment.base_config("grpo", "qwen3-4b", remat="full")
  cfg.data = experiment.data_section(path="data/rl/train.jsonl", num_threads=4, max_len=1024,
                                     loss_on="generated", shuffle_threads=False)
  cfg.train = experiment.train_section(steps=500, batch_size=16, trainable="all", save_every=50,
                                       log_every=1)
  cfg.optim = experiment.optim_section(lr=5e-7, warmup_steps=10, weight_decay=0.0)
  cfg.grpo = ml_collections.ConfigDict({
      "rollouts_per_question": 8,  # G
      "max_new_tokens": 4096,
      "temperature": 1.0, "top_p": 1.0, "top_k": 0,
      "eps_low": 0.2, "eps_high": 0.28,
      "kl_beta": 0.0,  # k3 KL to the frozen reference
      "lambda_div": 0.1,
      "reward_mode": "thread_aggregated",  # thread_aggregated | per_thread
      "loss_agg": "token_mean",  # token_mean | dr_grpo
      "inner_updates": 1,  # mu
  })
  if arg == "runlocal":
    experiment.runlocal(cfg)
    cfg.train.update(steps=3, batch_size=2, save_every=3)
    cfg.grpo.update(rollouts_per_question=2, max_new_tokens=32)
    cfg.optim.update(lr=1e-4, warmup_steps=1)
  return cfg
