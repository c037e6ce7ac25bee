"""Every lattice-attention implementation against the reference (Pallas in interpret mode on
CPU), forward and gradients; the decode path; backbone attention; lowering for CUDA and TPU.

Error metric: max |impl - reference| / max(max |reference|, 1) over the compared array (inputs
are N(0, 1), so outputs and gradients are O(1); the floor keeps exactly-zero reference
gradients, e.g. same_position at W = 1, from dividing by zero).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lace_jax as lj
from kernels.attention import attention, structured_mask
from kernels.attention.reference import attention_reference
from kernels.lattice_attention import (ChunkedBlockSizes, PallasBlockSizes, lattice_attention,
                                       lattice_attention_chunked, lattice_attention_pallas,
                                       lattice_attention_reference, lattice_decode_attention)
from kernels.lattice_attention import decode as decode_lib
from kernels.lattice_attention import pallas_gpu

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
  return functools.partial(lattice_attention_pallas, interpret=True,
                           block_sizes=PallasBlockSizes(block_q=16, block_k=16))


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


@pytest.mark.parametrize("mode", MODES)
def test_pallas_writes_every_output_element(mode):
  q, k, v, valid, _ = _inputs(3, 21, seed=5)
  b, w, t, c, e = q.shape
  ep = pallas_gpu.padded_head_dim(e)
  poison_o = jnp.full((b, c, w * t, ep), jnp.nan, jnp.float32)
  poison_lse = jnp.full((b, c, w * t), jnp.nan, jnp.float32)
  o, lse = pallas_gpu.forward_into_buffers(
      q, k, v, key_valid=valid, mask=mode, o_buffer=poison_o, lse_buffer=poison_lse,
      block_sizes=PallasBlockSizes(block_q=16, block_k=16), interpret=True)
  assert not np.isnan(np.asarray(o)).any() and not np.isnan(np.asarray(lse)).any()
  ref = lattice_attention_reference(q, k, v, key_valid=valid, mask=mode)
  got = np.asarray(o)[..., :e].transpose(0, 2, 1, 3).reshape(b, w, t, c, e)
  assert rel_err(got, ref) <= 1e-4


def test_dispatch_picks_per_backend_and_rejects_unknown():
  from kernels.lattice_attention import default_implementation
  assert default_implementation("cpu") == "xla_chunked"
  assert default_implementation("tpu") == "xla_chunked"
  assert default_implementation("gpu") == "pallas"
  q, k, v, valid, _ = _inputs(2, 5, seed=0)
  with pytest.raises(ValueError, match="available"):
    lattice_attention(q, k, v, key_valid=valid, implementation="triton2")
  with pytest.raises(ValueError, match="grid columns = positions"):
    lattice_attention(q, k, v, key_valid=valid, implementation="pallas_interpret",
                      q_cols=jnp.arange(5) + 3)


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
  kc, vc = (jax.random.normal(x, (b, w * s, c, e)) for x in ks[1:3])
  kn, vn = (jax.random.normal(x, (b, w, c, e)) for x in ks[3:5])
  cache_valid = jax.random.bernoulli(ks[5], 0.8, (b, w * s))
  new_valid = jnp.ones((b, w), bool).at[0, 0].set(False)  # thread 0 of batch 0 finished
  length = jnp.array([s, 20], jnp.int32)  # batch 1 has filled only 20 columns
  args = (q, kc, vc, cache_valid, length, kn, vn, new_valid)
  ref = decode_lib.decode_reference(*args, mask=mode)
  got = jax.jit(functools.partial(lattice_decode_attention, mask=mode, implementation=impl,
                                  interpret=True))(*args)
  assert rel_err(got, ref) <= 1e-5
  # columns at or beyond `length` are never read
  garbage = kc.at[1].set(jnp.where(jnp.tile(jnp.arange(s) >= 20, w)[:, None, None], 1e4, kc[1]))
  again = jax.jit(functools.partial(lattice_decode_attention, mask=mode, implementation=impl,
                                    interpret=True))(q, garbage, *args[2:])
  np.testing.assert_allclose(np.asarray(again), np.asarray(got), atol=1e-6)


def test_decode_reference_is_the_last_row_of_the_full_reference():
  """Decoding step by step equals the teacher-forced lattice over the whole grid."""
  b, w, t, c, e = 1, 3, 9, 2, 8
  q, k, v, valid, _ = _inputs(w, t, seed=3, b=b, c=c, e=e)
  full = lattice_attention_reference(q, k, v, key_valid=valid)
  for step in range(1, t):
    kc = k[:, :, :step].reshape(b, w * step, c, e)
    vc = v[:, :, :step].reshape(b, w * step, c, e)
    out = decode_lib.decode_reference(q[:, :, step], kc, vc, valid[:, :, :step].reshape(b, -1),
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
    from kernels import attention as att
    fn = lambda q, k, v: att._chunked(q, k, v, valid, True, 0, 16**-0.5, block=4)
  elif impl == "flash_pallas_interpret":  # the GPU flash path, run by the Pallas interpreter
    import kernels.lattice_attention as la
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


def test_backbone_default_follows_the_target_platform():
  """Kernels are chosen for the platform compiled for: a `target_platform` context overrides
  the host's backend; one query column always goes to the cache-friendly chunked path."""
  import kernels
  from kernels.attention import default_implementation
  assert default_implementation(jnp.float32, 64) == "xla"  # this CPU host
  with kernels.target_platform("tpu"):
    assert kernels.backend() == "tpu"
    assert default_implementation(jnp.bfloat16, 4096) == "pallas_tpu"
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
  assert _count(fwd, "__gpu$xla.gpu.triton") == 1
  g = jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=(0, 1, 2))
  bwd = jax.jit(g).trace(q, q, q, m).lower(lowering_platforms=("cuda",))
  assert _count(bwd, "__gpu$xla.gpu.triton") == 3  # forward, dq, dk/dv
  s = 500
  dec = jax.jit(decode_lib.decode_pallas).trace(
      sd(b, w, c, e), sd(b, w * s, c, e), sd(b, w * s, c, e), sd(b, w * s, dt=jnp.bool_),
      sd(b, dt=jnp.int32), sd(b, w, c, e), sd(b, w, c, e), sd(b, w, dt=jnp.bool_)
  ).lower(lowering_platforms=("cuda",))
  assert _count(dec, "__gpu$xla.gpu.triton") == 1


def test_backbone_pallas_tpu_lowers_for_tpu():
  sd = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)
  f = lambda q, k, v, m: attention(q, k, v, key_valid=m, implementation="pallas_tpu")
  low = jax.jit(f).trace(sd(1, 256, 8, 128), sd(1, 256, 2, 128), sd(1, 256, 2, 128),
                         sd(1, 256, dt=jnp.bool_)).lower(lowering_platforms=("tpu",))
  assert _count(low, "tpu_custom_call") >= 1


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
  from kernels import attention as att
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
    PallasBlockSizes(**{field: value})
  with pytest.raises(ValueError, match="block_k=24"):
    q = jnp.ones((1, 2, 1, 16))
    cache = jnp.ones((1, 2 * 8, 1, 16))
    decode_lib.decode_pallas(q, cache, cache, jnp.ones((1, 16), bool), jnp.int32(4), q, q,
                             jnp.ones((1, 2), bool), block_k=24, interpret=True)
