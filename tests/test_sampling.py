"""Lockstep sampling: decode == teacher-forced forward, early-stopping threads, left padding,
per-thread prompts, sampling filters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lace_jax as lj
from lace_jax import sampling
from tests.conftest import randomize

CFG = lj.ModelConfig.preset("tiny")
LAT = lj.LatticeConfig(layers=(1, 3), width=16, heads=2)


def _model(lattice):
  m, params = lj.build_model(CFG, LAT if lattice else None, seed=0)
  return m, randomize(params, seed=1, scale=0.1)


PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [3, 4, 5]]  # different lengths: left padding


@pytest.mark.parametrize("lattice", [True, False])
@pytest.mark.parametrize("w", [1, 4])
def test_greedy_logprobs_equal_teacher_forcing(lattice, w):
  m, params = _model(lattice)
  out = sampling.sample(m, params, PROMPTS, num_threads=w, max_new_tokens=10, temperature=0.0)
  assert out.tokens.shape == (2, w, 10)
  tf = sampling.teacher_forced_logprobs(m, params, out)
  assert np.abs(tf - out.logprobs).max() <= 1e-4
  # greedy: every emitted token is the argmax of the teacher-forced distribution
  tokens, valid = sampling.full_grid(out)
  p = out.prompt_tokens.shape[-1]
  logits = m.apply(params, tokens, valid=valid)[:, :, p - 1:-1]
  np.testing.assert_array_equal(np.asarray(jnp.argmax(logits, -1)), out.tokens)


def test_early_stopping_thread_stops_contributing_keys():
  m, params = _model(True)
  per_thread = [[[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]]  # so greedy threads differ
  free = sampling.sample(m, params, per_thread, num_threads=4, max_new_tokens=12,
                         temperature=0.0)
  toks = free.tokens[0]
  # a (thread, step) whose token no thread emitted before: as the stop token, it ends exactly
  # that thread at that step
  w, k = next((w, k) for k in range(2, 10) for w in range(4)
              if toks[w, k] not in toks[:, :k] and (toks[:, k] == toks[w, k]).sum() == 1)
  stop = int(toks[w, k])
  out = sampling.sample(m, params, per_thread, num_threads=4, max_new_tokens=12,
                        temperature=0.0, stop_ids=(stop,), pad_id=0)
  assert out.lengths[0, w] == k + 1 and out.finish_reasons[0][w] == "stop"
  assert (out.tokens[0, w, k + 1:] == 0).all()
  np.testing.assert_array_equal(out.tokens[0, :, :k + 1], toks[:, :k + 1])  # same until then
  # the other threads equal a teacher-forced run in which thread w's later tokens are masked
  tf = sampling.teacher_forced_logprobs(m, params, out)
  assert np.abs(tf - out.logprobs).max() <= 1e-4


def test_stop_sequences_end_a_thread():
  m, params = _model(True)
  per_thread = [[[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]]
  free = sampling.sample(m, params, per_thread, num_threads=4, max_new_tokens=12,
                         temperature=0.0)
  toks = free.tokens[0]

  def seen_before(seq, k):  # the pair occurs in some thread ending before step k
    return any(tuple(toks[v, j - 1:j + 1]) == seq for v in range(4) for j in range(1, k))

  w, k = next((w, k) for k in range(3, 10) for w in range(4)
              if not seen_before(tuple(toks[w, k - 1:k + 1]), k)
              and sum(tuple(toks[v, k - 1:k + 1]) == tuple(toks[w, k - 1:k + 1])
                      for v in range(4)) == 1)
  seq = [int(toks[w, k - 1]), int(toks[w, k])]
  out = sampling.sample(m, params, per_thread, num_threads=4, max_new_tokens=12,
                        temperature=0.0, stop_sequences=[seq])
  assert out.lengths[0, w] == k + 1 and out.finish_reasons[0][w] == "stop"
  assert np.abs(sampling.teacher_forced_logprobs(m, params, out) - out.logprobs).max() <= 1e-4


def test_per_thread_prompts_and_validation():
  m, params = _model(True)
  per = [[[3, 4], [5, 6, 7, 8, 9], [10], [11, 12, 13]]]
  out = sampling.sample(m, params, per, num_threads=4, max_new_tokens=6, temperature=0.0)
  assert out.prompt_valid[0].sum(-1).tolist() == [2, 5, 1, 3]
  assert np.abs(sampling.teacher_forced_logprobs(m, params, out) - out.logprobs).max() <= 1e-4
  with pytest.raises(ValueError, match="3 per-thread prompts for 4 threads"):
    sampling.sample(m, params, [[[1], [2], [3]]], num_threads=4, max_new_tokens=2)
  with pytest.raises(ValueError, match="max_new_tokens=0"):
    sampling.sample(m, params, PROMPTS, num_threads=1, max_new_tokens=0)


def test_sampling_is_seeded_and_filters_work():
  m, params = _model(True)
  a = sampling.sample(m, params, PROMPTS, num_threads=2, max_new_tokens=8, seed=3)
  b = sampling.sample(m, params, PROMPTS, num_threads=2, max_new_tokens=8, seed=3)
  c = sampling.sample(m, params, PROMPTS, num_threads=2, max_new_tokens=8, seed=4)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert not np.array_equal(a.tokens, c.tokens)
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  assert np.isfinite(np.asarray(sampling._filter_logits(logits, 1.0, 2, 1.0))).sum() == 2
  # nucleus 0.7 keeps the smallest prefix whose mass reaches 0.7: {0.5, 0.3}
  assert np.isfinite(np.asarray(sampling._filter_logits(logits, 1.0, 0, 0.7))).sum() == 2
  assert np.isfinite(np.asarray(sampling._filter_logits(logits, 1.0, 0, 0.4))).sum() == 1
  top1 = sampling.sample(m, params, PROMPTS, num_threads=2, max_new_tokens=6, top_k=1, seed=9)
  greedy = sampling.sample(m, params, PROMPTS, num_threads=2, max_new_tokens=6, temperature=0)
  np.testing.assert_array_equal(top1.tokens, greedy.tokens)


def test_mean_hidden_matches_the_forward_pass():
  m, params = _model(True)
  out = sampling.sample(m, params, PROMPTS, num_threads=3, max_new_tokens=7, temperature=0.0)
  tokens, valid = sampling.full_grid(out)
  _, hidden = m.apply(params, tokens, valid=valid, return_hidden=True)
  p = out.prompt_tokens.shape[-1]
  gen = valid[:, :, p:, None]
  ref = (np.asarray(hidden[:, :, p:]) * gen).sum(2) / gen.sum(2)
  np.testing.assert_allclose(out.mean_hidden, ref, atol=1e-4)


def test_sharded_sampler_equals_unsharded_and_chunks_are_seeded_calls():
  """The sampler on a mesh of 8 (fake CPU) devices, batch and caches sharded over fsdp, gives
  the unsharded result; generating in batch chunks = one call per chunk with its own key."""
  from lace_jax import sharding
  m, params = _model(True)
  prompts = [[5, 6, 7, 8, 9], [3, 4, 5], [9, 8, 7, 6], [1, 2]] * 2  # B = 8
  kw = dict(num_threads=2, max_new_tokens=6, temperature=1.0, seed=3)
  ref = sampling.sample(m, params, prompts, **kw)
  mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  assert mesh.shape["fsdp"] == 8
  rules = sharding.DEFAULT_RULES
  sharded_params = jax.device_put(params, sharding.logical_to_sharding(m.logical_axes(), mesh,
                                                                       rules))
  got = sampling.sample(m, sharded_params, prompts, mesh=mesh, **kw)
  np.testing.assert_array_equal(got.tokens, ref.tokens)
  np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-5)
  # chunks: chunk 0 is the first half sampled alone with key(seed); chunk 1 uses fold_in(.., 1)
  chunked = sampling.sample(m, params, prompts, batch_chunk=4, **kw)
  first = sampling.sample(m, params, prompts[:4], **kw)
  np.testing.assert_array_equal(chunked.tokens[:4], first.tokens)
  greedy = dict(kw, temperature=0.0)
  np.testing.assert_array_equal(sampling.sample(m, params, prompts, batch_chunk=2, **greedy).tokens,
                                sampling.sample(m, params, prompts, **greedy).tokens)
  with pytest.raises(ValueError, match="data-parallel ways"):
    sampling.sample(m, sharded_params, prompts[:4], mesh=mesh, **kw)
  with pytest.raises(ValueError, match="batch_chunk=3"):
    sampling.sample(m, params, prompts, batch_chunk=3, **kw)


def _compiled() -> int:
  """Programs in the sampler's jit caches (prefill + decode); exists on old code too."""
  return sampling._prefill._cache_size() + sampling._decode._cache_size()


