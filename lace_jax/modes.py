"""The jobs `python -m lace_jax.main` runs, selected by an experiment's `mode` field.

Each mode's module is imported when the mode runs (the function-local imports below, the
package's documented lazy ones): the CLI starts, answers `--help` and reports a config error
without loading jax or any mode's dependencies (orbax, grain, math-verify, fastapi, ...).
"""

from __future__ import annotations

from collections.abc import Callable

import ml_collections

from lace_jax.errors import ConfigError


def run_overhead(cfg: ml_collections.ConfigDict, workdir: str | None) -> dict:
  from lace_jax import overhead
  return overhead.run(cfg, workdir)


def run_datagen(cfg: ml_collections.ConfigDict, workdir: str | None) -> dict:
  from lace_jax.datagen import pipeline as datagen
  return datagen.run(cfg, workdir)


def run_eval(cfg: ml_collections.ConfigDict, workdir: str | None) -> dict:
  from lace_jax import evaluate
  return evaluate.run(cfg, workdir)


def run_grpo(cfg: ml_collections.ConfigDict, workdir: str | None) -> dict:
  from lace_jax.rl import stage
  return stage.run(cfg, workdir)


def run_train(cfg: ml_collections.ConfigDict, workdir: str | None) -> dict:
  from lace_jax.training import lm
  return lm.run(cfg, workdir)


def run_toy(cfg: ml_collections.ConfigDict, workdir: str | None) -> dict:
  from lace_jax.toy import comparison as toy
  return toy.run_comparison(cfg, workdir)


def run_quickstart(cfg: ml_collections.ConfigDict, workdir: str | None) -> dict:
  from lace_jax.toy import quickstart
  return quickstart.run(cfg, workdir)


def run_selection(cfg: ml_collections.ConfigDict, workdir: str | None) -> dict:
  from lace_jax.toy import selection
  return selection.run(cfg, workdir)


MODES: dict[str, Callable[[ml_collections.ConfigDict, str | None], dict]] = {
    "overhead": run_overhead,
    "pretrain": run_train,
    "sft": run_train,
    "grpo": run_grpo,
    "eval": run_eval,
    "datagen": run_datagen,
    "relay": run_toy,
    "toy_search": run_toy,
    "selection": run_selection,
    "quickstart": run_quickstart,
}


# one line per mode for `python -m lace_jax.main --help`
SUMMARY = {
    "pretrain": "continued pre-training: next-token loss on every token of multi-thread data",
    "sft": "supervised fine-tuning on multi-thread traces (loss on the generated tokens)",
    "grpo": "Lattice GRPO: W-thread rollouts, verified rewards + diversity, policy update",
    "eval": "benchmarks: LACE accuracy, maj@k / pass@k, tokens, the matched-budget baseline",
    "datagen": "multi-thread training data from a teacher (HTTP server or in-process checkpoint)",
    "overhead": "the lattice's parameters, FLOPs, memory and step time against the base model",
    "relay": "toy check: threads must pass each other a digit (lattice vs isolated threads)",
    "toy_search": "toy study: LACE vs Isolated Parallel vs Independent + Voting, pair search",
    "selection": "toy diagnostic: can the lattice learn to select one key among many",
    "quickstart": "the default without --config: the selection and relay checks, CPU minutes",
}


def get_mode(name: str) -> Callable[[ml_collections.ConfigDict, str | None], dict]:
  if name not in MODES:
    raise ConfigError(f"unknown mode {name!r}; available: {sorted(MODES)}")
  return MODES[name]
