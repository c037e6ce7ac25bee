"""The Pallas TPU (Mosaic) lattice kernels in the TPU interpreter (`pltpu.InterpretParams`: HBM,
VMEM, DMAs and the grid as a TPU runs them), against the reference: values and gradients, fp32
and bf16, every mask, W up to 16, keys valid for none / part / all of a thread, and NaN in
every invalid key and value (which must not reach any output). Compiled for real TPUs in
tests/test_tpu_compile.py.

Error metric as tests/test_kernels.py: max |kernel - reference| / max(max |reference|, 1).
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from lace_jax import kernels
from lace_jax.kernels.lattice_attention import (lattice_attention, lattice_attention_reference,
                                                lattice_decode_attention)
from lace_jax.kernels.lattice_attention import decode as decode_lib
from lace_jax.kernels.lattice_attention import pallas_tpu
from lace_jax.kernels.lattice_attention.mask import Mode, may_attend

MODES = ("causal", "other_threads", "same_position")
TOL = {"float32": 1e-5, "bfloat16": 2e-2}


@pytest.fixture(autouse=True)
def _fresh_interpreter():
  yield
  pltpu.reset_tpu_interpret_mode_state()  # after a failure too, as its docs ask


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1.0))


def _inputs(b, w, t, c, e, seed, dtype=jnp.float32):
  """q, k, v, key validity and an output cotangent. Thread 0 of batch 0 has no valid key
  (length 0), the last thread of every batch row is cut mid-way (partial), the rest have left
  padding; every invalid key and value is NaN."""
  ks = jax.random.split(jax.random.key(seed), 4)
  q, k, v = (jax.random.normal(x, (b, w, t, c, e), jnp.float32) for x in ks[:3])
  rng = np.random.default_rng(seed)
  valid = np.ones((b, w, t), bool)
  for bb, ww in itertools.product(range(b), range(w)):
    valid[bb, ww, :rng.integers(0, t // 4)] = False
  valid[:, w - 1, rng.integers(t // 3, t):] = False
  valid[0, 0] = False
  valid = jnp.asarray(valid)
  poison = lambda x: jnp.where(valid[..., None, None], x, jnp.nan).astype(dtype)
  return q.astype(dtype), poison(k), poison(v), valid, jax.random.normal(ks[3], q.shape)


def _reference(q, k, v, valid, mode):
  """The reference on the same inputs with the poisoned (invalid) entries zeroed, in fp32."""
  clean = lambda x: jnp.where(valid[..., None, None], x, 0).astype(jnp.float32)
  return lattice_attention_reference(q.astype(jnp.float32), clean(k), clean(v), key_valid=valid,
                                     mask=mode)


SMALL = pallas_tpu.BlockSizes(fwd=pallas_tpu.Tiles(128, 256), dq=pallas_tpu.Tiles(256, 128),
                              dkv=pallas_tpu.Tiles(128, 128))


def _value_and_grads(fn, q, k, v, valid, ct):
  out, pull = jax.vjp(lambda q, k, v: fn(q, k, v, valid), q, k, v)
  return out, pull(ct.astype(out.dtype))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("w", [1, 3])
def test_tpu_kernels_equal_reference_fp32(mode, w):
  """T = 256 with every kernel's own tiles (several query and key blocks per thread)."""
  q, k, v, valid, ct = _inputs(2, w, 256, 2, 80, seed=w)
  kernel = functools.partial(pallas_tpu.lattice_attention_pallas_tpu, mask=mode,
                             block_sizes=SMALL, interpret=True)
  out, grads = _value_and_grads(lambda q, k, v, m: kernel(q, k, v, key_valid=m), q, k, v,
                                valid, ct)
  ref, ref_grads = _value_and_grads(lambda q, k, v, m: _reference(q, k, v, m, mode), q, k, v,
                                    valid, ct)
  assert np.isfinite(np.asarray(out)).all()
  assert rel_err(out, ref) <= TOL["float32"]
  for name, g, r in zip("qkv", grads, ref_grads):
    r = jnp.where(valid[..., None, None], r, 0) if name != "q" else r
    assert np.isfinite(np.asarray(g)).all(), name
    assert rel_err(g, r) <= TOL["float32"], name
  # a thread with no readable key (or other_threads at W = 1) reads nothing: zeros
  if mode == "other_threads" and w == 1:
    np.testing.assert_array_equal(np.asarray(out), 0.0)


