"""The mechanism check: a task only cross-thread communication can solve.

  python -m lace_jax.main --config=experiments/toy_relay.py --workdir=runs/toy_relay

Thread w's prompt holds a private digit; every thread must answer the sum of all W = 2 digits.
The tiny model is trained from scratch with SFT, with the lattice and without it
(`lattice=None`, Isolated Parallel), then decoded greedily on 200 held-out problems; accuracy
is per thread (mean@W). Without communication the best achievable is 10% (chance). The run
checks lattice >= 90% and isolated <= 20% and prints PASSED / FAILED; it is also a CI test.
"""

from lace_jax.toy import comparison


def get_config(arg=None):
  del arg
  cfg = comparison.toy_config("relay", num_threads=2, seeds=(0,), variants=("lace", "isolated"),
                              stages=("sft", "eval"))
  cfg.toy.update(train_problems=2000, max_len=20, prompt_width=17, max_new_tokens=2,
                 headline=(("lace", "mean_acc"), ("isolated", "mean_acc")))
  cfg.sft.train.update(steps=500, batch_size=32, save_every=500)
  cfg.sft.optim.warmup_steps = 20
  cfg.eval.update(temperature=0.0, batch_size=100)
  return cfg
