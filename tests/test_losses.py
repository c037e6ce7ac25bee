"""The chunked token log-prob + entropy (`lace_jax.losses.token_logprobs`) against its dense
specification: values, gradients (eager and jitted, with padding masks), bf16, the compiled
memory plan, and argument errors.

Gradient error metric: max |chunked - dense| / max(max |dense|, 1) over the compared array.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lace_jax.losses import token_logprobs, token_logprobs_dense

LEAD = (2, 3)  # leading axes, e.g. [B, W]
V, D = 97, 24


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1.0))


def _inputs(t, seed, dtype=jnp.float32):
  """hidden [2, 3, T, D], unembed [V, D], targets [2, 3, T]: random, with logits of O(1)
  spread so the softmax is neither one-hot nor uniform."""
  kh, ku, kt = jax.random.split(jax.random.key(seed), 3)
  hidden = jax.random.normal(kh, (*LEAD, t, D)).astype(dtype)
  unembed = (0.3 * jax.random.normal(ku, (V, D))).astype(dtype)
  targets = jax.random.randint(kt, (*LEAD, t), 0, V)
  return hidden, unembed, targets


def _functional(t, seed, p_valid=0.7):
  """Random weights a, b [2, 3, T] and a random padding mask (some positions False)."""
  ka, kb, km = jax.random.split(jax.random.key(seed + 1000), 3)
  mask = jax.random.bernoulli(km, p_valid, (*LEAD, t))
  return jax.random.normal(ka, (*LEAD, t)), jax.random.normal(kb, (*LEAD, t)), mask


def _loss(fn, targets, a, b, mask):
  def loss(hidden, unembed):
    logp, entropy = fn(hidden, unembed, targets)
    return jnp.sum(a * logp * mask) + jnp.sum(b * entropy * mask)
  return loss


def _chunked(chunk):
  return lambda h, u, t: token_logprobs(h, u, t, chunk=chunk)


@pytest.mark.parametrize("t", [1, 7, 64])
@pytest.mark.parametrize("chunk", [1, 5, 16, 1000])
def test_values_equal_dense(t, chunk):
  hidden, unembed, targets = _inputs(t, seed=t * 31 + chunk)
  logp, entropy = token_logprobs(hidden, unembed, targets, chunk=chunk)
  ref_logp, ref_entropy = token_logprobs_dense(hidden, unembed, targets)
  assert logp.shape == entropy.shape == (*LEAD, t)
  assert logp.dtype == entropy.dtype == jnp.float32
  np.testing.assert_allclose(logp, ref_logp, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(entropy, ref_entropy, rtol=1e-5, atol=1e-5)
  # the spec itself is not trivial on these inputs
  assert float(jnp.min(ref_entropy)) > 0.1 and float(jnp.max(ref_entropy)) < np.log(V) - 0.1
  assert float(jnp.max(ref_logp) - jnp.min(ref_logp)) > 0.1


def test_chunk_nonpositive_is_dense():
  hidden, unembed, targets = _inputs(7, seed=3)
  for chunk in (0, -1):
    out = token_logprobs(hidden, unembed, targets, chunk=chunk)
    ref = token_logprobs_dense(hidden, unembed, targets)
    for x, r in zip(out, ref):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(r))


@pytest.mark.parametrize("t,chunk", [(7, 5), (64, 16), (64, 1000), (7, 1)])
@pytest.mark.parametrize("jit", [False, True])
def test_gradients_equal_dense(t, chunk, jit):
  hidden, unembed, targets = _inputs(t, seed=t + chunk)
  a, b, mask = _functional(t, seed=t + chunk)
  assert 0 < int(mask.sum()) < mask.size  # some positions are padding
  def grad(fn):
    return jax.grad(_loss(fn, targets, a, b, mask), argnums=(0, 1))
  grad_chunked, grad_dense = grad(_chunked(chunk)), grad(token_logprobs_dense)
  if jit:
    grad_chunked, grad_dense = jax.jit(grad_chunked), jax.jit(grad_dense)
  got, ref = grad_chunked(hidden, unembed), grad_dense(hidden, unembed)
  for g, r, name in zip(got, ref, ("hidden", "unembed")):
    assert g.dtype == r.dtype == jnp.float32
    assert float(jnp.abs(r).max()) > 0.1, name  # a non-trivial reference
    assert rel_err(g, r) <= 1e-5, (name, rel_err(g, r))
  # masked positions get exactly no gradient in hidden
  np.testing.assert_array_equal(np.asarray(got[0])[~np.asarray(mask)], 0.0)


def test_entropy_gradient_alone():
  """The entropy's cotangent path on its own (a = 0), where g_lp cannot hide an error."""
  t, chunk = 13, 4
  hidden, unembed, targets = _inputs(t, seed=5)
  _, b, mask = _functional(t, seed=5)
  a = jnp.zeros_like(b)
  got = jax.grad(_loss(_chunked(chunk), targets, a, b, mask), argnums=(0, 1))(hidden, unembed)
  ref = jax.grad(_loss(token_logprobs_dense, targets, a, b, mask), argnums=(0, 1))(hidden,
                                                                                   unembed)
  for g, r in zip(got, ref):
    assert float(jnp.abs(r).max()) > 0.1
    assert rel_err(g, r) <= 1e-5


