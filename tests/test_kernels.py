"""Every lattice-attention implementation against the reference (Pallas in interpret mode on
CPU), forward and gradients; the decode path; backbone attention; lowering for CUDA and TPU.

Error metric: max |impl - reference| / max(max |reference|, 1) over the compared array (inputs
are N(0, 1), so outputs and gradients are O(1); the floor keeps exactly-zero reference
gradients, e.g. same_position at W = 1, from dividing by zero).
"""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

import lace_jax as lj
from lace_jax.kernels.attention import attention, structured_mask
from lace_jax.kernels.attention.reference import attention_reference
from lace_jax.kernels.lattice_attention import (ChunkedBlockSizes, PallasBlockSizes, lattice_attention,
                                       lattice_attention_chunked, lattice_attention_pallas,
                                       lattice_attention_reference, lattice_decode_attention)
from lace_jax.kernels.lattice_attention import decode as decode_lib
from lace_jax.kernels.lattice_attention import pallas_gpu
from lace_jax.kernels.lattice_attention.pallas_gpu import Tiles

MODES = ("causal", "other_threads", "same_position")
TOL = {("xla_chunked", "float32"): 1e-5, ("pallas", "float32"): 1e-4,
       ("xla_chunked", "bfloat16"): 2e-2, ("pallas", "bfloat16"): 2e-2}


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1.0))


