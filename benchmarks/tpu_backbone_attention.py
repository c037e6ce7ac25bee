"""The backbone's TPU attention kernels compiled for a compile-only chip (libtpu, no TPU): one
layer's gradient with jax's splash attention (`splash_tpu`, the TPU default) and jax's TPU flash
attention (`pallas_tpu`, k and v repeated to the query heads), XLA's temporaries and counted
bytes, at the recipes' per-device shape: 8 rows (2 examples x W = 4 threads) x 4,096 columns,
bf16, head dim 128, Qwen3-1.7B (16 query / 8 kv heads) and Qwen3-4B (32 / 8).

  pip install "jax[tpu]==0.10.2"
  python benchmarks/tpu_backbone_attention.py [--target=tpu:v5p:2x2x1]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from lace_jax import kernels, plan  # noqa: E402
from lace_jax.kernels.attention import attention  # noqa: E402

MODELS = {"Qwen3-1.7B": (16, 8), "Qwen3-4B": (32, 8)}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--target", default="tpu:v5p:2x2x1")
  p.add_argument("--rows", type=int, default=8)
  p.add_argument("--seq", type=int, default=4096)
  a = p.parse_args(argv)
  jax.config.update("jax_enable_compilation_cache", False)
  device = plan.resolve_target(a.target).devices[0]
  sd = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(
      s, dt, sharding=jax.sharding.SingleDeviceSharding(device))
  for name, (n, kh) in MODELS.items():
    q, k, m = sd(a.rows, a.seq, n, 128), sd(a.rows, a.seq, kh, 128), sd(a.rows, a.seq,
                                                                       dt=jnp.bool_)
    for impl in ("pallas_tpu", "splash_tpu"):
      f = lambda q, k, v, m: attention(q, k, v, key_valid=m, causal=True, implementation=impl)
      g = jax.grad(lambda *x: jnp.sum(f(*x).astype(jnp.float32)), argnums=(0, 1, 2))
      with kernels.target_platform("tpu"):
        c = jax.jit(g).trace(q, k, k, m).lower().compile()
      cost = c.cost_analysis()
      calls = c.as_text().count('custom_call_target="tpu_custom_call"')
      print(f"{name:11s} {impl:11s} temp {c.memory_analysis().temp_size_in_bytes / 1e9:.3f} GB"
            f"  XLA-counted {cost.get('bytes accessed', 0) / 1e9:.2f} GB moved, "
            f"{cost.get('flops', 0) / 1e12:.3f} TFLOP  Mosaic calls "
            f"{calls}", flush=True)


if __name__ == "__main__":
  main()