def test_all_masked_gradients_are_exactly_zero():
  t = 9
  hidden, unembed, targets = _inputs(t, seed=11)
  a, b, _ = _functional(t, seed=11)
  mask = jnp.zeros((*LEAD, t), bool)
  grads = jax.jit(jax.grad(_loss(_chunked(4), targets, a, b, mask), argnums=(0, 1)))(
      hidden, unembed)
  for g in grads:
    assert np.all(np.asarray(g) == 0.0)


def test_bfloat16():
  t, chunk = 24, 8
  hidden, unembed, targets = _inputs(t, seed=7, dtype=jnp.bfloat16)
  a, b, mask = _functional(t, seed=7)
  logp, entropy = token_logprobs(hidden, unembed, targets, chunk=chunk)
  assert logp.dtype == entropy.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logp))) and bool(jnp.all(jnp.isfinite(entropy)))
  # bf16 x bf16 products are exact in float32: the float32 dense of the same rounded inputs
  h32, u32 = hidden.astype(jnp.float32), unembed.astype(jnp.float32)
  ref_logp, ref_entropy = token_logprobs_dense(h32, u32, targets)
  np.testing.assert_allclose(logp, ref_logp, rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(entropy, ref_entropy, rtol=1e-3, atol=1e-3)

  grads = jax.jit(jax.grad(_loss(_chunked(chunk), targets, a, b, mask), argnums=(0, 1)))(
      hidden, unembed)
  ref = jax.grad(_loss(token_logprobs_dense, targets, a, b, mask), argnums=(0, 1))(h32, u32)
  for g, r, x in zip(grads, ref, (hidden, unembed)):
    assert g.dtype == x.dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(g)))
    assert rel_err(g, r) <= 3e-2, rel_err(g, r)  # dz is rounded to bf16 for the matmuls


def test_mixed_dtypes_grads_in_input_dtypes():
  """bf16 hidden with a float32 unembed (computed in bf16): each cotangent in its input's dtype."""
  hidden, unembed, targets = _inputs(10, seed=9)
  hidden = hidden.astype(jnp.bfloat16)
  a, b, mask = _functional(10, seed=9)
  gh, gu = jax.grad(_loss(_chunked(4), targets, a, b, mask), argnums=(0, 1))(hidden, unembed)
  assert gh.dtype == jnp.bfloat16 and gu.dtype == jnp.float32


# B, W, T, D, V of the memory test: the dense float32 logits are 32 MiB
MB, MW, MT, MD, MV = 2, 2, 256, 32, 8192


