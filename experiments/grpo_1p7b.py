"""Stage 3, Lattice GRPO, Qwen3-1.7B (the paper: 1959 RL questions).

  python -m lace_jax.main --config=experiments/grpo_1p7b.py --workdir=runs/grpo_1p7b \
      --config.model.checkpoint=runs/sft_1p7b/export
  python -m lace_jax.main --config=experiments/grpo_1p7b.py:runlocal --workdir=/tmp/grpo

One rollout = one W-thread lattice; G rollouts per question; reward = verified accuracy of the
[[best]] thread + lambda_div * thread diversity, shared by every token of the rollout.
"""

from lace_jax import experiment


def get_config(arg=None):
  cfg = experiment.base_config("grpo", "qwen3-1.7b", remat="full")
  cfg.data = experiment.questions_section(path="gsm8k_train", num_threads=4, prompt_len=512)
  cfg.grpo = experiment.grpo_section(questions_per_step=16, rollouts_per_question=8,
                                     max_new_tokens=4096)
  cfg.train = experiment.train_section(steps=500, trainable="all", save_every=50, log_every=1)
  cfg.optim = experiment.optim_section(lr=1e-6, warmup_steps=10, weight_decay=0.0)
  # the accelerators this recipe is made to fit: --config.plan.target=default plans them
  cfg.plan = experiment.plan_section("cuda:h100x8", "tpu:v5p:2x2x2")
  if arg == "runlocal":
    experiment.runlocal(cfg)
    cfg.data.prompt_len = 96
    cfg.grpo.update(questions_per_step=2, rollouts_per_question=2, max_new_tokens=32,
                    grader_workers=2)
    cfg.train.update(steps=3, save_every=3)
    cfg.optim.update(lr=1e-4, warmup_steps=1)
  return cfg
