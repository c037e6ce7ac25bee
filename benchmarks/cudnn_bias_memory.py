"""Compiled memory of the backbone's cuDNN attention backward, with a dense mask (the old call)
and with is_causal + sequence lengths (`kernels.attention`, implementation="cudnn"), compiled
for one H100 from this host (no GPU needed; issue 13 finding 1).

  python benchmarks/cudnn_bias_memory.py                       # sft_4b's shape on one H100
  python benchmarks/cudnn_bias_memory.py --rows=64 --layers=2  # the whole sft_4b batch, 2 layers

jax.nn.dot_product_attention(mask=...) turns the mask into an additive bias, and cuDNN's
backward then always returns the bias gradient: a [rows, 1, T, S] tensor per layer, never used.
Variants:
  mask      the old call: dot_product_attention(q, k, v, mask=[rows, 1, T, S], "cudnn")
  lengths   attention(..., implementation="cudnn"): is_causal + per-row sequence lengths
            after the valid tokens are gathered to the front of each row
The function compiled is the gradient wrt q, k, v of sum(attention) (`--layers=0`), or of a
stack of `--layers` attention blocks (q/k/v projections from d_model, attention, o projection,
residual) wrt the block weights and the input. Shapes default to the sft_4b recipe on
cuda:h100x8: 16 examples x 4 threads over 8 GPUs = 8 rows per GPU of T = 4096 tokens, Qwen3-4B
heads (32 query, 8 kv, head dim 128, d_model 2560), bf16.

The cuDNN version check that jax runs while tracing needs a GPU jaxlib; it is patched to
report 9.8 (the compile itself runs XLA:GPU's cuDNN fusion passes deviceless).

Recorded (jax 0.10.2, compile-only H100; one bf16 [8, 1, 4096, 4096] bias gradient = 0.250 GiB):
  attention alone, grad wrt q, k, v:  temp 1.004 GiB (mask) -> 0.879 GiB (lengths)
  --layers=2 (remat blocks):          temp 2.156 GiB (mask) -> 1.406 GiB (lengths)
  the whole sft_4b train step (plan mode, cuda:h100x8, --config.model.attention=cudnn, the
  version check patched the same way): temp 12.39 GB (mask) -> 11.84 GB (lengths) per device
In the attention-alone figure the gathered copies of q, k, v and of the output cost about half
the bias gradient back (q, k, v are live arguments there); in layers, where q, k, v are made
and used inside the step, the drop exceeds the bias gradient per layer.
"""

from __future__ import annotations

import argparse
import os

# compile-only GPUs on a machine without one: the CUDA plugin's start-up check would otherwise
# fail on cuInit and leave the plugin unregistered (lace_jax.plan does the same)
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402


def build(variant: str, rows: int, t: int, n: int, kh: int, h: int, d: int, layers: int):
  """(function, its argument shapes) for one variant."""
  from lace_jax.kernels.attention import attention, structured_mask

  def attend(q, k, v, valid):
    if variant == "mask":  # main before this change: a dense structured mask
      mask = structured_mask(t, valid, True)[:, None]  # [B, 1, T, S]
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=h**-0.5,
                                         implementation="cudnn")
      return jnp.where(mask.any(-1)[:, 0, :, None, None], out, 0).astype(q.dtype)
    return attention(q, k, v, key_valid=valid, implementation="cudnn")

  bf = jnp.bfloat16
  if layers == 0:
    def loss(q, k, v, valid):
      return jnp.sum(attend(q, k, v, valid).astype(jnp.float32))
    fn = jax.grad(loss, argnums=(0, 1, 2))
    shapes = ((rows, t, n, h, bf), (rows, t, kh, h, bf), (rows, t, kh, h, bf), (rows, t, bool))
    return fn, shapes

  def block(x, w, valid):
    wq, wk, wv, wo = w
    q = jnp.einsum("BTD,DNH->BTNH", x, wq)
    k = jnp.einsum("BTD,DKH->BTKH", x, wk)
    v = jnp.einsum("BTD,DKH->BTKH", x, wv)
    return x + jnp.einsum("BTNH,NHD->BTD", attend(q, k, v, valid), wo)

  def loss(x, ws, valid):
    for w in ws:
      x = jax.checkpoint(block)(x, w, valid)  # remat="full", as the recipes train
    return jnp.sum(x.astype(jnp.float32))

  fn = jax.grad(loss, argnums=(0, 1))
  wshape = ((d, n, h, bf), (d, kh, h, bf), (d, kh, h, bf), (n, h, d, bf))
  return fn, ((rows, t, d, bf), (wshape,) * layers, (rows, t, bool))


def compile_memory(fn, shapes, gpu: str):
  from jax.experimental import topologies

  from lace_jax.plan import gpu_target_config
  topo = topologies.get_topology_desc(topology_name=gpu, platform="cuda",
                                      target_config=gpu_target_config(gpu), topology="1x1x1")
  sharding = jax.sharding.SingleDeviceSharding(topo.devices[0])

  def spec(s):
    if isinstance(s[0], tuple):
      return tuple(spec(x) for x in s)
    return jax.ShapeDtypeStruct(s[:-1], s[-1], sharding=sharding)

  args = tuple(spec(s) for s in shapes)
  lowered = jax.jit(fn).trace(*args).lower()
  text = lowered.as_text()
  compiled = lowered.compile()
  return compiled.memory_analysis(), text


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--variants", default="mask,lengths")
  p.add_argument("--rows", type=int, default=8, help="batch x threads per GPU")
  p.add_argument("--seq", type=int, default=4096)
  p.add_argument("--heads", type=int, default=32)
  p.add_argument("--kv_heads", type=int, default=8)
  p.add_argument("--head_dim", type=int, default=128)
  p.add_argument("--d_model", type=int, default=2560)
  p.add_argument("--layers", type=int, default=0, help="0: attention alone")
  p.add_argument("--gpu", default="h100")
  a = p.parse_args(argv)

  from jax._src.cudnn import fused_attention_stablehlo as fa
  fa.check_cudnn_version = lambda: 90800

  from lace_jax import kernels
  bias = a.rows * a.seq * a.seq * 2  # one [rows, 1, T, S] bf16 bias gradient
  print(f"rows={a.rows} T=S={a.seq} N={a.heads} K={a.kv_heads} H={a.head_dim} "
        f"layers={a.layers or 'attention only'} gpu={a.gpu}; one bf16 [rows, 1, T, S] bias "
        f"gradient = {bias / 2**30:.3f} GiB")
  print(f"{'variant':<10}{'temp GiB':>12}{'argument GiB':>14}{'output GiB':>12}"
        f"{'bias grad GiB':>15}  cuDNN calls")
  for variant in a.variants.split(","):
    fn, shapes = build(variant, a.rows, a.seq, a.heads, a.kv_heads, a.head_dim, a.d_model,
                       a.layers)
    with kernels.target_platform("gpu"):
      mem, text = compile_memory(fn, shapes, a.gpu)
    calls = sorted({w.split("(")[0] for w in text.split("custom_call @")[1:]
                    if w.startswith("__cudnn")})
    has_dbias = any("Bias" in c and "Backward" in c for c in calls)
    g = lambda x: f"{x / 2**30:.3f}"
    print(f"{variant:<10}{g(mem.temp_size_in_bytes):>12}{g(mem.argument_size_in_bytes):>14}"
          f"{g(mem.output_size_in_bytes):>12}{g(bias * max(a.layers, 1)) if has_dbias else '0':>15}"
          f"  {' '.join(calls)}")


if __name__ == "__main__":
  main()