def _temp_bytes(fn, dtype):
  hidden = jax.ShapeDtypeStruct((MB, MW, MT, MD), dtype)
  unembed = jax.ShapeDtypeStruct((MV, MD), dtype)
  targets = jax.ShapeDtypeStruct((MB, MW, MT), jnp.int32)

  def loss(hidden, unembed, targets):
    logp, entropy = fn(hidden, unembed, targets)
    return jnp.sum(logp) + 0.1 * jnp.sum(entropy)

  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(
      hidden, unembed, targets).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("dtype,chunk", [(jnp.float32, 16), (jnp.bfloat16, 32)])
def test_memory_plan(dtype, chunk):
  """XLA's plan for value-and-grad holds a chunk's float32 logits and its cotangent dz (in
  hidden's dtype) at once: 2 * chunk / T of the dense float32 logits in float32 (so chunk=16,
  1/8; at chunk=32 it would be exactly 1/4 plus the small buffers), 1.5 * chunk / T in bf16."""
  dense_logits = MB * MW * MT * MV * 4
  temp = _temp_bytes(lambda h, u, t: token_logprobs(h, u, t, chunk=chunk), dtype)
  assert temp < dense_logits / 4, (temp, dense_logits)


def test_memory_plan_dense_exceeds_logits():
  """The same measurement fails the dense formulation: the test above can fail."""
  dense_logits = MB * MW * MT * MV * 4
  temp = _temp_bytes(token_logprobs_dense, jnp.float32)
  assert temp > dense_logits, (temp, dense_logits)


def test_errors():
  hidden, unembed, targets = _inputs(5, seed=0)
  with pytest.raises(ValueError, match="unembed"):
    token_logprobs(hidden, unembed[None], targets)  # 3-D
  with pytest.raises(ValueError, match="unembed"):
    token_logprobs(hidden, unembed[:, :-1], targets)  # D mismatch
  with pytest.raises(ValueError, match="unembed"):
    token_logprobs(hidden, unembed.T, targets)  # an lm_head [D, V] not transposed
  with pytest.raises(ValueError, match="targets"):
    token_logprobs(hidden, unembed, targets[..., :-1])
  with pytest.raises(ValueError, match="targets"):
    token_logprobs(hidden, unembed, targets[None])
  with pytest.raises(ValueError, match="targets"):
    token_logprobs(hidden, unembed, targets.astype(jnp.float32))
  with pytest.raises(ValueError, match="hidden"):
    token_logprobs(hidden[0, 0, 0], unembed, targets[0, 0, 0])
  for fn in (token_logprobs_dense, _chunked(0)):
    with pytest.raises(ValueError, match="targets"):
      fn(hidden, unembed, targets[..., :-1])


@pytest.mark.parametrize("chunk", [1, 16, 100, 1000])
def test_vocab_chunks_equal_dense(chunk):
  """over="vocab": slices of the vocabulary (the last one padded) with an online log-sum-exp;
  values and gradients (w.r.t. hidden and unembed, through both outputs) equal the dense form."""
  t = 13
  hidden, unembed, targets = _inputs(t, seed=chunk)
  a, b, mask = _functional(t, seed=chunk)
  got = token_logprobs(hidden, unembed, targets, chunk=chunk, over="vocab")
  ref = token_logprobs_dense(hidden, unembed, targets)
  for x, y in zip(got, ref):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-5)
  fn = lambda h, u, t: token_logprobs(h, u, t, chunk=chunk, over="vocab")
  g = jax.grad(_loss(fn, targets, a, b, mask), argnums=(0, 1))(hidden, unembed)
  r = jax.grad(_loss(token_logprobs_dense, targets, a, b, mask), argnums=(0, 1))(hidden, unembed)
  for x, y in zip(g, r):
    x, y = np.asarray(x), np.asarray(y)
    assert np.abs(x - y).max() / max(np.abs(y).max(), 1.0) < 1e-5
  with pytest.raises(ValueError, match="over='rows'"):
    token_logprobs(hidden, unembed, targets, chunk=chunk, over="rows")
