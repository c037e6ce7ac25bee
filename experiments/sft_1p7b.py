"""Stage 2, full-parameter SFT on the multi-thread format, Qwen3-1.7B (the paper: 800 questions).

  python -m lace_jax.main --config=experiments/sft_1p7b.py --workdir=runs/sft_1p7b \
      --config.model.checkpoint=runs/pretrain_1p7b/export --config.data.path=data/sft/train.jsonl
  python -m lace_jax.main --config=experiments/sft_1p7b.py:runlocal --workdir=/tmp/sft

Loss on generated tokens only; the order of an example's threads is permuted on every draw.
"""

from lace_jax import experiment


def get_config(arg=None):
  cfg = experiment.base_config("sft", "qwen3-1.7b", remat="full")
  cfg.data = experiment.data_section(path="data/sft/train.jsonl", num_threads=4, max_len=4096,
                                     loss_on="generated", shuffle_threads=True)
  cfg.train = experiment.train_section(steps=300, batch_size=16, trainable="all")
  cfg.optim = experiment.optim_section(lr=1e-5, warmup_steps=20, weight_decay=0.0)
  # the accelerators this recipe is made to fit: --config.plan.target=default plans them
  cfg.plan = experiment.plan_section("cuda:h100x8", "tpu:v5p:2x2x2")
  if arg == "rtx6000pro":  # one RTX PRO 6000 (97 GB, the paper's GPU): 2 examples per pass
    cfg.train.grad_accum = 8
    cfg.plan = experiment.plan_section("cuda:rtx6000pro")
  if arg == "runlocal":
    experiment.runlocal(cfg)
    cfg.train.update(steps=20, batch_size=4, save_every=10, log_every=1)
    cfg.optim.update(lr=1e-3, warmup_steps=2)
  return cfg
