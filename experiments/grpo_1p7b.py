"""Stage 3, Lattice GRPO, Qwen3-1.7B (the paper: 1959 RL questions).

  python -m lace_jax.main --config=experiments/grpo_1p7b.py --workdir=runs/grpo_1p7b \
      --config.model.checkpoint=runs/sft_1p7b/export
  python -m lace_jax.main --config=experiments/grpo_1p7b.py:runlocal --workdir=/tmp/grpo

`:rtx6000pro` is the same recipe for one RTX PRO 6000 (the paper's 97 GB GPU): 8 gradient
micro-batches and rollouts generated 16 at a time (same gradient and samples per step).

One rollout = one W-thread lattice; G rollouts per question; reward = verified accuracy of the
[[best]] thread + lambda_div * thread diversity, shared by every token of the rollout.
"""

from lace_jax import experiment


def get_config(arg=None):
  cfg = experiment.base_config("grpo", "qwen3-1.7b", remat="full")
  cfg.data = experiment.questions_section(path="gsm8k_train", num_threads=4, prompt_len=512)
  cfg.grpo = experiment.grpo_section(questions_per_step=16, rollouts_per_question=8,
                                     max_new_tokens=4096)
  # 2 micro-batches per update: the same gradient, half the activations (8 x H100: 10% headroom)
  cfg.train = experiment.train_section(steps=500, trainable="all", grad_accum=2, save_every=50,
                                       log_every=1)
  cfg.optim = experiment.optim_section(lr=1e-6, warmup_steps=10, weight_decay=0.0)
  # the accelerators this recipe is made to fit: --config.plan.target=default plans them
  cfg.plan = experiment.plan_section("cuda:h100x8", "tpu:v5p:2x2x2")
  if arg == "rtx6000pro":  # one RTX PRO 6000 (97 GB, the paper's GPU)
    cfg.train.grad_accum = 8  # 16 rollouts per pass
    cfg.grpo.rollout_batch = 16  # rollouts generated 16 at a time (KV cache 36 GB)
    cfg.plan = experiment.plan_section("cuda:rtx6000pro")
  if arg == "runlocal":
    experiment.runlocal(cfg)
    cfg.data.prompt_len = 96
    cfg.grpo.update(questions_per_step=2, rollouts_per_question=2, max_new_tokens=32,
                    grader_workers=2)
    cfg.train.update(steps=3, save_every=3, grad_accum=1)
    cfg.optim.update(lr=1e-4, warmup_steps=1)
  return cfg