def _inputs(w, t, seed, dtype=jnp.float32, b=2, c=2, e=16):
  """Random q, k, v and a key mask with left padding and a thread that finished early."""
  ks = jax.random.split(jax.random.key(seed), 4)
  q, k, v = (jax.random.normal(x, (b, w, t, c, e)).astype(dtype) for x in ks[:3])
  rng = np.random.default_rng(seed)
  valid = np.ones((b, w, t), bool)
  for bb in range(b):
    for ww in range(w):
      pad = rng.integers(0, t // 3 + 1)
      valid[bb, ww, :pad] = False  # left padding
    valid[bb, w - 1, rng.integers(t // 2, t):] = False  # finished early
  return q, k, v, jnp.asarray(valid), jax.random.normal(ks[3], (b, w, t, c, e))


def _impl(name):
  if name == "xla_chunked":  # small blocks, so several key blocks and query blocks are used
    return functools.partial(lattice_attention_chunked,
                             block_sizes=ChunkedBlockSizes(block_k=16, block_q=24))
  # each kernel its own tiles, all smaller than the grid, so several blocks of each are used
  return functools.partial(lattice_attention_pallas, interpret=True, block_sizes=PallasBlockSizes(
      fwd=Tiles(16, 32), dq=Tiles(32, 16), dkv=Tiles(16, 16)))


def _fwd_and_grads(fn, q, k, v, valid, ct, mode):
  def loss(q, k, v):
    out = fn(q, k, v, key_valid=valid, mask=mode)
    return jnp.sum(out.astype(jnp.float32) * ct), out
  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


@pytest.mark.parametrize("impl", ["xla_chunked", "pallas"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("w", [1, 2, 4, 8])
def test_equals_reference_fp32(impl, mode, w):
  t = 13 if w < 8 else 7  # not a multiple of any block size
  q, k, v, valid, ct = _inputs(w, t, seed=w)
  ref_out, ref_grads = _fwd_and_grads(lattice_attention_reference, q, k, v, valid, ct, mode)
  out, grads = _fwd_and_grads(_impl(impl), q, k, v, valid, ct, mode)
  tol = TOL[(impl, "float32")]
  assert rel_err(out, ref_out) <= tol
  for g, r, name in zip(grads, ref_grads, "qkv"):
    assert rel_err(g, r) <= tol, (name, rel_err(g, r))
  out2, grads2 = _fwd_and_grads(_impl(impl), q, k, v, valid, ct, mode)  # deterministic
  np.testing.assert_array_equal(np.asarray(out2), np.asarray(out))
  for g, g2 in zip(grads, grads2):
    np.testing.assert_array_equal(np.asarray(g2), np.asarray(g))


@pytest.mark.parametrize("impl", ["xla_chunked", "pallas"])
@pytest.mark.parametrize("mode", MODES)
def test_equals_reference_bf16(impl, mode):
  q, k, v, valid, ct = _inputs(4, 19, seed=11, dtype=jnp.bfloat16)
  f32 = lambda x: x.astype(jnp.float32)
  ref_out, ref_grads = _fwd_and_grads(lattice_attention_reference, f32(q), f32(k), f32(v), valid,
                                      ct, mode)
  out, grads = _fwd_and_grads(_impl(impl), q, k, v, valid, ct, mode)
  assert out.dtype == jnp.bfloat16
  assert rel_err(out, ref_out) <= TOL[(impl, "bfloat16")]
  for g, r in zip(grads, ref_grads):
    assert rel_err(g, r) <= TOL[(impl, "bfloat16")]


class _PallasIntoBuffers:
  """Stands in for `pallas_gpu.pl` (`jax.experimental.pallas`): every `pallas_call` gets extra
  inputs, the given buffers, aliased to its outputs (`input_output_aliases`), and a kernel
  wrapper that skips their refs, so outputs start from the buffers' contents instead of fresh
  memory. Records each call's name and outputs."""

  def __init__(self, buffers):
    self.buffers, self.calls = tuple(buffers), []

  def __getattr__(self, name):
    return getattr(pl, name)

  def pallas_call(self, kernel, *, in_specs, out_specs, out_shape, name, **kw):
    assert not kw.pop("input_output_aliases", None), name
    assert [(x.shape, x.dtype) for x in self.buffers] == [(x.shape, x.dtype) for x in out_shape]
    n_in = len(in_specs)

    def skip_buffer_refs(*refs):  # refs: inputs, buffers, outputs
      return kernel(*refs[:n_in], *refs[n_in + len(self.buffers):])

    call = pl.pallas_call(
        skip_buffer_refs, in_specs=[*in_specs, *out_specs], out_specs=out_specs,
        out_shape=out_shape, name=name,
        input_output_aliases={n_in + i: i for i in range(len(self.buffers))}, **kw)

    def run(*args):
      outs = call(*args, *self.buffers)
      self.calls.append((name, outs))
      return outs

    return run


def forward_into_buffers(q, k, v, *, key_valid, mask, o_buffer, lse_buffer, block_sizes=None,
                         interpret=False):
  """`lattice_attention_pallas`'s forward (eager: the forward kernel alone) with its kernel
  writing into the given buffers, o [B, C, W*T, E] and lse [B, C, W*T], aliased to its outputs:
  NaN-filled buffers prove every output element is written. -> (out [B, W, T, C, E], lse)."""
  into = _PallasIntoBuffers((o_buffer, lse_buffer))
  orig = pallas_gpu.pl
  pallas_gpu.pl = into
  try:
    out = lattice_attention_pallas(q, k, v, key_valid=key_valid, mask=mask,
                                   block_sizes=block_sizes, interpret=interpret)
  finally:
    pallas_gpu.pl = orig
  # one kernel ran, the forward, through the buffers, and its o is what the function returned
  assert [name for name, _ in into.calls] == [f"lattice_fwd_{mask}"], into.calls
  (_, (o, lse)), = into.calls
  b, w, t, c, e = q.shape
  np.testing.assert_array_equal(np.asarray(o).transpose(0, 2, 1, 3).reshape(b, w, t, c, e),
                                np.asarray(out))
  return out, lse


@pytest.mark.parametrize("mode", MODES)
def test_pallas_writes_every_output_element(mode):
  q, k, v, valid, _ = _inputs(3, 21, seed=5)
  b, w, t, c, e = q.shape
  poison_o = jnp.full((b, c, w * t, e), jnp.nan, jnp.float32)
  poison_lse = jnp.full((b, c, w * t), jnp.nan, jnp.float32)
  out, lse = forward_into_buffers(
      q, k, v, key_valid=valid, mask=mode, o_buffer=poison_o, lse_buffer=poison_lse,
      block_sizes=PallasBlockSizes.uniform(16, 16), interpret=True)
  assert not np.isnan(np.asarray(out)).any() and not np.isnan(np.asarray(lse)).any()
  ref = lattice_attention_reference(q, k, v, key_valid=valid, mask=mode)
  assert rel_err(out, ref) <= 1e-4


@pytest.mark.parametrize("mode", MODES)
def test_pallas_head_dim_not_a_power_of_two(mode):
  """E = 20 (as E = 80 in the 4B preset) is computed in 32 lanes, the extra ones masked loads of
  zeros: forward and gradients equal the reference, and the gradients keep the [.., E] shape."""
  q, k, v, valid, ct = _inputs(3, 13, seed=21, e=20)
  ref_out, ref_grads = _fwd_and_grads(lattice_attention_reference, q, k, v, valid, ct, mode)
  out, grads = _fwd_and_grads(_impl("pallas"), q, k, v, valid, ct, mode)
  assert rel_err(out, ref_out) <= 1e-4
  for g, r, name in zip(grads, ref_grads, "qkv"):
    assert g.shape == r.shape and rel_err(g, r) <= 1e-4, name


def test_pallas_same_position_visits_only_matching_key_blocks():
  """Keys at columns 48..63 are padding whose values are NaN. A kernel that visits their block
  multiplies 0-probabilities by NaN (0 * NaN = NaN), so every query that visits it comes out NaN.
  same_position queries at columns < 48 must never visit it: finite and equal to the reference;
  forward (query blocks) and the dk/dv kernel (gradients of the other keys) alike."""
  w, t = 2, 64
  q, k, v, valid, ct = _inputs(w, t, seed=8, b=1)
  valid = jnp.ones_like(valid).at[:, :, 48:].set(False)
  v_nan = v.at[:, :, 48:].set(jnp.nan)
  fn = functools.partial(lattice_attention_pallas, interpret=True,
                         block_sizes=PallasBlockSizes.uniform(16, 16))
  out, (dq, dk, dv) = _fwd_and_grads(fn, q, k, v_nan, valid, ct.at[:, :, 48:].set(0),
                                     "same_position")
  ref, (rq, rk, rv) = _fwd_and_grads(lattice_attention_reference, q, k, v, valid,
                                     ct.at[:, :, 48:].set(0), "same_position")
  assert np.isfinite(np.asarray(out[:, :, :48])).all()
  assert rel_err(out[:, :, :48], ref[:, :, :48]) <= 1e-4
  for g, r in ((dk, rk), (dv, rv)):
    assert np.isfinite(np.asarray(g[:, :, :48])).all()
    assert rel_err(g[:, :, :48], r[:, :, :48]) <= 1e-4


def test_dispatch_picks_per_backend_and_rejects_unknown():
  from lace_jax.kernels.lattice_attention import default_implementation
  assert default_implementation("cpu") == "xla_chunked"
  assert default_implementation("tpu") == "pallas"
  assert default_implementation("gpu") == "pallas"
  q, k, v, valid, _ = _inputs(2, 5, seed=0)
  with pytest.raises(ValueError, match="available"):
    lattice_attention(q, k, v, key_valid=valid, implementation="triton2")
  with pytest.raises(ValueError, match="grid columns = positions"):
    lattice_attention(q, k, v, key_valid=valid, implementation="pallas_interpret",
                      q_cols=jnp.arange(5) + 3)


def test_pallas_that_does_not_compile_falls_back_to_xla_chunked(monkeypatch):
  """When the machine's own GPU cannot compile a Pallas kernel at a shape, that shape runs
  "xla_chunked" after one warning naming the shape and the error. Reproduced on CPU, where a
  Pallas call outside the interpreter really fails to compile: the probe is switched on as on a
  GPU, and the real compile error must be caught, named, and replaced."""
  import lace_jax.kernels.lattice_attention as la
  monkeypatch.setattr(la, "_compiles_here", lambda: True)
  la._pallas_failure.cache_clear()
  q, k, v, valid, ct = _inputs(3, 9, seed=6)
  f = jax.jit(functools.partial(lattice_attention, key_valid=valid, implementation="pallas"))
  with pytest.warns(RuntimeWarning, match=r"does not compile for shapes \[\(2, 3, 9, 2, 16\)"):
    out = f(q, k, v)
  assert rel_err(out, lattice_attention_reference(q, k, v, key_valid=valid)) <= 1e-5
  import warnings as w
  with w.catch_warnings():  # the same shape again: no second warning, no second probe
    w.simplefilter("error")
    out2 = jax.jit(lambda q, k, v: lattice_attention(q, k, v, key_valid=valid,
                                                     implementation="pallas"))(q, k, v)
  np.testing.assert_array_equal(np.asarray(out2), np.asarray(out))
  assert la._pallas_failure.cache_info().currsize == 1  # one probe per (kind, mask, shapes)
  # decoding falls back to the direct XLA form the same way
  b, w_, s, c, e = 2, 3, 7, 2, 16
  ks = jax.random.split(jax.random.key(9), 5)
  args = (jax.random.normal(ks[0], (b, w_, c, e)), jax.random.normal(ks[1], (b, w_, c, e, s)),
          jax.random.normal(ks[2], (b, w_, c, e, s)), jnp.ones((b, w_, s), bool),
          jnp.array([5, 7], jnp.int32), jax.random.normal(ks[3], (b, w_, c, e)),
          jax.random.normal(ks[4], (b, w_, c, e)), jnp.ones((b, w_), bool))
  with pytest.warns(RuntimeWarning, match="decode attention"):
    got = lattice_decode_attention(*args, implementation="pallas")
  assert rel_err(got, decode_lib.decode_reference(*args)) <= 1e-5
  la._pallas_failure.cache_clear()


def test_pallas_runs_per_device_under_a_batch_sharded_mesh():
  """Pallas calls have no partitioning rule: under a mesh that splits the batch, each device
  must run the kernel on its own examples (a shard_map), not gather q, k, v and run it
  replicated. The traced program has the kernels inside a shard_map with the per-device batch,
  and the values (interpreter) equal the reference, forward and gradients."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from lace_jax import sharding
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  q, k, v, valid, ct = _inputs(3, 9, seed=12, b=8)
  put = lambda x: jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
  q, k, v, valid, ct = map(put, (q, k, v, valid, ct))

  def loss(impl, q, k, v, batch_axes=sharding.batch_axes()):  # the default rules' data x fsdp
    out = lattice_attention(q, k, v, key_valid=valid, implementation=impl, batch_axes=batch_axes)
    return jnp.sum(out.astype(jnp.float32) * ct), out

  with jax.set_mesh(mesh):
    jaxpr = jax.make_jaxpr(jax.grad(functools.partial(loss, "pallas"), argnums=(0, 1, 2),
                                    has_aux=True))(q, k, v)
    (_, out), grads = jax.jit(jax.value_and_grad(functools.partial(loss, "pallas_interpret"),
                                                 argnums=(0, 1, 2), has_aux=True))(q, k, v)
  kernels_seen = []

  def walk(jp, inside):
    for eqn in jp.eqns:
      if eqn.primitive.name == "pallas_call":
        kernels_seen.append((inside, eqn.invars[0].aval.shape[0]))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub, inside or eqn.primitive.name == "shard_map")

  walk(jaxpr.jaxpr, False)
  assert len(kernels_seen) == 3  # forward, dq, dk/dv
  assert all(inside and batch == 2 for inside, batch in kernels_seen), kernels_seen  # 8 / 4
  with jax.set_mesh(mesh):  # the axes the caller names are the split: data alone -> 8 / 2
    jaxpr = jax.make_jaxpr(functools.partial(loss, "pallas", batch_axes=("data",)))(q, k, v)
  kernels_seen.clear()
  walk(jaxpr.jaxpr, False)
  assert kernels_seen == [(True, 4)], kernels_seen
  ref_out, ref_grads = _fwd_and_grads(lattice_attention_reference, q, k, v, valid, ct, "causal")
  assert rel_err(out, ref_out) <= 1e-4
  for g, r in zip(grads, ref_grads):
    assert rel_err(g, r) <= 1e-4


def test_chunked_honours_custom_columns():
  """Queries at later grid columns than their positions (e.g. a prefix already decoded)."""
  q, k, v, valid, _ = _inputs(3, 9, seed=4)
  q_cols = jnp.arange(9, dtype=jnp.int32) * 2
  ref = lattice_attention_reference(q, k, v, key_valid=valid, q_cols=q_cols)
  got = lattice_attention(q, k, v, key_valid=valid, q_cols=q_cols, implementation="xla_chunked")
  assert rel_err(got, ref) <= 1e-5


@pytest.mark.parametrize("impl", ["xla_chunked", "pallas"])
def test_model_gradients_including_gate_weights(impl):
  """The whole lattice layer (down/q/k/v/p/gate/up) with each implementation vs reference."""
  cfg = lj.ModelConfig.preset("tiny", num_layers=2)
  base = lj.LatticeConfig(layers=(1,), width=32, heads=2, implementation="reference")
  _, params = lj.build_model(cfg, base, seed=0)
  from tests.conftest import randomize
  params = randomize(params, seed=1, scale=0.2)
  tokens = jax.random.randint(jax.random.key(2), (1, 3, 11), 0, cfg.vocab_size)

  def grads(lat):
    m = lj.Model(cfg, lat)
    loss = lambda p: jnp.mean(jax.nn.logsumexp(m.apply(p, tokens), -1))
    return jax.jit(jax.grad(loss))(params)["layers_1"]["lattice"]

  ref = grads(base)
  got = grads(base.replace(implementation="pallas_interpret" if impl == "pallas" else impl))
  for name in ("gate", "gate_bias", "q", "k", "v", "p", "down", "up"):
    assert rel_err(got[name], ref[name]) <= 1e-4, name


# ----- decode -----

@pytest.mark.parametrize("impl", ["xla_chunked", "pallas"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("w", [1, 4])
def test_decode_equals_reference(impl, mode, w):
  b, s, c, e = 2, 37, 2, 16
  ks = jax.random.split(jax.random.key(w), 7)
  q = jax.random.normal(ks[0], (b, w, c, e))
  kc, vc = (jax.random.normal(x, (b, w, c, e, s)) for x in ks[1:3])
  kn, vn = (jax.random.normal(x, (b, w, c, e)) for x in ks[3:5])
  cache_valid = jax.random.bernoulli(ks[5], 0.8, (b, w, s))
  new_valid = jnp.ones((b, w), bool).at[0, 0].set(False)  # thread 0 of batch 0 finished
  length = jnp.array([s, 20], jnp.int32)  # batch 1 has filled only 20 columns
  args = (q, kc, vc, cache_valid, length, kn, vn, new_valid)
  ref = decode_lib.decode_reference(*args, mask=mode)
  got = jax.jit(functools.partial(lattice_decode_attention, mask=mode, implementation=impl,
                                  interpret=True))(*args)
  assert rel_err(got, ref) <= 1e-5
  # columns at or beyond `length` are never read
  garbage = kc.at[1].set(jnp.where(jnp.arange(s) >= 20, 1e4, kc[1]))
  again = jax.jit(functools.partial(lattice_decode_attention, mask=mode, implementation=impl,
                                    interpret=True))(q, garbage, *args[2:])
  np.testing.assert_allclose(np.asarray(again), np.asarray(got), atol=1e-6)


def _decode_inputs(b, w, s, c, e, length, seed, dtype=jnp.float32):
  """Random decode inputs (never zeros); 70% of cache entries and new entries valid, batch 0's
  new entries all invalid (with length 0 there, nothing is readable)."""
  ks = jax.random.split(jax.random.key(seed), 7)
  q = jax.random.normal(ks[0], (b, w, c, e)).astype(dtype)
  kc, vc = (jax.random.normal(x, (b, w, c, e, s)).astype(dtype) for x in ks[1:3])
  kn, vn = (jax.random.normal(x, (b, w, c, e)).astype(dtype) for x in ks[3:5])
  cache_valid = jax.random.bernoulli(ks[5], 0.7, (b, w, s))
  new_valid = jax.random.bernoulli(ks[6], 0.7, (b, w)).at[0].set(False)
  return q, kc, vc, cache_valid, jnp.asarray(length, jnp.int32), kn, vn, new_valid


SPLIT_BLOCKS = {  # 2 row blocks of W = 20, 5 splits of S = 150, 2 column blocks per split
    "split": decode_lib.DecodeBlockSizes(block_w=16, block_k=16, split_k=32),
    "defaults": None}  # W = 20 -> block_w 32; S = 150 -> 3 splits of 64


@pytest.mark.parametrize("blocks", SPLIT_BLOCKS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_split_key_equals_reference(blocks, mode, dtype):
  """Several row blocks and key splits; lengths 0 (twice: once with nothing readable at all),
  on a split boundary, mid-split and full; E = 24 is loaded as 32 with masks."""
  b, w, s, c, e = 5, 20, 150, 2, 24
  dt = jnp.dtype(dtype)
  args = _decode_inputs(b, w, s, c, e, [0, 0, 64, 77, s], seed=5, dtype=dt)
  run = jax.jit(functools.partial(decode_lib.decode_pallas, mask=mode,
                                  block_sizes=SPLIT_BLOCKS[blocks], interpret=True))
  got = run(*args)
  assert got.dtype == dt
  f32 = [x.astype(jnp.float32) if x.dtype == dt else x for x in args]
  ref = decode_lib.decode_reference(*f32, mask=mode)  # the same (rounded) inputs in fp32
  assert np.isfinite(np.asarray(got, np.float32)).all()
  assert rel_err(got, ref) <= (1e-5 if dtype == "float32" else 2e-2)
  np.testing.assert_array_equal(np.asarray(got[0], np.float32), 0.0)  # nothing readable
  # columns >= length are never read, whatever they hold
  q, kc, vc, cache_valid, length, kn, vn, new_valid = args
  dead = jnp.broadcast_to(jnp.arange(s)[None, None, :] >= length[:, None, None], (b, w, s))
  garbage = lambda x: jnp.where(dead[:, :, None, None, :], jnp.asarray(1e4, x.dtype), x)
  again = run(q, garbage(kc), garbage(vc), cache_valid | dead, length, kn, vn, new_valid)
  np.testing.assert_array_equal(np.asarray(again, np.float32), np.asarray(got, np.float32))


def test_decode_block_sizes_for_shapes():
  """The defaults fill an H100 (>= 2 x 132 programs) for long caches, split no finer than one
  column block, never split a short cache and keep at most 64 query rows per program."""
  programs = lambda b, w, s, c, bs: b * c * -(-w // bs.block_w) * -(-s // bs.split_k)
  for b, w, s, c in [(8, 4, 4096, 4), (8, 16, 4096, 4), (8, 128, 4096, 4), (1, 4, 4096, 4),
                     (1, 20, 150, 2)]:
    bs = decode_lib.DecodeBlockSizes.for_shapes(b, w, s, c, 80)
    assert bs.split_k % bs.block_k == 0 and 16 <= bs.block_w <= 64, (b, w, s, c, bs)
    # enough programs, or splits already down to one column block
    assert programs(b, w, s, c, bs) >= 2 * 132 or bs.split_k == bs.block_k, (b, w, s, c, bs)
  big = decode_lib.DecodeBlockSizes.for_shapes(8, 128, 4096, 4, 80)
  assert (big.block_w, big.num_warps) == (64, 8)  # a [64, 128] accumulator: 8 warps
  assert decode_lib.DecodeBlockSizes.for_shapes(8, 16, 4096, 4, 80).num_warps == 4
  assert decode_lib.DecodeBlockSizes.for_shapes(1, 4, 4096, 4, 80).split_k == 64  # 64 splits
  assert decode_lib.DecodeBlockSizes.for_shapes(2, 4, 37, 2, 80).split_k == 64  # one split
  assert decode_lib.DecodeBlockSizes.for_shapes(64, 128, 4096, 4, 80).split_k == 4096


def test_decode_reference_is_the_last_row_of_the_full_reference():
  """Decoding step by step equals the teacher-forced lattice over the whole grid."""
  b, w, t, c, e = 1, 3, 9, 2, 8
  q, k, v, valid, _ = _inputs(w, t, seed=3, b=b, c=c, e=e)
  full = lattice_attention_reference(q, k, v, key_valid=valid)
  for step in range(1, t):
    kc = k[:, :, :step].transpose(0, 1, 3, 4, 2)  # [B, W, C, E, S]
    vc = v[:, :, :step].transpose(0, 1, 3, 4, 2)
    out = decode_lib.decode_reference(q[:, :, step], kc, vc, valid[:, :, :step],
                                      jnp.array([step]), k[:, :, step], v[:, :, step],
                                      valid[:, :, step])
    np.testing.assert_allclose(np.asarray(out), np.asarray(full[:, :, step]), atol=1e-6)


# ----- backbone attention -----

@pytest.mark.parametrize("impl", ["xla", "xla_chunked", "flash", "flash_pallas_interpret"])
def test_backbone_attention_equals_reference(impl):
  b, t, n, kh, h = 2, 11, 4, 2, 16
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (b, t, n, h))
  k, v = (jax.random.normal(x, (b, t, kh, h)) for x in ks[1:3])
  valid = jnp.arange(t)[None] >= jnp.array([[0], [4]])  # batch 1 left-padded by 4
  rows = np.asarray(valid)  # padding rows are unspecified by contract

  def run(fn):
    f = lambda q, k, v: jnp.sum(jnp.where(valid[:, :, None, None], fn(q, k, v), 0) ** 2)
    return fn(q, k, v), jax.grad(f, argnums=(0, 1, 2))(q, k, v)

  ref, ref_g = run(lambda q, k, v: attention_reference(
      q, k, v, structured_mask(t, valid, True)))
  if impl == "xla_chunked":  # small blocks so several are used
    from lace_jax.kernels import attention as att
    fn = lambda q, k, v: att._chunked(q, k, v, valid, True, 0, 16**-0.5, block=4)
  elif impl == "flash_pallas_interpret":  # the GPU flash path, run by the Pallas interpreter
    import lace_jax.kernels.lattice_attention as la
    real = la.lattice_attention
    fn = lambda q, k, v: attention(q, k, v, key_valid=valid, implementation="flash")
    la.lattice_attention = lambda *a, **kw: real(*a, **kw, implementation="pallas_interpret")
    try:
      got, got_g = run(fn)
    finally:
      la.lattice_attention = real
    assert rel_err(np.asarray(got)[rows], np.asarray(ref)[rows]) <= 1e-4
    for a, r in zip(got_g, ref_g):
      assert rel_err(a, r) <= 1e-4
    return
  else:
    fn = lambda q, k, v: attention(q, k, v, key_valid=valid, implementation=impl)
  got, got_g = run(fn)
  assert rel_err(np.asarray(got)[rows], np.asarray(ref)[rows]) <= 1e-5
  for a, r in zip(got_g, ref_g):
    assert rel_err(a, r) <= 1e-5


@pytest.mark.parametrize("limit", [0, 5, 13, 37, None])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_attention_equals_reference(limit, dtype):
  """One query column against a head-major cache [B, K, S, H]: equal to the reference on the
  keys that are valid and below `limit`, in several blocks; the blocks at or past `limit` are
  never read (NaN there must not leak), and a row with nothing to read gives zeros."""
  from lace_jax.kernels.attention import decode_attention
  b, n, kh, s, h = 3, 4, 2, 37, 16
  dt = jnp.dtype(dtype)
  ks = jax.random.split(jax.random.key(1), 4)
  q = jax.random.normal(ks[0], (b, n, h)).astype(dt)
  k, v = (jax.random.normal(x, (b, kh, s, h)).astype(dt) for x in ks[1:3])
  valid = jax.random.bernoulli(ks[3], 0.7, (b, s)).at[2].set(False)  # row 2: no key
  cut = s if limit is None else limit
  # past the limit (in whole blocks of 8): poisoned; the valid keys below it are what is read
  block_end = -(-cut // 8) * 8
  poison = jnp.arange(s)[None, :, None] >= block_end
  ok = valid & (jnp.arange(s)[None] < cut)
  ref = attention_reference(q[:, None].astype(jnp.float32),
                            k.transpose(0, 2, 1, 3).astype(jnp.float32),
                            v.transpose(0, 2, 1, 3).astype(jnp.float32),
                            ok[:, None, :])[:, 0]
  ref = jnp.where(ok.any(-1)[:, None, None], ref, 0.0)
  k = jnp.where(poison[:, None], jnp.nan, k)
  v = jnp.where(poison[:, None], jnp.nan, v)
  got = decode_attention(q, k, v, key_valid=valid, limit=limit, block=8)
  assert got.dtype == dt and got.shape == (b, n, h)
  assert np.isfinite(np.asarray(got, np.float32)).all()
  tol = 1e-5 if dtype == "float32" else 2e-2
  assert rel_err(np.asarray(got, np.float32), np.asarray(ref)) <= tol
  assert not np.asarray(got[2], np.float32).any()


def test_backbone_default_follows_the_target_platform():
  """Kernels are chosen for the platform compiled for: a `target_platform` context overrides
  the host's backend; one query column always goes to the cache-friendly chunked path."""
  from lace_jax import kernels
  from lace_jax.kernels.attention import default_implementation
  assert default_implementation(jnp.float32, 64) == "xla"  # this CPU host
  with kernels.target_platform("tpu"):
    assert kernels.backend() == "tpu"
    assert default_implementation(jnp.bfloat16, 4096) == "splash_tpu"
    assert default_implementation(jnp.bfloat16, 100) == "xla"
  with kernels.target_platform("cuda"):
    assert default_implementation(jnp.bfloat16, 4096) == "flash"
    assert default_implementation(jnp.bfloat16, 1) == "xla_chunked"
  assert kernels.backend() == "cpu"
  with pytest.raises(ValueError, match="target platform"):
    with kernels.target_platform("ipu"):
      pass


# ----- lowering for accelerators, on this CPU machine -----

def _count(lowered, target):
  return lowered.as_text().count(target)


# The custom call a Pallas Triton kernel lowers to: jaxlib 0.10 emits the Triton IR for XLA to
# compile; from jaxlib 0.11 (the lent GPU machines) the kernel is compiled at lowering time and
# called through an FFI target.
TRITON_CALLS = ("__gpu$xla.gpu.triton", "triton_kernel_call")


def _triton_calls(lowered):
  text = lowered.as_text()
  return sum(text.count(f'custom_call @{name}') + text.count(f'call_target_name = "{name}')
             for name in TRITON_CALLS)


def test_backbone_decode_attention_chunked_equals_reference():
  """One query column at an offset against a long cache (the decoding case)."""
  b, s, n, kh, h = 3, 1100, 4, 2, 16
  ks = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(ks[0], (b, 1, n, h))
  k, v = (jax.random.normal(x, (b, s, kh, h)) for x in ks[1:])
  valid = jnp.arange(s)[None] >= jnp.array([[0], [5], [700]])
  for offset in (600, 1099):
    ref = attention(q, k, v, key_valid=valid, q_offset=offset, implementation="reference")
    got = attention(q, k, v, key_valid=valid, q_offset=offset, implementation="xla_chunked")
    assert rel_err(got, ref) <= 1e-5


def test_pallas_kernels_lower_for_cuda():
  sd = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)
  b, w, t, c, e = 1, 4, 100, 4, 80  # the 4B preset's lattice head dim
  f = lambda q, k, v, m: lattice_attention_pallas(q, k, v, key_valid=m)
  q, m = sd(b, w, t, c, e), sd(b, w, t, dt=jnp.bool_)
  fwd = jax.jit(f).trace(q, q, q, m).lower(lowering_platforms=("cuda",))
  assert _triton_calls(fwd) == 1
  g = jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=(0, 1, 2))
  bwd = jax.jit(g).trace(q, q, q, m).lower(lowering_platforms=("cuda",))
  assert _triton_calls(bwd) == 3  # forward, dq, dk/dv
  s = 500
  dec = jax.jit(decode_lib.decode_pallas).trace(
      sd(b, w, c, e), sd(b, w, c, e, s), sd(b, w, c, e, s), sd(b, w, s, dt=jnp.bool_),
      sd(b, dt=jnp.int32), sd(b, w, c, e), sd(b, w, c, e), sd(b, w, dt=jnp.bool_)
  ).lower(lowering_platforms=("cuda",))
  assert _triton_calls(dec) >= 1


@pytest.mark.parametrize("impl", ["pallas_tpu", "splash_tpu"])
def test_backbone_tpu_kernels_lower_for_tpu(impl):
  sd = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)
  f = lambda q, k, v, m: attention(q, k, v, key_valid=m, implementation=impl)
  low = jax.jit(f).trace(sd(1, 256, 8, 128), sd(1, 256, 2, 128), sd(1, 256, 2, 128),
                         sd(1, 256, dt=jnp.bool_)).lower(lowering_platforms=("tpu",))
  assert _count(low, "tpu_custom_call") >= 1


def test_backbone_splash_equals_reference_in_the_interpreter(monkeypatch):
  """splash_tpu (GQA as one MQA kernel per kv head, padding as segment ids) run by the Pallas
  interpreter: values and gradients equal the reference on every valid row, with 2 query
  heads per kv head, T = 256 in two 128-column blocks, left padding of 37 and 130 columns."""
  from lace_jax.kernels import attention as att
  b, t, n, kh, h = 2, 256, 4, 2, 64
  ks = jax.random.split(jax.random.key(3), 3)
  q = jax.random.normal(ks[0], (b, t, n, h))
  k, v = (jax.random.normal(x, (b, t, kh, h)) for x in ks[1:3])
  valid = jnp.arange(t)[None] >= jnp.array([[37], [130]])
  rows = np.asarray(valid)
  # two blocks per row, so the block above the diagonal is skipped
  monkeypatch.setattr(att, "_splash_block", lambda n, largest=512: 128)

  def run(fn):
    f = lambda q, k, v: jnp.sum(jnp.where(valid[:, :, None, None], fn(q, k, v), 0) ** 2)
    return fn(q, k, v), jax.grad(f, argnums=(0, 1, 2))(q, k, v)

  ref, ref_g = run(lambda q, k, v: attention_reference(q, k, v, structured_mask(t, valid, True)))
  got, got_g = run(lambda q, k, v: att._splash_tpu(q, k, v, valid, True, h**-0.5, (),
                                                   interpret=True))
  assert rel_err(np.asarray(got)[rows], np.asarray(ref)[rows]) <= 1e-5
  for a, r in zip(got_g, ref_g):
    assert rel_err(a, r) <= 1e-5


def _cudnn_calls(lowered_text):
  """[(call target, result types)] of every cuDNN fused-attention custom call."""
  import re
  return [(m.group(1), line.split("->")[-1]) for line in lowered_text.splitlines()
          if (m := re.search(r"custom_call @(__cudnn\$fmha\w*)", line))]


def test_backbone_cudnn_lowers_for_cuda(monkeypatch):
  """cuDNN gets the structured mask as is_causal plus sequence lengths, never as a mask tensor:
  jax turns a `mask=` into an additive [B, 1, T, S] bias whose gradient cuDNN always computes
  (issue 13 finding 1). Forward and gradient: only the bias-free kernels, no tensor with a
  [T, S] plane anywhere, and the backward returns dq, dk, dv and its workspace (no dbias).

  jax checks the cuDNN version while tracing, which a CPU-only jaxlib cannot report; the check
  is patched here so the lowering of our call itself is tested."""
  from jax._src.cudnn import fused_attention_stablehlo as fa
  monkeypatch.setattr(fa, "check_cudnn_version", lambda: 90800)
  sd = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)
  b, t, n, kh, h = 2, 96, 8, 2, 64
  args = (sd(b, t, n, h), sd(b, t, kh, h), sd(b, t, kh, h), sd(b, t, dt=jnp.bool_))
  f = lambda q, k, v, m: attention(q, k, v, key_valid=m, implementation="cudnn")
  g = jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=(0, 1, 2))
  fwd = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  bwd = jax.jit(g).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert [c for c, _ in _cudnn_calls(fwd)] == ["__cudnn$fmhaSoftmax"]
  assert [c for c, _ in _cudnn_calls(bwd)] == ["__cudnn$fmhaSoftmax",
                                               "__cudnn$fmhaSoftmaxBackward"]
  assert fwd.count("PADDING_CAUSAL") == 1 and bwd.count("PADDING_CAUSAL") == 2
  for text in (fwd, bwd):
    assert f"{t}x{t}x" not in text  # no [B, 1, T, S] mask, bias or bias gradient
  _, results = _cudnn_calls(bwd)[1]
  assert results.count("tensor<") == 4  # dq, dk, dv, workspace


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_backbone_cudnn_packing_equals_reference(dtype):
  """The cuDNN path's gathering of each row's valid tokens to its front, with sequence lengths
  and is_causal, run through XLA's implementation of the same jax call (cuDNN cannot run on
  CPU): equal to the reference on every valid row, forward and gradients, for any validity
  pattern (left padding, right padding, both, holes, all valid, none valid); padding rows 0."""
  from lace_jax.kernels import attention as att
  b, t, n, kh, h = 7, 23, 4, 2, 16
  ks = jax.random.split(jax.random.key(3), 4)
  q = jax.random.normal(ks[0], (b, t, n, h)).astype(dtype)
  k, v = (jax.random.normal(x, (b, t, kh, h)).astype(dtype) for x in ks[1:3])
  rng = np.random.default_rng(3)
  cols = np.arange(t)
  valid = np.stack([cols >= 0, cols < 0, cols >= 5, cols < 17, (cols >= 4) & (cols < 15),
                    rng.random(t) < 0.5, rng.random(t) < 0.2])  # [B, T]
  valid = jnp.asarray(valid)
  rows = np.asarray(valid)

  def run(fn):
    f = lambda q, k, v: jnp.sum(jnp.where(valid[:, :, None, None], fn(q, k, v), 0)
                                .astype(jnp.float32) ** 2)
    return fn(q, k, v), jax.grad(f, argnums=(0, 1, 2))(q, k, v)

  ref, ref_g = run(lambda q, k, v: attention_reference(
      q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
      structured_mask(t, valid, True)))
  got, got_g = run(lambda q, k, v: att._cudnn(q, k, v, valid, True, 0, h**-0.5, kernel="xla"))
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  assert got.dtype == dtype
  assert rel_err(np.asarray(got)[rows], np.asarray(ref)[rows]) <= tol
  assert not np.asarray(got, np.float32)[~rows].any()  # padding rows: zeros
  for a, r in zip(got_g, ref_g):
    assert rel_err(np.asarray(a, np.float32), r) <= tol


