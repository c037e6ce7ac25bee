"""The lattice's Mosaic (Pallas TPU) kernels against `xla_chunked`, compiled by XLA:TPU for
compile-only chips (libtpu, no TPU needed): temporaries, FLOPs and bytes from XLA's own memory
and cost analyses, and the roofline time max(FLOPs / peak, bytes / bandwidth) per call, at the
real recipes' per-device shapes, bf16.

  pip install "jax[tpu]==0.10.2"
  python benchmarks/tpu_kernels_compile.py                 # v5p and v5e, every shape below
  python benchmarks/tpu_kernels_compile.py --chips=v5e --json

Shapes (per device; C = 4 lattice heads):
  sft_1p7b / sft_4b  gradient of one lattice layer, 2 examples x W = 4 threads x T = 4096
                     (batch 16 over 8 devices), E = 64 / 80
  grpo_*  decode     one decode step of one lattice layer, 16 slots x W = 4 against a cache of
                     S = 4608 columns (512 prompt + 4096 new) filled to the end

For the Mosaic kernels XLA's cost analysis holds the kernels' own estimates
(`pl.CostEstimate`: the visited blocks' matmuls and tiles). For xla_chunked's gradient it counts
the body of its key-block scans once, so FLOPs and bytes are multiplied by the scans' trip count
(W*T / 512 key blocks) here: the FLOPs are then exact (7 dense [Q, K, E] matmuls, checked against
the analytic count), the bytes an upper estimate (what lies outside the scans is multiplied
too; inside them, q, dO and the f32 accumulators are streamed once per key block). The direct
XLA decode has no loop. The decode kernel's estimate assumes every cache column filled, as
here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from lace_jax import kernels, plan  # noqa: E402
from lace_jax.kernels.lattice_attention import (lattice_attention,  # noqa: E402
                                                lattice_decode_attention)

SHAPES = {  # name -> (kind, b, w, t or s, c, e)
    "sft_1p7b grad": ("grad", 2, 4, 4096, 4, 64),
    "sft_4b grad": ("grad", 2, 4, 4096, 4, 80),
    "grpo_1p7b decode": ("decode", 16, 4, 4608, 4, 64),
    "grpo_4b decode": ("decode", 16, 4, 4608, 4, 80),
}
CHIPS = {"v5p": "tpu:v5p:2x2x1", "v5e": "tpu:v5e:2x2", "v6e": "tpu:v6e:2x2"}


def build(kind, impl, b, w, n, c, e, sharding):
  sd = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt, sharding=sharding)
  if kind == "grad":
    f = lambda q, k, v, m: lattice_attention(q, k, v, key_valid=m, implementation=impl)
    g = jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=(0, 1, 2))
    return g, (sd(b, w, n, c, e),) * 3 + (sd(b, w, n, dt=jnp.bool_),)
  fn = lambda *a: lattice_decode_attention(*a, implementation=impl)
  return fn, (sd(b, w, c, e), sd(b, w, c, e, n), sd(b, w, c, e, n), sd(b, w, n, dt=jnp.bool_),
              sd(b, dt=jnp.int32), sd(b, w, c, e), sd(b, w, c, e), sd(b, w, dt=jnp.bool_))


def measure(chip_name: str, shape: str) -> list[dict]:
  target = plan.resolve_target(CHIPS[chip_name])
  chip = target.chip
  sharding = jax.sharding.SingleDeviceSharding(target.devices[0])
  kind, b, w, n, c, e = SHAPES[shape]
  rows = []
  for impl in ("pallas", "xla_chunked"):
    fn, args = build(kind, impl, b, w, n, c, e, sharding)
    with kernels.target_platform("tpu"):
      compiled = jax.jit(fn).trace(*args).lower().compile()
    cost = compiled.cost_analysis()
    trips = -(-w * n // 512) if (impl, kind) == ("xla_chunked", "grad") else 1
    flops = trips * float(cost.get("flops", 0))
    nbytes = trips * float(cost.get("bytes accessed", 0))
    mosaic = compiled.as_text().count('custom_call_target="tpu_custom_call"')
    rows.append(dict(chip=chip_name, shape=shape, implementation=impl, mosaic_calls=mosaic,
                     xla_cost_multiplier=trips,
                     temp_gb=compiled.memory_analysis().temp_size_in_bytes / 1e9,
                     tflop=flops / 1e12, gb_moved=nbytes / 1e9,
                     roofline_ms=1e3 * max(flops / chip.peak_flops, nbytes / chip.bandwidth)))
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--chips", default="v5p,v5e")
  p.add_argument("--shapes", default=",".join(SHAPES))
  p.add_argument("--json", action="store_true")
  a = p.parse_args(argv)
  jax.config.update("jax_enable_compilation_cache", False)
  rows = []
  for chip in a.chips.split(","):
    for shape in a.shapes.split(","):
      rows += measure(chip, shape)
      for r in rows[-2:]:
        print(json.dumps(r) if a.json else
              f"{r['chip']:4s} {r['shape']:17s} {r['implementation']:12s} "
              f"mosaic {r['mosaic_calls']}  temp {r['temp_gb']:.3f} GB  "
              f"{r['tflop']:.3f} TFLOP  {r['gb_moved']:.3f} GB moved  "
              f"roofline {r['roofline_ms']:.3f} ms", flush=True)
  return rows


if __name__ == "__main__":
  sys.exit(main() and 0)