@pytest.mark.parametrize("mode", MODES)
def test_tpu_kernels_equal_reference_bf16_at_sixteen_threads(mode):
  """W = 16, E = 64 (the 1.7B lattice head dim), bf16 in, default tiles."""
  q, k, v, valid, ct = _inputs(1, 16, 128, 1, 64, seed=7, dtype=jnp.bfloat16)
  kernel = functools.partial(pallas_tpu.lattice_attention_pallas_tpu, mask=mode, interpret=True)
  out, grads = _value_and_grads(lambda q, k, v, m: kernel(q, k, v, key_valid=m), q, k, v,
                                valid, ct)
  assert out.dtype == jnp.bfloat16
  ref, ref_grads = _value_and_grads(lambda q, k, v, m: _reference(q, k, v, m, mode), q, k, v,
                                    valid, ct)
  assert rel_err(out, ref) <= TOL["bfloat16"]
  for name, g, r in zip("qkv", grads, ref_grads):
    r = jnp.where(valid[..., None, None], r, 0) if name != "q" else r
    assert np.isfinite(np.asarray(g, np.float32)).all(), name
    assert rel_err(g, r) <= TOL["bfloat16"], name


@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("w,t,s,bq,bk", [(1, 256, 256, 128, 128), (3, 512, 512, 256, 128),
                                         (2, 384, 384, 128, 384), (4, 512, 256, 128, 256)])
def test_block_walks_visit_exactly_the_blocks_the_mask_reaches(mode, w, t, s, bq, bk):
  """The forward / dq walk of every query block and the dk/dv walk of every key block equal the
  block pairs holding at least one allowed (query, key) pair: none missed (correctness), none
  extra (the skipped work)."""
  geo = pallas_tpu._Geometry(mode, w, t, s, bq, bk)
  q_thr, q_col = np.repeat(np.arange(w), t), np.tile(np.arange(t), w)
  k_thr, k_col = np.repeat(np.arange(w), s), np.tile(np.arange(s), w)
  allowed = np.asarray(may_attend(mode, q_thr[:, None], q_col[:, None], k_thr[None], k_col[None]))
  allowed = np.broadcast_to(allowed, (w * t, w * s))
  nqb, nkb = w * t // bq, w * s // bk
  truth = {(i, kb) for i in range(nqb) for kb in range(nkb)
           if allowed[i * bq:(i + 1) * bq, kb * bk:(kb + 1) * bk].any()}
  fwd, bwd = set(), set()
  for i in range(nqb):
    for j in range(geo.longest_key_walk()):
      kb, _, _, real = geo.keys_of(jnp.int32(i), jnp.int32(j))
      if bool(real):
        assert (i, int(kb)) not in fwd, "a block visited twice"
        fwd.add((i, int(kb)))
  for kb in range(nkb):
    for j in range(geo.longest_query_walk()):
      i, _, _, real = geo.queries_of(jnp.int32(kb), jnp.int32(j))
      if bool(real):
        bwd.add((int(i), kb))
  assert fwd == truth and bwd == truth
  assert geo.visited_pairs() == len(truth)


def _decode_inputs(b, w, s, c, e, length, seed, dtype=jnp.float32):
  """Decode inputs with the lattice cache [B, W, C, E, S]; NaN in every invalid
  cache entry and in every column at or past `length` (stale or never written)."""
  ks = jax.random.split(jax.random.key(seed), 7)
  q = jax.random.normal(ks[0], (b, w, c, e)).astype(dtype)
  kc, vc = (jax.random.normal(x, (b, w, c, e, s)) for x in ks[1:3])
  kn, vn = (jax.random.normal(x, (b, w, c, e)).astype(dtype) for x in ks[3:5])
  cache_valid = jax.random.bernoulli(ks[5], 0.7, (b, w, s))
  new_valid = jax.random.bernoulli(ks[6], 0.7, (b, w)).at[0].set(False)
  length = jnp.asarray(length, jnp.int32)
  live = cache_valid & (jnp.arange(s)[None, None] < length[:, None, None])
  poison = lambda x: jnp.where(live[:, :, None, None, :], x, jnp.nan).astype(dtype)
  return q, poison(kc), poison(vc), cache_valid, length, kn, vn, new_valid


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("w", [1, 4, 16])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tpu_decode_equals_reference(mode, w, dtype):
  """Cache lengths 0 (nothing readable in batch row 0), one block, mid-block and full, with
  S = 512 in 128-column blocks."""
  b, s, c, e = 4, 512, 2, 80
  dt = jnp.dtype(dtype)
  args = _decode_inputs(b, w, s, c, e, [0, 128, 301, s], seed=w, dtype=dt)
  got = jax.jit(functools.partial(lattice_decode_attention, mask=mode,
                                  implementation="pallas_tpu_interpret"))(*args)
  assert got.dtype == dt
  q, kc, vc, cache_valid, length, kn, vn, new_valid = args
  clean = lambda x: jnp.nan_to_num(x.astype(jnp.float32), nan=0.0)
  ref = decode_lib.decode_reference(q.astype(jnp.float32), clean(kc), clean(vc), cache_valid,
                                    length, kn.astype(jnp.float32), vn.astype(jnp.float32),
                                    new_valid, mask=mode)
  assert np.isfinite(np.asarray(got, np.float32)).all()
  assert rel_err(got, ref) <= TOL[dtype]
  np.testing.assert_array_equal(np.asarray(got[0], np.float32), 0.0)  # nothing readable


