"""Parameter and FLOP overhead of the lattice side path (spec section 3; paper: params < 1%,
FLOPs < 1.3%), measured without allocating weights: parameter shapes from `jax.eval_shape`,
FLOPs from XLA's cost analysis of the lowered forward pass on abstract arrays."""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections

from lace_jax.config import LatticeConfig, ModelConfig
from lace_jax.model import Model, abstract_params, count_params


@dataclasses.dataclass(frozen=True)
class Overhead:
  preset: str
  num_threads: int
  context: int
  base_params: int
  lattice_params: int
  base_flops: float
  lattice_flops: float
  lattice_layers: tuple[int, ...]
  seconds: float

  @property
  def param_overhead(self) -> float:
    return self.lattice_params / self.base_params

  @property
  def flop_overhead(self) -> float:
    return self.lattice_flops / self.base_flops - 1.0

  def as_dict(self) -> dict:
    return {**dataclasses.asdict(self), "param_overhead": self.param_overhead,
            "flop_overhead": self.flop_overhead}


def forward_flops(cfg: ModelConfig, lattice: LatticeConfig | None, batch: int, num_threads: int,
                  context: int) -> float:
  """XLA's FLOP count of one forward pass over [batch, num_threads, context] tokens."""
  model = Model(cfg, lattice)
  params = model.abstract_params()
  tokens = jax.ShapeDtypeStruct((batch, num_threads, context), jnp.int32)
  lowered = jax.jit(model.apply).trace(params, tokens).lower()
  return float(lowered.cost_analysis()["flops"])


def measure(preset: str, *, num_threads: int = 4, context: int = 150,
            dtype: str = "bfloat16", lattice: LatticeConfig | None = None) -> Overhead:
  start = time.perf_counter()
  cfg = ModelConfig.preset(preset, dtype=dtype, param_dtype=dtype)
  lattice = lattice or LatticeConfig.default(cfg)
  base = count_params(abstract_params(cfg, None))
  with_lattice = count_params(abstract_params(cfg, lattice))
  base_flops = forward_flops(cfg, None, 1, num_threads, context)
  lattice_flops = forward_flops(cfg, lattice, 1, num_threads, context)
  return Overhead(preset, num_threads, context, base, with_lattice - base, base_flops,
                  lattice_flops, lattice.layers, time.perf_counter() - start)


def markdown_table(rows: list[Overhead]) -> str:
  lines = ["| preset | W | context | base params | lattice params | param overhead | "
           "base GFLOPs | lattice GFLOPs | FLOP overhead | lattice layers |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r.preset} | {r.num_threads} | {r.context} | {r.base_params:,} | "
        f"{r.lattice_params:,} | {100 * r.param_overhead:.3f}% | {r.base_flops / 1e9:,.1f} | "
        f"{r.lattice_flops / 1e9:,.1f} | {100 * r.flop_overhead:.3f}% | "
        f"{','.join(map(str, r.lattice_layers))} |")
  return "\n".join(lines)


def run(cfg: ml_collections.ConfigDict, workdir: str | None) -> dict:
  """The `overhead` mode: lattice parameter and FLOP overhead for each preset in
  `cfg.overhead.presets`; the table printed and WORKDIR/overhead.json written."""
  rows = []
  for preset in cfg.overhead.presets:
    r = measure(preset, num_threads=cfg.overhead.num_threads, context=cfg.overhead.context,
                dtype=cfg.model.dtype)
    print(f"  {preset}: params +{100 * r.param_overhead:.3f}%, FLOPs +{100 * r.flop_overhead:.3f}%"
          f" ({r.seconds:.1f}s)", flush=True)
    rows.append(r)
  table = markdown_table(rows)
  print(table, flush=True)
  result = {"overhead": [r.as_dict() for r in rows], "table": table}
  if workdir and jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "overhead.json")
    with open(path, "w") as f:
      json.dump(result, f, indent=2)
    print(f"wrote {path}")
  return result
