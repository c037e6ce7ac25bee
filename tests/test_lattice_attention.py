"""The lattice attention reference: masks against literal matrices, values against a per-query
loop written independently of the einsum implementation."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lace_jax.kernels.lattice_attention import MASK_MODES, lattice_attention, lattice_mask
from lace_jax.kernels.lattice_attention.mask import Mode, may_attend, validate_mode

# Rows/columns are (w, t) flattened as w * T + t, for W = 2 threads and T = 2 columns.
LITERAL = {
    "causal": [[1, 0, 1, 0],
               [1, 1, 1, 1],
               [1, 0, 1, 0],
               [1, 1, 1, 1]],
    "other_threads": [[0, 0, 1, 0],
                      [0, 0, 1, 1],
                      [1, 0, 0, 0],
                      [1, 1, 0, 0]],
    "same_position": [[1, 0, 1, 0],
                      [0, 1, 0, 1],
                      [1, 0, 1, 0],
                      [0, 1, 0, 1]],
}


@pytest.mark.parametrize("mode", sorted(LITERAL))
def test_mask_matches_literal_matrix(mode):
  valid = jnp.ones((1, 2, 2), bool)
  m = lattice_mask(2, jnp.arange(2), jnp.arange(2), valid, mode)
  np.testing.assert_array_equal(np.asarray(m[0], int), np.array(LITERAL[mode]))


def test_invalid_keys_are_never_read():
  valid = jnp.array([[[True, False], [True, True]]])  # thread 0, column 1 is padding
  m = lattice_mask(2, jnp.arange(2), jnp.arange(2), valid, "causal")[0]
  assert not bool(m[:, 1].any())  # key (w=0, s=1) is read by nobody
  np.testing.assert_array_equal(np.asarray(m[:, [0, 2, 3]], int),
                                np.array(LITERAL["causal"])[:, [0, 2, 3]])


# `may_attend` itself, W = 2 threads and T = S = 3 columns, rows/columns flattened as w * 3 + t;
# each string is one query row over the 6 keys (1 = may attend).
LITERAL_W2_T3 = {
    "causal": "100100 110110 111111 100100 110110 111111",
    "other_threads": "000100 000110 000111 100000 110000 111000",
    "same_position": "100100 010010 001001 100100 010010 001001",
}


@pytest.mark.parametrize("mode", sorted(LITERAL_W2_T3))
def test_may_attend_matches_literal_matrix(mode):
  thr = jnp.array([0, 0, 0, 1, 1, 1])
  col = jnp.array([0, 1, 2, 0, 1, 2])
  want = np.array([[int(c) for c in row] for row in LITERAL_W2_T3[mode].split()])
  # the static id the Pallas kernels receive means the same as the name
  for m in (mode, validate_mode(mode)):
    got = may_attend(m, thr[:, None], col[:, None], thr[None, :], col[None, :])
    np.testing.assert_array_equal(np.asarray(got, int), want)


def test_mask_modes_and_their_validation():
  assert MASK_MODES == ("causal", "other_threads", "same_position")
  assert [validate_mode(m) for m in MASK_MODES] == [Mode.CAUSAL, Mode.OTHER_THREADS,
                                                    Mode.SAME_POSITION]
  for bad in ("everything", "CAUSAL", 0, None):
    with pytest.raises(ValueError, match=r"lattice mask mode .*; expected one of \('causal', "
                       r"'other_threads', 'same_position'\)"):
      validate_mode(bad)


def _loop_reference(q, k, v, valid, mode):
  """Explicit per-query softmax, float64, written from the spec's prose."""
  q, k, v, valid = (np.asarray(x, np.float64) for x in (q, k, v, valid))
  b_, w_, t_, c_, e_ = q.shape
  s_ = k.shape[2]
  out = np.zeros_like(q)
  for b, w, t, c in itertools.product(range(b_), range(w_), range(t_), range(c_)):
    keys = [(w2, s) for w2 in range(w_) for s in range(s_) if valid[b, w2, s] and (
        (mode == "causal" and s <= t) or (mode == "other_threads" and s <= t and w2 != w) or
        (mode == "same_position" and s == t))]
    if not keys:
      continue
    scores = np.array([q[b, w, t, c] @ k[b, w2, s, c] for w2, s in keys]) / np.sqrt(e_)
    p = np.exp(scores - scores.max())
    p /= p.sum()
    out[b, w, t, c] = sum(pi * v[b, w2, s, c] for pi, (w2, s) in zip(p, keys))
  return out


@pytest.mark.parametrize("mode", ["causal", "other_threads", "same_position"])
@pytest.mark.parametrize("w", [1, 3])
def test_reference_equals_loop(mode, w):
  b, t, c, e = 2, 5, 2, 4
  kq, kk, kv, km = jax.random.split(jax.random.key(w), 4)
  q = jax.random.normal(kq, (b, w, t, c, e))
  k = jax.random.normal(kk, (b, w, t, c, e))
  v = jax.random.normal(kv, (b, w, t, c, e))
  valid = jax.random.bernoulli(km, 0.8, (b, w, t))
  got = lattice_attention(q, k, v, key_valid=valid, mask=mode)
  np.testing.assert_allclose(np.asarray(got), _loop_reference(q, k, v, valid, mode), atol=1e-5)


def test_fully_masked_rows_are_zero_with_finite_gradients():
  q = jax.random.normal(jax.random.key(0), (1, 1, 3, 2, 4))
  valid = jnp.ones((1, 1, 3), bool)

  def f(q):  # W = 1 and other_threads: no query has a key
    return jnp.sum(lattice_attention(q, q, q, key_valid=valid, mask="other_threads") ** 2)

  out = lattice_attention(q, q, q, key_valid=valid, mask="other_threads")
  np.testing.assert_array_equal(np.asarray(out), 0.0)
  assert np.isfinite(np.asarray(jax.grad(f)(q))).all()


def test_unknown_implementation_and_mask_are_rejected():
  q = jnp.ones((1, 1, 2, 1, 2))
  valid = jnp.ones((1, 1, 2), bool)
  with pytest.raises(ValueError, match="available"):
    lattice_attention(q, q, q, key_valid=valid, implementation="cuda_magic")
  with pytest.raises(ValueError, match="mask mode"):
    lattice_attention(q, q, q, key_valid=valid, mask="everything")
  with pytest.raises(ValueError, match=r"key_valid \(1, 1, 3\)"):
    lattice_attention(q, q, q, key_valid=jnp.ones((1, 1, 3), bool))