def test_tpu_decode_block_walk_stops_at_the_filled_columns():
  """A 128-column block with length in it: the columns past it do not count, whatever they
  hold (here finite garbage, 1e4, as a reused slot holds an earlier request's entries)."""
  b, w, s, c, e = 2, 2, 384, 1, 64
  args = list(_decode_inputs(b, w, s, c, e, [130, 5], seed=3))
  dead = jnp.arange(s)[None, None, None, None, :] >= args[4][:, None, None, None, None]
  fill = lambda x: jnp.where(dead, 1e4, jnp.nan_to_num(x, nan=1e4))
  run = functools.partial(pallas_tpu.decode_pallas_tpu, block_k=128, interpret=True)
  got = run(*args)
  again = run(args[0], fill(args[1]), fill(args[2]), *args[3:])
  np.testing.assert_array_equal(np.asarray(again), np.asarray(got))


def test_tiles_and_shapes_are_validated():
  with pytest.raises(ValueError, match="block_q=96"):
    pallas_tpu.Tiles(96, 128)
  with pytest.raises(ValueError, match="block_k=0"):
    pallas_tpu.Tiles(128, 0)
  q = jnp.ones((1, 2, 100, 1, 64))
  valid = jnp.ones((1, 2, 100), bool)
  with pytest.raises(ValueError, match="multiples of 128"):
    pallas_tpu.lattice_attention_pallas_tpu(q, q, q, key_valid=valid, interpret=True)
  q = jnp.ones((1, 2, 256, 1, 64))
  with pytest.raises(ValueError, match="block_sizes.fwd"):
    pallas_tpu.lattice_attention_pallas_tpu(
        q, q, q, key_valid=jnp.ones((1, 2, 256), bool), interpret=True,
        block_sizes=pallas_tpu.BlockSizes(fwd=pallas_tpu.Tiles(512, 128)))
  assert pallas_tpu.BlockSizes.for_shapes(4608, 4608).fwd == pallas_tpu.Tiles(512, 512)
  assert pallas_tpu.BlockSizes.for_shapes(640, 384).fwd == pallas_tpu.Tiles(128, 384)


def test_dispatch_on_tpu_picks_the_tpu_kernels_and_falls_back_for_other_shapes():
  """implementation='pallas' compiled for a TPU uses the Mosaic kernels (traced here, as the
  plan mode does); a T that is not a multiple of 128 goes to xla_chunked with one warning
  naming the shape."""
  q, k, v, valid, _ = _inputs(1, 2, 128, 1, 64, seed=1)
  valid = jnp.ones_like(valid)
  with kernels.target_platform("tpu"):
    text = jax.jit(lambda q, k, v: lattice_attention(q, k, v, key_valid=valid,
                                                     implementation="pallas")
                   ).trace(q, q, q).jaxpr.pretty_print()
  assert "lattice_tpu_fwd_causal" in text
  odd = jnp.ones((1, 2, 100, 1, 64))
  odd_valid = jnp.ones((1, 2, 100), bool)
  with kernels.target_platform("tpu"), pytest.warns(RuntimeWarning, match=r"100, 1, 64"):
    got = lattice_attention(odd, odd, odd, key_valid=odd_valid, implementation="pallas")
  ref = lattice_attention_reference(odd, odd, odd, key_valid=odd_valid)
  assert rel_err(got, ref) <= 1e-5


def test_decode_dispatch_on_tpu_falls_back_for_small_heads():
  """A lattice head dim off 16 (the tiny presets' E = 4) goes to the XLA decode with one warning
  naming the shape, on the whole batch, and equals the reference."""
  args = _decode_inputs(2, 2, 256, 1, 4, [100, 256], seed=4)
  clean = [jnp.nan_to_num(x) if x.dtype == jnp.float32 else x for x in args]
  with kernels.target_platform("tpu"), pytest.warns(RuntimeWarning, match=r"E=4"):
    got = lattice_decode_attention(*clean, implementation="pallas")
  assert rel_err(got, decode_lib.decode_reference(*clean)) <= 1e-5