def test_sampling_parameters_share_one_compilation():
  """Issue 16.1: temperature, top_p, top_k and stop sequences are traced, so new values reuse
  the compiled sampler of their shape bucket."""
  m, params = _model(True)
  kw = dict(num_threads=2, max_new_tokens=6, seed=1)
  sampling.sample(m, params, PROMPTS, temperature=0.3, stop_sequences=[[7, 8]], **kw)
  before = _compiled()
  for i, (t, p, k) in enumerate([(0.3001, 0.9, 0), (0.7, 0.5, 3), (1.3, 1.0, 7), (0.0, 1.0, 0)]):
    sampling.sample(m, params, PROMPTS, temperature=t, top_p=p, top_k=k,
                    stop_sequences=[[9 + i, 10]], **kw)
  assert _compiled() == before


def test_per_example_parameters():
  """One call with a greedy row and a sampled row: the greedy row equals a greedy call alone
  (rows are independent examples) and the temperature array reaches each row."""
  m, params = _model(True)
  kw = dict(num_threads=2, max_new_tokens=8, seed=5)
  greedy = sampling.sample(m, params, PROMPTS, temperature=0.0, **kw)
  mixed = sampling.sample(m, params, PROMPTS, temperature=[0.0, 1.0], top_k=[0, 4], **kw)
  hot = sampling.sample(m, params, PROMPTS, temperature=1.0, top_k=4, **kw)
  np.testing.assert_array_equal(mixed.tokens[0], greedy.tokens[0])
  np.testing.assert_array_equal(mixed.tokens[1], hot.tokens[1])
  with pytest.raises(ValueError, match=r"temperature has shape \(3,\)"):
    sampling.sample(m, params, PROMPTS, temperature=[0.0, 1.0, 2.0], **kw)


