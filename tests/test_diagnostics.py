"""Thread-level lattice diagnostics (`lace_jax.diagnostics`): the numbers against a direct
numpy computation from the sown queries and keys, and their properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lace_jax import build_model
from lace_jax.config import LatticeConfig, ModelConfig
from lace_jax.diagnostics import lattice_diagnostics, query_columns
from tests.conftest import randomize

CFG = ModelConfig.preset("tiny", dtype="float32")
LAYERS = (1, 3)


def _grid(w: int, t: int = 12, b: int = 2, seed: int = 0):
  """tokens, valid [B, W, T]: left padding in one thread, a thread finished early in another."""
  tokens = np.random.default_rng(seed).integers(0, 100, (b, w, t)).astype(np.int32)
  valid = np.ones(tokens.shape, bool)
  valid[0, w - 1, :3] = False  # left padding
  valid[1, 0, -4:] = False  # finished early
  return tokens, valid


def _model(mask="causal", gate="elementwise", seed=0, **kw):
  lat = LatticeConfig(layers=LAYERS, width=16, heads=2, mask=mask, gate=gate, **kw)
  model, params = build_model(CFG, lat, seed=seed)
  return model, randomize(params, seed=seed + 1)


def _keys(path) -> list:
  return [getattr(k, "key", None) for k in path]


def _sown(model, params, tokens, valid):
  """{layer: (q, k, gate or None)} as numpy, straight from the module's sown collection."""
  pos = np.maximum(np.cumsum(valid, -1) - 1, 0).astype(np.int32)
  _, state = model.module.apply({"params": params}, jnp.asarray(tokens), jnp.asarray(pos),
                                jnp.asarray(valid), mutable=["intermediates"])
  out = {}
  for i in LAYERS:
    sown = state["intermediates"][f"layers_{i}"]["lattice"]
    q, k = sown["qk"][0]
    g = sown["gate"][0] if "gate" in sown else None
    out[i] = (np.asarray(q, np.float64), np.asarray(k, np.float64),
              None if g is None else np.asarray(g, np.float64))
  return out


def _readable(mask: str, w: int, t: int, wk: int, s: int) -> bool:
  return {"causal": s <= t, "other_threads": s <= t and wk != w,
          "same_position": s == t}[mask]


def _direct(mask, q, k, g, valid, cols):
  """Loops over (batch, head, query): the cross-thread share, entropy and gate mean."""
  b, w, t, c, e = q.shape
  cross, ent = [], []
  for bi in range(b):
    for wq in range(w):
      for tq in cols:
        if not valid[bi, wq, tq]:
          continue
        keys = [(wk, s) for wk in range(w) for s in range(t)
                if valid[bi, wk, s] and _readable(mask, wq, tq, wk, s)]
        if not keys:
          continue
        for ci in range(c):
          sc = np.array([q[bi, wq, tq, ci] @ k[bi, wk, s, ci] for wk, s in keys]) / np.sqrt(e)
          p = np.exp(sc - sc.max())
          p /= p.sum()
          cross.append(sum(pi for pi, (wk, _) in zip(p, keys) if wk != wq))
          ent.append(-np.sum(p * np.log(np.maximum(p, 1e-300))))
  gate = None if g is None else g[valid].mean()
  return np.mean(cross), np.mean(ent), gate


