"""Stage 1, continued pre-training of the lattice on multi-thread traces, Qwen3-4B.

  python -m lace_jax.main --config=experiments/pretrain_4b.py --workdir=runs/pretrain_4b \
      --config.model.checkpoint=/path/to/Qwen3-4B --config.data.path=data/cpt/train.jsonl
  python -m lace_jax.main --config=experiments/pretrain_4b.py:runlocal --workdir=/tmp/cpt

Only the freshly inserted lattice parameters train (train.trainable=lattice): the backbone is
untouched while the lattice learns to communicate; --config.train.trainable=all is the ablation.

The recipe of `pretrain_1p7b.py` on the 4B preset (its lattice band: layers 18, 20, ..., 34), with
the learning rate for the larger model.
"""

from lace_jax import experiment


def get_config(arg=None):
  cfg = experiment.sibling(__file__, "pretrain_1p7b").get_config(arg)
  if arg != "runlocal":
    experiment.with_preset(cfg, "qwen3-4b")
    cfg.optim.lr = 2e-4
  return cfg