def test_stop_sequence_longer_than_the_generation():
  """Issue 16.4: a stop sequence longer than max_new_tokens can never end a thread; it used to
  fail in the jitted decode ("slice_sizes must be less than or equal to operand shape")."""
  m, params = _model(True)
  kw = dict(num_threads=2, max_new_tokens=8, temperature=0.0)
  ref = sampling.sample(m, params, PROMPTS, **kw)
  out = sampling.sample(m, params, PROMPTS, stop_sequences=[list(range(1, 31))], **kw)
  np.testing.assert_array_equal(out.tokens, ref.tokens)


@pytest.mark.parametrize("tiny", [dict(temperature=1e-300), dict(temperature=1e-7),
                                  dict(top_p=1e-300)])
def test_vanishing_temperature_or_top_p_is_greedy(tiny):
  """Issue 16.6: 1e-300 is 0 in float32; temperature or top_p below GREEDY_EPSILON is greedy
  (top-1), not a division by zero."""
  m, params = _model(True)
  kw = dict(num_threads=2, max_new_tokens=8, seed=2)
  greedy = sampling.sample(m, params, PROMPTS, temperature=0.0, **kw)
  out = sampling.sample(m, params, PROMPTS, **tiny, **kw)
  np.testing.assert_array_equal(out.tokens, greedy.tokens)
  np.testing.assert_allclose(out.logprobs, greedy.logprobs, atol=1e-6)


def test_decode_chunks_give_the_same_tokens_and_can_be_cancelled():
  m, params = _model(True)
  kw = dict(num_threads=2, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=4)
  ref = sampling.sample(m, params, PROMPTS, **kw)
  asked = []
  out = sampling.sample(m, params, PROMPTS, decode_chunk=3,
                        should_cancel=lambda: asked.append(1) and False, **kw)
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  np.testing.assert_array_equal(out.lengths, ref.lengths)
  np.testing.assert_allclose(out.mean_hidden, ref.mean_hidden, atol=1e-6)
  assert asked  # asked between chunks
  with pytest.raises(sampling.Cancelled):
    sampling.sample(m, params, PROMPTS, decode_chunk=3, should_cancel=lambda: True, **kw)
