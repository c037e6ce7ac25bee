"""Stage 2, full-parameter SFT on the multi-thread format, Qwen3-1.7B (the paper: 800 questions).

  python -m lace_jax.main --config=experiments/sft_1p7b.py --workdir=runs/sft_1p7b \
      --config.model.checkpoint=runs/pretrain_1p7b/export --config.data.path=data/sft/train.jsonl
  python -m lace_jax.main --config=experiments/sft_1p7b.py:runlocal --workdir=/tmp/sft

Loss on generated tokens only; the order of an example's threads is permuted on every draw.
"""

from lace_jax import experiment


def get_config(arg=None):
  return experiment.sft_config("qwen3-1.7b", lr=1e-5, steps=300, batch_size=16, max_len=4096,
                               runlocal_=arg == "runlocal")
