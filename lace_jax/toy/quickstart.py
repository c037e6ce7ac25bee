"""The embedded default job of `python -m lace_jax.main` (no --config needed).

  python -m lace_jax.main --workdir=runs/quickstart

A shortened run of the toy-scale comparison (`experiments/toy_search.py`): the pair-search
data, then CPT -> SFT -> Lattice GRPO -> eval of a tiny model trained from scratch as LACE,
as Isolated Parallel (`lattice=None`) and as a single-thread model with W samples and a vote
(Independent + Voting), one seed; prints the table. About 5 minutes on 2 CPU cores. Its
training is too short to separate the systems: the full comparison is
`--config=experiments/toy_search.py` (docs/results.md).
"""

import ml_collections

from lace_jax.toy import comparison


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  cfg = comparison.toy_config("pair_search", num_threads=4, seeds=(0,),
                              variants=("lace", "isolated", "independent"),
                              stages=("pretrain", "sft", "grpo", "eval"))
  cfg.toy.update(train_problems=2000, test_problems=100)
  cfg.pretrain.train.update(steps=40, save_every=40)
  cfg.sft.train.update(steps=150, save_every=150)
  cfg.sft.optim.warmup_steps = 15
  cfg.grpo.train.update(steps=4, save_every=4)
  cfg.grpo.grpo.update(questions_per_step=4, rollouts_per_question=4)
  return cfg