def test_backbone_cudnn_decoding_goes_to_chunked(monkeypatch):
  """One query column (decoding, q_offset > 0) with implementation="cudnn" runs xla_chunked:
  equal to the reference (in float32, which the cuDNN kernel would refuse), and no cuDNN call
  in its CUDA lowering (issue 13 finding 2). The cuDNN path serves only causal attention from
  column 0 and bf16/fp16; anything else is refused naming the input."""
  from jax._src.cudnn import fused_attention_stablehlo as fa
  monkeypatch.setattr(fa, "check_cudnn_version", lambda: 90800)
  b, s, n, kh, h = 3, 700, 4, 2, 16
  ks = jax.random.split(jax.random.key(4), 3)
  q = jax.random.normal(ks[0], (b, 1, n, h))
  k, v = (jax.random.normal(x, (b, s, kh, h)) for x in ks[1:])
  valid = jnp.arange(s)[None] >= jnp.array([[0], [5], [600]])
  for offset in (0, 650, jnp.int32(699)):
    ref = attention(q, k, v, key_valid=valid, q_offset=offset, implementation="reference")
    got = attention(q, k, v, key_valid=valid, q_offset=offset, implementation="cudnn")
    assert rel_err(got, ref) <= 1e-5
  bf = lambda x: x.astype(jnp.bfloat16)
  f = lambda q, k, v, m, cur: attention(q, k, v, key_valid=m, q_offset=cur,
                                        implementation="cudnn")
  low = jax.jit(f).trace(bf(q), bf(k), bf(v), valid, jnp.int32(650)).lower(
      lowering_platforms=("cuda",)).as_text()
  assert not _cudnn_calls(low)
  q2, k2 = jnp.zeros((2, 8, 4, 16), jnp.bfloat16), jnp.zeros((2, 8, 2, 16), jnp.bfloat16)
  m2 = jnp.ones((2, 8), bool)
  with pytest.raises(ValueError, match="causal=False"):
    attention(q2, k2, k2, key_valid=m2, causal=False, implementation="cudnn")
  with pytest.raises(ValueError, match="q_offset=3"):
    attention(q2, k2, k2, key_valid=m2, q_offset=3, implementation="cudnn")
  with pytest.raises(ValueError, match="float32"):
    attention(q2.astype(jnp.float32), k2.astype(jnp.float32), k2.astype(jnp.float32),
              key_valid=m2, implementation="cudnn")


