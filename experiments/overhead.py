"""Lattice parameter and FLOP overhead of the 1.7B and 4B presets (no weights allocated).

  python -m lace_jax.main --config=experiments/overhead.py --workdir=runs/overhead
  python -m lace_jax.main --config=experiments/overhead.py --config.overhead.num_threads=8
  python -m lace_jax.main --config=experiments/overhead.py --workdir=runs/overhead_w \
      --sweep=threads          # one point per W, a table of the overheads
"""

import ml_collections

from lace_jax import experiment, sweep


def sweep_threads():
  """The overhead as the thread count grows."""
  return sweep.values("overhead.num_threads", [1, 2, 4, 8, 16, 32, 64, 128])


def sweep_context():
  return sweep.values("overhead.context", [150, 1024, 4096, 16384])


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  cfg = experiment.base_config("overhead", "qwen3-4b")
  cfg.overhead = ml_collections.ConfigDict(
      {"presets": ("qwen3-1.7b", "qwen3-4b"), "num_threads": 4, "context": 150})
  if arg == "runlocal":
    experiment.runlocal(cfg)
    cfg.overhead.presets = ("tiny",)
  return cfg
