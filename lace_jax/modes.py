"""The jobs `python -m lace_jax.main` runs, selected by an experiment's `mode` field."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lace_jax import experiment, overhead
from lace_jax.model import build_model

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


def run_forward(cfg: ml_collections.ConfigDict, workdir: str | None) -> dict:
  """Builds the configured model, runs one forward pass over random threads, and checks that
  the freshly initialised lattice model computes exactly its base model."""
  model_cfg, lattice = experiment.model_configs(cfg)
  f = cfg.forward
  start = time.perf_counter()
  model = build_model(model_cfg, lattice, seed=cfg.seed)
  base = build_model(model_cfg, None, seed=cfg.seed)
  tokens = jax.random.randint(jax.random.key(cfg.seed), (f.batch, f.num_threads, f.length), 0,
                              model_cfg.vocab_size)
  logits = jax.jit(model.apply)(model.params, tokens)
  base_logits = jax.jit(base.apply)(base.params, tokens)
  diff = float(jnp.max(jnp.abs(logits - base_logits)))
  result = {
      "model": model_cfg.name, "lattice_layers": list(lattice.layers) if lattice else [],
      "params": model.num_params(), "lattice_params": model.num_params() - base.num_params(),
      "tokens_shape": list(tokens.shape), "logits_shape": list(logits.shape),
      "logits_mean": float(jnp.mean(logits)), "logits_std": float(jnp.std(logits)),
      "max_abs_diff_vs_base_at_init": diff, "seconds": time.perf_counter() - start,
  }
  print(f"forward: {model_cfg.name} with lattice layers {result['lattice_layers']}: "
        f"tokens {tuple(tokens.shape)} -> logits {tuple(logits.shape)}; "
        f"max |lattice - base| at init = {diff:.2e} ({result['seconds']:.1f}s)", flush=True)
  if not np.isfinite(result["logits_std"]):
    raise FloatingPointError("forward pass produced non-finite logits")
  _write_json(workdir, "forward.json", result)
  return result


def run_datagen(cfg: ml_collections.ConfigDict, workdir: str | None) -> dict:
  from lace_jax import datagen
  return datagen.run(cfg, workdir)


def run_eval(cfg: ml_collections.ConfigDict, workdir: str | None) -> dict:
  from lace_jax import evaluate
  return evaluate.run(cfg, workdir)


def run_grpo(cfg: ml_collections.ConfigDict, workdir: str | None) -> dict:
  from lace_jax import grpo
  return grpo.run(cfg, workdir)


def run_train(cfg: ml_collections.ConfigDict, workdir: str | None) -> dict:
  from lace_jax import train
  return train.run(cfg, workdir)


def run_toy(cfg: ml_collections.ConfigDict, workdir: str | None) -> dict:
  from lace_jax import toy
  return toy.run_comparison(cfg, workdir)


MODES: dict[str, Callable[[ml_collections.ConfigDict, str | None], dict]] = {
    "overhead": run_overhead,
    "forward": run_forward,
    "pretrain": run_train,
    "sft": run_train,
    "grpo": run_grpo,
    "eval": run_eval,
    "datagen": run_datagen,
    "relay": run_toy,
    "toy_search": run_toy,
}


def get_mode(name: str) -> Callable[[ml_collections.ConfigDict, str | None], dict]:
  if name not in MODES:
    raise ValueError(f"unknown mode {name!r}; available: {sorted(MODES)}")
  return MODES[name]
