"""Lattice attention: compiled memory (XLA's memory_analysis) and CPU time of the reference vs
the chunked implementation, at W threads x T tokens per thread (4B-shaped lattice: C = 4 heads,
E = 80). The reference materialises [B, C, W*T, W*T] scores; the chunked one is linear in W*T.

  python benchmarks/lattice_attention.py                    # W = 4, T in 1k, 2k, 4k, 8k
  python benchmarks/lattice_attention.py --time_limit_gb=4  # time only runs that fit
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp

from lace_jax.kernels.lattice_attention import lattice_attention


def measure(impl: str, w: int, t: int, *, c: int, e: int, dtype, grad: bool, run: bool):
  shape = jax.ShapeDtypeStruct((1, w, t, c, e), dtype)
  valid = jax.ShapeDtypeStruct((1, w, t), jnp.bool_)
  f = functools.partial(lattice_attention, implementation=impl)
  fn = (lambda q, k, v, m: f(q, k, v, key_valid=m))
  if grad:
    fn = jax.grad(lambda q, k, v, m: jnp.sum(f(q, k, v, key_valid=m).astype(jnp.float32)),
                  argnums=(0, 1, 2))
  t0 = time.perf_counter()
  compiled = jax.jit(fn).trace(shape, shape, shape, valid).lower().compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  temp = int(mem.temp_size_in_bytes)
  row = {"impl": impl, "W": w, "T": t, "grad": grad, "temp_bytes": temp, "compile_s": compile_s}
  if run:
    ks = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(x, shape.shape, dtype) for x in ks)
    m = jnp.ones(valid.shape, bool)
    jax.block_until_ready(compiled(q, k, v, m))
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(q, k, v, m))
    row["seconds"] = time.perf_counter() - t0
  return row


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--threads", type=int, default=4)
  p.add_argument("--lengths", default="1024,2048,4096,8192")
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--head_dim", type=int, default=80)
  p.add_argument("--time_limit_gb", type=float, default=6.0,
                 help="time a configuration only if its compiled temp memory is below this")
  p.add_argument("--grad", action="store_true", help="measure forward + backward")
  a = p.parse_args()
  rows = []
  for t in map(int, a.lengths.split(",")):
    for impl in ("reference", "xla_chunked"):
      probe = measure(impl, a.threads, t, c=a.heads, e=a.head_dim, dtype=jnp.float32,
                      grad=a.grad, run=False)
      fits = probe["temp_bytes"] < a.time_limit_gb * 2**30
      row = measure(impl, a.threads, t, c=a.heads, e=a.head_dim, dtype=jnp.float32,
                    grad=a.grad, run=True) if fits else probe
      rows.append(row)
      print(json.dumps(row), flush=True)
  print("\n| T | W*T | reference temp | chunked temp | reference CPU s | chunked CPU s |")
  print("|---|---|---|---|---|---|")
  for t in map(int, a.lengths.split(",")):
    r, c = [x for x in rows if x["T"] == t]
    fmt = lambda x: f"{x['seconds']:.2f}" if "seconds" in x else "not run (memory)"
    print(f"| {t} | {a.threads * t} | {r['temp_bytes'] / 2**20:,.0f} MiB | "
          f"{c['temp_bytes'] / 2**20:,.1f} MiB | {fmt(r)} | {fmt(c)} |")
  ts = [int(x) for x in a.lengths.split(",")]
  ratio = lambda impl: ([x for x in rows if x["impl"] == impl and x["T"] == ts[-1]][0]["temp_bytes"]
                        / [x for x in rows if x["impl"] == impl and x["T"] == ts[0]][0]["temp_bytes"])
  print(f"\nmemory ratio T={ts[-1]} / T={ts[0]}: reference {ratio('reference'):.1f}x, "
        f"xla_chunked {ratio('xla_chunked'):.1f}x")


if __name__ == "__main__":
  main()