@pytest.mark.parametrize("field,value", [("block_q", 8), ("block_k", 48), ("block_q", 0),
                                         ("block_k", 64.0), ("num_warps", 3), ("num_stages", 0)])
def test_pallas_block_sizes_are_validated(field, value):
  """A tile Triton cannot use (not a power of two, < 16) or a bad launch setting fails at
  construction, naming the field, instead of deep inside the Triton compiler."""
  with pytest.raises(ValueError, match=f"{field}={value!r}"):
    Tiles(**{field: value})
  with pytest.raises(ValueError, match="BlockSizes.dq"):
    PallasBlockSizes(dq=(64, 64))


@pytest.mark.parametrize("field,value", [("block_w", 8), ("block_k", 24), ("split_k", 48),
                                         ("split_k", 0), ("num_warps", 3), ("num_stages", 0)])
def test_decode_block_sizes_are_validated(field, value):
  """The decode kernel's tiles likewise; split_k must be a multiple of block_k (32 here)."""
  with pytest.raises(ValueError, match=f"{field}={value!r}"):
    decode_lib.DecodeBlockSizes(**{"block_k": 32, field: value})
  with pytest.raises(ValueError, match="block_sizes="):
    q = jnp.ones((1, 2, 1, 16))
    cache = jnp.ones((1, 2, 1, 16, 8))
    decode_lib.decode_pallas(q, cache, cache, jnp.ones((1, 2, 8), bool), jnp.array([4]), q, q,
                             jnp.ones((1, 2), bool), block_sizes=PallasBlockSizes(),
                             interpret=True)
