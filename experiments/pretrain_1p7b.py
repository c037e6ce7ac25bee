"""Stage 1, continued pre-training of the lattice on multi-thread traces, Qwen3-1.7B.

  python -m lace_jax.main --config=experiments/pretrain_1p7b.py --workdir=runs/pretrain_1p7b \
      --config.model.checkpoint=/path/to/Qwen3-1.7B --config.data.path=data/cpt/train.jsonl
  python -m lace_jax.main --config=experiments/pretrain_1p7b.py:runlocal --workdir=/tmp/cpt

Only the freshly inserted lattice parameters train (train.trainable=lattice): the backbone is
untouched while the lattice learns to communicate; --config.train.trainable=all is the ablation.
"""

from lace_jax import experiment


def get_config(arg=None):
  cfg = experiment.base_config("pretrain", "qwen3-1.7b", remat="full")
  cfg.data = experiment.data_section(path="data/cpt/train.jsonl", num_threads=4, max_len=4096,
                                     loss_on="all", shuffle_threads=True)
  cfg.train = experiment.train_section(steps=2000, batch_size=32, trainable="lattice")
  cfg.optim = experiment.optim_section(lr=3e-4, warmup_steps=100, weight_decay=0.01)
  # the accelerators this recipe is made to fit: --config.plan.target=default plans them
  cfg.plan = experiment.plan_section("cuda:h100x8", "tpu:v5p:2x2x2")
  if arg == "runlocal":
    experiment.runlocal(cfg)
    cfg.train.update(steps=20, batch_size=4, save_every=10, log_every=1)
    cfg.optim.update(lr=3e-3, warmup_steps=2)
  return cfg
