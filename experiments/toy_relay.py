"""The mechanism check: a task only cross-thread communication can solve.

  python -m lace_jax.main --config=experiments/toy_relay.py --workdir=runs/toy_relay

Thread w's prompt holds a private digit; every thread must answer the sum of all W = 2 digits.
The tiny model is trained from scratch with SFT, with the lattice and without it
(`lattice=None`, Isolated Parallel), then decoded greedily on 200 held-out problems; accuracy
is per thread (mean@W). Without communication the best achievable is 10% (chance). The run
checks lattice >= 90% and isolated <= 20% and prints PASSED / FAILED; it is also a CI test.
"""

from lace_jax.toy import configs


def get_config(arg=None):
  del arg
  return configs.relay_config()