@pytest.mark.parametrize("mask", ["causal", "same_position"])
def test_diagnostics_equal_a_direct_computation(mask):
  model, params = _model(mask)
  tokens, valid = _grid(3)
  got = lattice_diagnostics(model, params, tokens, valid, max_queries=5)
  cols = query_columns(12, 5)
  assert list(cols) == [0, 3, 6, 8, 11]  # evenly spaced, first and last included
  sown = _sown(model, params, tokens, valid)
  for name in ("cross_thread", "entropy", "gate"):
    assert f"lattice/{name}" in got
  per = {n: [] for n in ("cross_thread", "entropy", "gate")}
  for i, (q, k, g) in sown.items():
    cross, ent, gate = _direct(mask, q, k, g, valid, cols)
    np.testing.assert_allclose(got[f"lattice/cross_thread/layer_{i}"], cross, rtol=1e-4)
    np.testing.assert_allclose(got[f"lattice/entropy/layer_{i}"], ent, rtol=1e-4)
    np.testing.assert_allclose(got[f"lattice/gate/layer_{i}"], gate, rtol=1e-4)
    for n, v in zip(per, (cross, ent, gate)):
      per[n].append(v)
    assert 0.0 < cross < 1.0 and ent > 0.0
  for n, vs in per.items():
    np.testing.assert_allclose(got[f"lattice/{n}"], np.mean(vs), rtol=1e-4)
  assert len(got) == 3 * (len(LAYERS) + 1)


def test_other_threads_mask_reads_only_other_threads():
  model, params = _model("other_threads")
  tokens, valid = _grid(3)
  got = lattice_diagnostics(model, params, tokens, valid)
  for i in LAYERS:
    np.testing.assert_allclose(got[f"lattice/cross_thread/layer_{i}"], 1.0, rtol=1e-6)


def test_one_thread_has_no_cross_thread_mass():
  model, params = _model("causal")
  tokens, valid = _grid(1)
  got = lattice_diagnostics(model, params, tokens, valid)
  assert got["lattice/cross_thread"] == 0.0 and got["lattice/entropy"] > 0.0
  model, params = _model("other_threads")  # nothing to read at all: empty means are 0
  got = lattice_diagnostics(model, params, tokens, valid)
  assert got["lattice/cross_thread"] == 0.0 and got["lattice/entropy"] == 0.0


def test_open_gates_read_one_and_head_gates_too():
  for gate in ("elementwise", "head"):
    model, params = _model(gate=gate)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 40.0 if _keys(p)[-1] == "gate_bias" else x, params)
    got = lattice_diagnostics(model, params, *_grid(2))
    for i in LAYERS:
      assert got[f"lattice/gate/layer_{i}"] > 1 - 1e-6, gate


def test_no_gate_no_gate_metric_and_no_lattice_nothing():
  model, params = _model(gate="none")
  got = lattice_diagnostics(model, params, *_grid(2))
  assert "lattice/cross_thread" in got and not any(k.startswith("lattice/gate") for k in got)
  base = model.replace(lattice=None)
  assert lattice_diagnostics(base, params, *_grid(2)) == {}


def test_uniform_attention_has_the_entropy_of_the_readable_keys():
  """q = 0: every readable key gets the same weight, entropy log(#readable keys)."""
  model, params = _model("causal")
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.zeros_like(x) if _keys(p)[-2:] == ["lattice", "q"] else x, params)
  tokens, valid = _grid(3)
  got = lattice_diagnostics(model, params, tokens, valid, max_queries=5)
  b, w, t = tokens.shape
  expect = []
  for bi in range(b):
    for wq in range(w):
      for tq in query_columns(t, 5):
        n = valid[bi, :, :tq + 1].sum()
        if valid[bi, wq, tq]:
          expect.append(np.log(n))
  for i in LAYERS:
    np.testing.assert_allclose(got[f"lattice/entropy/layer_{i}"], np.mean(expect), rtol=1e-5)


def test_on_a_mesh_with_sharded_params_the_same_numbers():
  """As GRPO runs them: params sharded over data x fsdp x tensor, the rules' constraints on."""
  from lace_jax import sharding
  model, params = _model("causal")
  tokens, valid = _grid(3)
  want = lattice_diagnostics(model, params, tokens, valid)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = sharding.rules_with_overrides(())
  sharded = jax.device_put(params, sharding.logical_to_sharding(model.logical_axes(), mesh,
                                                                rules))
  got = lattice_diagnostics(model, sharded, tokens, valid, mesh=mesh, rules=rules)
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, err_msg=k)
