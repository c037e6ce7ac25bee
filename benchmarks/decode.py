"""Decoding: tokens/s of the lattice model vs the same model without lattice (one run, same
shapes), and the compiled memory of one decode step of a large preset at many threads.

  python benchmarks/decode.py                                   # CPU-sized throughput + 4B W=128
  python benchmarks/decode.py --memory_preset=qwen3-1.7b --memory_threads=128
  python benchmarks/decode.py --skip_throughput                 # the memory figures only
  python benchmarks/decode.py --widen_bf16_dots                 # XLA:CPU's default lowering

XLA:CPU by default computes a bf16 matmul by converting both operands to f32, which puts f32
copies of the weights in the step's temporary memory (a CPU artefact: accelerators multiply
bf16 natively). Unless --widen_bf16_dots is given, this script turns on XLA:CPU's YNNPACK dot
fusion (`--xla_cpu_experimental_ynn_fusion_type=dot`), which multiplies bf16 natively, so the
CPU's `memory_analysis()` reflects the program an accelerator would run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

if "--widen_bf16_dots" not in sys.argv:  # must be set before jax initialises its CPU backend
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_cpu_experimental_ynn_fusion_type=dot").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import lace_jax as lj  # noqa: E402
from lace_jax import sampling  # noqa: E402
from lace_jax.model import Model, abstract_params  # noqa: E402


def throughput(cfg, lattice, *, threads, prompt_len, new_tokens, batch, repeats):
  """Median over `repeats` timed runs (after one compiling run) of a full lockstep generation."""
  model, params = lj.build_model(cfg, lattice, seed=0)
  prompts = [[(7 * i + j) % cfg.vocab_size + 1 for j in range(prompt_len)] for i in range(batch)]
  kw = dict(num_threads=threads, max_new_tokens=new_tokens, temperature=0.0)
  out = sampling.sample(model, params, prompts, **kw)  # compile
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = sampling.sample(model, params, prompts, **kw)
    times.append(time.perf_counter() - t0)
  seconds = statistics.median(times)
  tokens = int(out.lengths.sum())
  return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
          "ms_per_step": 1000 * seconds / new_tokens, "runs_s": times}


def decode_step_memory(preset, lattice_on, *, threads, context, dtype="bfloat16"):
  cfg = lj.ModelConfig.preset(preset, dtype=dtype, param_dtype=dtype)
  lattice = lj.LatticeConfig.default(cfg) if lattice_on else None
  model = Model(cfg, lattice)
  params = abstract_params(cfg, lattice)
  cache = jax.eval_shape(lambda: model.init_cache(1, threads, context))
  tok = jax.ShapeDtypeStruct((1, threads), jnp.int32)
  valid = jax.ShapeDtypeStruct((1, threads), jnp.bool_)
  step = jax.jit(model.decode_step, donate_argnums=(1,))
  compiled = step.trace(params, cache, tok, tok, valid, jnp.int32(context - 1)).lower().compile()
  m = compiled.memory_analysis()
  peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes \
      - m.alias_size_in_bytes
  params_b = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  cache_b = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
  return {"preset": preset, "lattice": lattice_on, "threads": threads, "context": context,
          "params_GB": params_b / 1e9, "cache_GB": cache_b / 1e9, "temp_GB": m.temp_size_in_bytes / 1e9,
          "peak_GB": peak / 1e9}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--threads", type=int, default=4)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--prompt_len", type=int, default=50)
  p.add_argument("--new_tokens", type=int, default=100)
  p.add_argument("--memory_preset", default="qwen3-4b")
  p.add_argument("--memory_threads", type=int, default=128)
  p.add_argument("--repeats", type=int, default=7, help="timed runs per model (median)")
  p.add_argument("--skip_throughput", action="store_true")
  p.add_argument("--widen_bf16_dots", action="store_true",
                 help="keep XLA:CPU's default f32 lowering of bf16 matmuls (see the docstring)")
  a = p.parse_args()
  cfg = lj.ModelConfig.preset("tiny", d_model=256, num_layers=8, mlp_dim=768, num_heads=8,
                              num_kv_heads=4, head_dim=32)
  shape = dict(threads=a.threads, prompt_len=a.prompt_len, new_tokens=a.new_tokens,
               batch=a.batch, repeats=a.repeats)
  print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
  if not a.skip_throughput:
    base = throughput(cfg, None, **shape)
    lat = throughput(cfg, lj.LatticeConfig.default(cfg), **shape)
    print(json.dumps({"throughput": {"model": "D=256 L=8 fp32", **shape, "base": base,
                                     "lattice": lat,
                                     "step_time_ratio": lat["seconds"] / base["seconds"]}},
                     indent=2), flush=True)
  context = a.prompt_len + a.new_tokens
  rows = [decode_step_memory(a.memory_preset, on, threads=a.memory_threads, context=context)
          for on in (False, True)]
  print(json.dumps({"decode_step_memory": rows}, indent=2))


if __name__ == "__main__":
  main()
