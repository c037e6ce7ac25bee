"""Evaluation of a LACE Qwen3-1.7B checkpoint: the protocol of `eval_4b.py` on the 1.7B preset.

  python -m lace_jax.main --config=experiments/eval_1p7b.py --workdir=runs/eval_1p7b \
      --config.model.checkpoint=runs/grpo_1p7b/export
  python -m lace_jax.main --config=experiments/eval_1p7b.py:runlocal --workdir=/tmp/eval
"""

from lace_jax import experiment


def get_config(arg=None):
  cfg = experiment.sibling(__file__, "eval_4b").get_config(arg)
  if arg != "runlocal":
    experiment.with_preset(cfg, "qwen3-1.7b")
  return cfg
