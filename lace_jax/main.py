"""The lace_jax command line: one entry point for every mode.

  python -m lace_jax.main --config=experiments/<file>.py[:arg] --workdir=DIR [--config.a.b=v]

With no --config it runs the embedded quickstart (`lace_jax/toy/quickstart.py`). TPU pod
jobs run the same command on every host. `--config.plan.target=tpu:v5p:2x2x2` (or cuda:h100x8,
local, ...) compiles the experiment's functions for that target instead of running them
(`lace_jax.plan`).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from lace_jax import distributed, modes, runtime
from lace_jax.errors import RunError

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "toy", "quickstart.py")
_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Experiment file, optionally with `:arg` (e.g. :runlocal).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for outputs, logs and checkpoints.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # library INFO chatter would break the progress bar
  cfg = _CONFIG.value
  workdir = _WORKDIR.value
  try:
    run = modes.get_mode(cfg.mode)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if "runtime" in cfg:  # before anything starts a JAX backend
    runtime.apply_libtpu_args(cfg.runtime.libtpu_init_args)
  if "plan" in cfg and cfg.plan.target:
    from lace_jax import plan
    print(f"lace_jax: plan of mode {cfg.mode} for {cfg.plan.target}, workdir {workdir}",
          flush=True)
    plan.run(cfg, workdir, name=os.path.basename(config_flags.get_config_filename(
        flags.FLAGS["config"])).split(":")[0])
    return
  if "distributed" in cfg:
    distributed.maybe_initialize(cfg.distributed)
  print(f"lace_jax: mode {cfg.mode}, workdir {workdir}", flush=True)
  logging.info("config:\n%s", cfg)
  try:
    run(cfg, workdir)
  except RunError as e:  # its message says it all: no traceback
    print(f"\nerror: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
