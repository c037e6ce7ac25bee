"""The exploration task: LACE vs Isolated Parallel vs Independent + Voting, trained from scratch.

  python -m lace_jax.main --config=experiments/toy_search.py --workdir=runs/toy_search
  python -m lace_jax.toy.plots --workdir=runs/toy_search --out=docs/figures

Pair search (see lace_jax.toy.tasks): 12 lettered items with two digits each, one of which adds
to the target; a trial costs 7 tokens, each thread may spend 26 tokens (3 trials and the
answer), W = 4 threads. The multi-thread traces divide the items between the threads and the
finder's answer is passed on; the single-thread traces (for Independent + Voting) try 3 random
items on the same problems. Each variant runs CPT -> SFT -> Lattice GRPO -> eval for each seed;
the table (results.md / results.json) gives mean ± std over seeds. The `budget` stage draws
16 independent samples per test problem from the single-thread model: Independent + Voting's
accuracy against its total tokens, read at LACE's tokens of the same seed (equal compute).

SFT runs 3000 steps: at 700 (the first run, docs/results.md section 3) the tiny model learnt
the in-thread lookup / add / copy chain on some seeds and not on others (seed 0's SFT loss on a
plateau at 0.60 against 0.24 after 3000), so the seeds measured that rather than the systems.
Each seed and system can run as its own process into the same workdir
(`--config.toy.seeds='(1,)' --config.toy.variants='("lace",)'`: the run lock is per seed and
system); the command without them then finds every stage done and writes the table.
"""

from lace_jax.toy import configs


def get_config(arg=None):
  cfg = configs.toy_config("pair_search", num_threads=4, seeds=(0, 1, 2, 3, 4),
                           variants=("lace", "isolated", "independent"),
                           stages=("pretrain", "sft", "grpo", "eval", "budget"))
  cfg.sft.train.steps = 3000  # every seed learns the in-thread skills (see above)
  if arg == "runlocal":  # a smoke run in about a minute
    cfg.toy.update(seeds=(0,), train_problems=64, test_problems=8)
    cfg.pretrain.train.update(steps=4, save_every=4, log_every=1)
    cfg.sft.train.update(steps=4, save_every=4, log_every=1)
    cfg.grpo.train.update(steps=2, save_every=2)
    cfg.grpo.grpo.update(questions_per_step=2, rollouts_per_question=2)
    cfg.eval.update(batch_size=8, budget_samples=8)
  return cfg
