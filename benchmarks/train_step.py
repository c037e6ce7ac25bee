"""Train-step time of the lattice model over the same model without lattice (one run, same
shapes, same machine), plus the compiled step's memory.

  python benchmarks/train_step.py                       # CPU-sized default
  python benchmarks/train_step.py --preset=qwen3-1.7b --batch=8 --seq=2048 --dtype=bfloat16
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

import lace_jax as lj
from lace_jax import experiment, sharding
from lace_jax.training import lm
from lace_jax.training import trainer as train


def bench(cfg: lj.ModelConfig, lattice, *, batch: int, threads: int, seq: int, steps: int):
  mesh = sharding.make_mesh({"fsdp": -1})
  tr = train.Trainer.create(cfg, lattice, experiment.optim_section(lr=1e-4, warmup_steps=1),
                            total_steps=steps + 10, trainable="all", mesh=mesh,
                            rules=sharding.DEFAULT_RULES)
  state = tr.init_state(0)
  rng = np.random.default_rng(0)
  local = {"tokens": rng.integers(0, cfg.vocab_size, (1, batch, threads, seq), dtype=np.int32),
           "valid": np.ones((1, batch, threads, seq), bool)}
  local["targets"] = np.roll(local["tokens"], -1, axis=-1)
  local["loss_mask"] = local["valid"].copy()
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in local.items()}
  t = time.perf_counter()
  step, mem = tr.compile(shapes, lm.make_loss())
  compile_s = time.perf_counter() - t
  b = sharding.global_batch(local, mesh, leading=1)
  for i in range(2):  # warm-up
    state, m = step(state, b, jax.random.key(i))
  jax.block_until_ready(m)
  times = []
  for i in range(steps):
    t = time.perf_counter()
    state, m = step(state, b, jax.random.key(i))
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  tokens = batch * threads * seq
  return {"median_step_s": float(np.median(times)), "tokens_per_s": tokens / float(np.median(times)),
          "compile_s": compile_s, "temp_MiB": mem.get("temp_size_in_bytes", 0) / 2**20}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="tiny")
  p.add_argument("--d_model", type=int, default=256)
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--threads", type=int, default=4)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--dtype", default="float32")
  a = p.parse_args()
  if a.preset == "tiny":
    cfg = lj.ModelConfig.preset("tiny", d_model=a.d_model, num_layers=a.layers,
                                mlp_dim=3 * a.d_model, num_heads=8, num_kv_heads=4,
                                head_dim=a.d_model // 8, dtype=a.dtype)
  else:
    cfg = lj.ModelConfig.preset(a.preset, dtype=a.dtype)
  lattice = lj.LatticeConfig.default(cfg)
  shape = dict(batch=a.batch, threads=a.threads, seq=a.seq, steps=a.steps)
  base = bench(cfg, None, **shape)
  lat = bench(cfg, lattice, **shape)
  out = {"device": str(jax.devices()[0].device_kind), "devices": jax.device_count(),
         "model": f"{a.preset} D={cfg.d_model} L={cfg.num_layers} {a.dtype}",
         "lattice_layers": list(lattice.layers), **shape, "base": base, "lattice": lat,
         "step_time_ratio": lat["median_step_s"] / base["median_step_s"]}
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  main()
