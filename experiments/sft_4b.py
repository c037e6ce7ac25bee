"""Stage 2, full-parameter SFT on the multi-thread format, Qwen3-4B (the paper: 2409 questions).

  python -m lace_jax.main --config=experiments/sft_4b.py --workdir=runs/sft_4b \
      --config.model.checkpoint=runs/pretrain_4b/export --config.data.path=data/sft/train.jsonl
  python -m lace_jax.main --config=experiments/sft_4b.py:runlocal --workdir=/tmp/sft

`:rtx6000pro` fits one RTX PRO 6000 (the paper's 97 GB GPU) by 8 gradient micro-batches (the
same gradient). Loss on generated tokens only; the order of an example's threads is permuted on every draw.

The recipe of `sft_1p7b.py` on the 4B preset (its lattice band: layers 18, 20, ..., 34), with
the learning rate for the larger model.
"""

from lace_jax import experiment


def get_config(arg=None):
  cfg = experiment.sibling(__file__, "sft_1p7b").get_config(arg)
  if arg != "runlocal":
    experiment.with_preset(cfg, "qwen3-4b")
    cfg.optim.lr = 5e-6
  return cfg
