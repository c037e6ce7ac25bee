"""The embedded default job of `python -m lace_jax.main` (no --config needed).

  python -m lace_jax.main --workdir=runs/quickstart

Reports the lattice overhead of the 1.7B and 4B presets (no weights allocated) and runs a
forward pass of a tiny lattice model with W = 4 threads. A few minutes on 2 CPU cores.
"""

import ml_collections

from lace_jax import experiment


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  cfg = experiment.base_config("quickstart", "tiny", dtype="float32")
  cfg.overhead = ml_collections.ConfigDict(
      {"presets": ("qwen3-1.7b", "qwen3-4b"), "num_threads": 4, "context": 150})
  cfg.forward = ml_collections.ConfigDict({"batch": 2, "num_threads": 4, "length": 32})
  return cfg
