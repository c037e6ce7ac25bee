"""Stage 1, continued pre-training of the lattice on multi-thread traces, Qwen3-1.7B.

  python -m lace_jax.main --config=experiments/pretrain_1p7b.py --workdir=runs/pretrain_1p7b \
      --config.model.checkpoint=/path/to/Qwen3-1.7B --config.data.path=data/cpt/train.jsonl
  python -m lace_jax.main --config=experiments/pretrain_1p7b.py:runlocal --workdir=/tmp/cpt

Only the freshly inserted lattice parameters train (train.trainable=lattice): the backbone is
untouched while the lattice learns to communicate; --config.train.trainable=all is the ablation.
"""

from lace_jax import experiment


def get_config(arg=None):
  return experiment.pretrain_config("qwen3-1.7b", lr=3e-4, steps=2000, batch_size=32, max_len=4096,
                                    runlocal_=arg == "runlocal")
