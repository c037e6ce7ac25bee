"""The Pallas kernels compiled by Triton and run on a GPU (`interpret=False`), against the
reference: the mirror of tests/test_kernels.py's interpreter tests. Runs only where JAX's backend
is a GPU (the CPU CI compiles these kernels deviceless instead: tests/test_gpu_compile.py).

Run on a GPU machine: `python -m pytest tests/test_kernels_gpu.py`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lace_jax.kernels.lattice_attention import (PallasBlockSizes, lattice_attention_pallas,
                                       lattice_attention_reference, lattice_decode_attention)
from lace_jax.kernels.lattice_attention import decode as decode_lib
from lace_jax.kernels.lattice_attention.pallas_gpu import Tiles
from tests.test_kernels import MODES, _fwd_and_grads, _inputs, forward_into_buffers, rel_err

pytestmark = pytest.mark.skipif(jax.default_backend() not in ("gpu", "cuda", "rocm"),
                                reason="needs a GPU backend (deviceless compile checks run in CI)")

TOL = {"float32": 1e-4, "bfloat16": 2e-2}  # fp32 kernels use IEEE dots (Precision.HIGHEST)


def _pallas(blocks=None):
  return functools.partial(lattice_attention_pallas, block_sizes=blocks)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("w", [1, 4, 16, 128])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_equals_reference_on_gpu(mode, w, dtype):
  t = 77 if w <= 16 else 9  # not a multiple of any tile
  q, k, v, valid, ct = _inputs(w, t, seed=w, dtype=jnp.dtype(dtype), e=64)
  f32 = lambda x: x.astype(jnp.float32)
  ref_out, ref_grads = _fwd_and_grads(lattice_attention_reference, f32(q), f32(k), f32(v), valid,
                                      ct, mode)
  out, grads = _fwd_and_grads(_pallas(), q, k, v, valid, ct, mode)
  assert out.dtype == q.dtype
  assert rel_err(out, ref_out) <= TOL[dtype]
  for g, r, name in zip(grads, ref_grads, "qkv"):
    assert rel_err(g, r) <= TOL[dtype], (name, rel_err(g, r))


@pytest.mark.parametrize("e", [64, 80, 128])
def test_head_dims_and_per_kernel_tiles_on_gpu(e):
  q, k, v, valid, ct = _inputs(4, 200, seed=e, dtype=jnp.bfloat16, e=e)
  f32 = lambda x: x.astype(jnp.float32)
  ref_out, ref_grads = _fwd_and_grads(lattice_attention_reference, f32(q), f32(k), f32(v), valid,
                                      ct, "causal")
  blocks = PallasBlockSizes(fwd=Tiles(64, 32), dq=Tiles(32, 64), dkv=Tiles(64, 16))
  for bs in (None, blocks):
    out, grads = _fwd_and_grads(_pallas(bs), q, k, v, valid, ct, "causal")
    assert rel_err(out, ref_out) <= TOL["bfloat16"]
    for g, r in zip(grads, ref_grads):
      assert rel_err(g, r) <= TOL["bfloat16"]


@pytest.mark.parametrize("mode", MODES)
def test_writes_every_output_element_on_gpu(mode):
  q, k, v, valid, _ = _inputs(3, 70, seed=5, e=80)
  b, w, t, c, e = q.shape
  out, lse = forward_into_buffers(
      q, k, v, key_valid=valid, mask=mode,
      o_buffer=jnp.full((b, c, w * t, e), jnp.nan, jnp.float32),
      lse_buffer=jnp.full((b, c, w * t), jnp.nan, jnp.float32))
  assert not np.isnan(np.asarray(out)).any() and not np.isnan(np.asarray(lse)).any()
  ref = lattice_attention_reference(q, k, v, key_valid=valid, mask=mode)
  assert rel_err(out, ref) <= TOL["float32"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("w", [1, 4, 16, 128])
@pytest.mark.parametrize("e", [64, 80])
def test_decode_equals_reference_on_gpu(mode, w, e):
  b, s, c = 3, 300, 4
  ks = jax.random.split(jax.random.key(w + e), 7)
  q = jax.random.normal(ks[0], (b, w, c, e))
  kc, vc = (jax.random.normal(x, (b, w, c, e, s)) for x in ks[1:3])
  kn, vn = (jax.random.normal(x, (b, w, c, e)) for x in ks[3:5])
  cache_valid = jax.random.bernoulli(ks[5], 0.8, (b, w, s))
  new_valid = jnp.ones((b, w), bool).at[0, 0].set(False)
  length = jnp.array([s, 120, 0], jnp.int32)
  args = (q, kc, vc, cache_valid, length, kn, vn, new_valid)
  ref = decode_lib.decode_reference(*args, mask=mode)
  got = jax.jit(functools.partial(lattice_decode_attention, mask=mode,
                                  implementation="pallas"))(*args)
  assert rel_err(got, ref) <= TOL["float32"]
  bf = [x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x for x in args]
  got16 = jax.jit(functools.partial(lattice_decode_attention, mask=mode,
                                    implementation="pallas"))(*bf)
  assert got16.dtype == jnp.bfloat16 and rel_err(got16, ref) <= TOL["bfloat16"]
