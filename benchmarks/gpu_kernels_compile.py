"""The Pallas GPU kernels compiled deviceless by XLA:GPU + Triton (no GPU needed): compile
time and XLA's temporary memory of the lattice forward, its gradient (forward, dq, dk/dv) and
the decode step, per GPU, lattice head dim E and thread count W, in bf16.

  pip install "jax[cuda12]==0.10.2"        # the CUDA plugin (requirements-test.txt has it)
  python benchmarks/gpu_kernels_compile.py                      # H100 and RTX PRO 6000
  python benchmarks/gpu_kernels_compile.py --gpus=h100 --head_dims=80 --threads=128 --json

Temporaries are what XLA allocates around the kernels (the kernels' own outputs are not
counted): copies of operands, softmax statistics, the decode kernel's per-split partials. The
figures in docs/benchmarks.md compare this tree with one before the kernels read q, k, v in
place (run the same script with PYTHONPATH pointing at that tree).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only GPUs; the host stays a CPU
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # the CUDA plugin without a GPU
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from lace_jax.kernels.lattice_attention import decode as decode_lib  # noqa: E402
from lace_jax.kernels.lattice_attention import lattice_attention_pallas  # noqa: E402
from lace_jax import plan  # noqa: E402

MiB = 2**20


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x]


def measure(gpu: str, e: int, w: int, *, b: int, t: int, s: int, c: int) -> list[dict]:
  device = plan.resolve_target(f"cuda:{gpu}").devices[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  sd = lambda *shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
  q, valid = sd(b, w, t, c, e), sd(b, w, t, dt=jnp.bool_)
  f = lambda q, k, v, m: lattice_attention_pallas(q, k, v, key_valid=m)
  grad = jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=(0, 1, 2))
  dec_args = (sd(b, w, c, e), sd(b, w, c, e, s), sd(b, w, c, e, s), sd(b, w, s, dt=jnp.bool_),
              sd(b, dt=jnp.int32), sd(b, w, c, e), sd(b, w, c, e), sd(b, w, dt=jnp.bool_))
  cases = [("forward", f, (q, q, q, valid), b * w * t * c * e * 2),
           ("gradient", grad, (q, q, q, valid), b * w * t * c * e * 2),
           ("decode", decode_lib.decode_pallas, dec_args, b * w * s * c * e * 2)]
  rows = []
  for name, fn, args, operand in cases:
    t0 = time.perf_counter()
    try:
      compiled = jax.jit(fn).trace(*args).lower().compile()
    except Exception as err:  # noqa: BLE001 -- reported, the sweep goes on
      rows.append(dict(gpu=gpu, E=e, W=w, kernel=name, ok=False,
                       error=str(err).splitlines()[0][:200]))
      continue
    seconds = time.perf_counter() - t0
    temp = compiled.memory_analysis().temp_size_in_bytes
    rows.append(dict(gpu=gpu, E=e, W=w, kernel=name, ok=True, compile_s=round(seconds, 2),
                     temp_mib=round(temp / MiB, 1), operand_mib=round(operand / MiB, 1),
                     # trees before plan.custom_calls (the "before" figures) have none
                     triton_calls=plan.custom_calls(compiled).get("__gpu$xla.gpu.triton", 0)
                     if hasattr(plan, "custom_calls") else None))
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--gpus", default="h100,rtx6000pro")
  p.add_argument("--head_dims", default="64,80", help="lattice head dims E (1.7B: 64, 4B: 80)")
  p.add_argument("--threads", default="4,16,128", help="thread counts W")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--steps", type=int, default=512, help="T: columns per thread (training)")
  p.add_argument("--cache", type=int, default=4096, help="S: cache columns (decode)")
  p.add_argument("--heads", type=int, default=4, help="C: lattice heads")
  p.add_argument("--json", action="store_true", help="one JSON object per row")
  a = p.parse_args(argv)
  print(f"jax {jax.__version__}, B={a.batch} T={a.steps} S={a.cache} C={a.heads}, bf16")
  if not a.json:
    print("| GPU | E | W | kernel | compiled | compile s | XLA temp MiB | one operand MiB |")
    print("|---|---|---|---|---|---|---|---|")
  failed = 0
  for gpu in a.gpus.split(","):
    for e in _ints(a.head_dims):
      for w in _ints(a.threads):
        for r in measure(gpu, e, w, b=a.batch, t=a.steps, s=a.cache, c=a.heads):
          failed += not r["ok"]
          if a.json:
            print(json.dumps(r), flush=True)
          elif r["ok"]:
            print(f"| {gpu} | {e} | {w} | {r['kernel']} | yes | {r['compile_s']} | "
                  f"{r['temp_mib']} | {r['operand_mib']} |", flush=True)
          else:
            print(f"| {gpu} | {e} | {w} | {r['kernel']} | NO: {r['error']} | | | |", flush=True)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
