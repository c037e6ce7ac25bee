"""The jobs `python -m lace_jax.main` runs, selected by an experiment's `mode` field."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable

import jax
import ml_collections

from lace_jax import overhead

log = logging.getLogger(__name__)


def _write_json(workdir: str | None, name: str, payload) -> str | None:
  if not workdir or jax.process_index() != 0:
    return None
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, name)
  with open(path, "w") as f:
    json.dump(payload, f, indent=2)
  return path


def run_overhead(cfg: ml_collections.ConfigDict, workdir: str | None) -> dict:
  """Lattice parameter and FLOP overhead for each preset in `cfg.overhead.presets`."""
  rows = []
  for preset in cfg.overhead.presets:
    r = overhead.measure(preset, num_threads=cfg.overhead.num_threads,
                         context=cfg.overhead.context, dtype=cfg.model.dtype)
    print(f"  {preset}: params +{100 * r.param_overhead:.3f}%, FLOPs +{100 * r.flop_overhead:.3f}%"
          f" ({r.seconds:.1f}s)", flush=True)
    rows.append(r)
  table = overhead.markdown_table(rows)
  print(table, flush=True)
  result = {"overhead": [r.as_dict() for r in rows], "table": table}
  path = _write_json(workdir, "overhead.json", result)
  if path:
    print(f"wrote {path}")
  return result


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


def get_mode(name: str) -> Callable[[ml_collections.ConfigDict, str | None], dict]:
  if name not in MODES:
    raise ValueError(f"unknown mode {name!r}; available: {sorted(MODES)}")
  return MODES[name]
