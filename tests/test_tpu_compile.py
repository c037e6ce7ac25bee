"""The TPU path compiled all the way, with no TPU: libtpu (`jax[tpu]`, installed by .ci/run)
compiles every Mosaic lattice kernel and the model's functions for compile-only TPU devices.

  kernels  lattice forward, gradient (dq, dk/dv) and decode, bf16, for TPU v5e, v5p and v6e, at
           the 1.7B and 4B lattice head dims (E = 64, 80; C = 4) and W in {4, 16, 128}
  model    the 2-layer slices (one lattice layer; real widths and vocabulary) of sft_1p7b with
           and without the lattice, and of grpo_1p7b / grpo_4b, planned by `lace_jax.plan` on
           tpu:v5e:2x2: the lattice's Mosaic calls are in the train step and the decode loop

The kernels run (in the TPU interpreter) in tests/test_kernels_tpu.py.
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest

from lace_jax import kernels
from lace_jax.kernels.lattice_attention import lattice_attention, lattice_decode_attention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHIPS = {"v5e": "tpu:v5e:2x2", "v5p": "tpu:v5p:2x2x1", "v6e": "tpu:v6e:2x2"}
HEAD_DIMS = {64: "grpo_1p7b", 80: "grpo_4b"}  # lattice head dim E -> the experiment using it
MOSAIC = "tpu_custom_call"


@pytest.fixture(scope="module", autouse=True)
def _no_persistent_cache():
  """A compile-only executable would be written to the persistent compilation cache but could
  not be read back without a TPU client: off for this module. Fails (never skips) without
  libtpu: CI installs it."""
  if importlib.util.find_spec("libtpu") is None:
    pytest.fail("libtpu is missing: pip install 'jax[tpu]==0.10.2' (requirements-test.txt; no "
                "TPU needed)")
  cache = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  yield
  jax.config.update("jax_enable_compilation_cache", cache)


@pytest.fixture(scope="module", params=sorted(CHIPS))
def tpu(request):
  """(chip, one compile-only device)."""
  from lace_jax import plan
  return request.param, plan.resolve_target(CHIPS[request.param]).devices[0]


def _compile(fn, *args):
  with kernels.target_platform("tpu"):
    return jax.jit(fn).trace(*args).lower().compile()


def _mosaic_calls(compiled) -> list[str]:
  """Names of the Mosaic kernels in a compiled program (in the custom calls' metadata)."""
  text = compiled.as_text()
  return [line for line in text.splitlines() if MOSAIC in line]


@pytest.mark.parametrize("e", sorted(HEAD_DIMS))
@pytest.mark.parametrize("w", [4, 16, 128])
def test_lattice_kernels_compile_for_tpu(tpu, e, w):
  """implementation="pallas" for a TPU: forward 1, gradient 3 (forward, dq, dk/dv) and decode
  1 Mosaic call, no fallback; the head dim is used as is (no pad of any operand in HBM)."""
  chip, device = tpu
  sharding = jax.sharding.SingleDeviceSharding(device)
  sd = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt, sharding=sharding)
  b, t, c = 1, 512, 4
  q, valid = sd(b, w, t, c, e), sd(b, w, t, dt=jnp.bool_)
  f = lambda q, k, v, m: lattice_attention(q, k, v, key_valid=m, implementation="pallas")
  grad = jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=(0, 1, 2))
  fwd, bwd = _compile(f, q, q, q, valid), _compile(grad, q, q, q, valid)
  assert len(_mosaic_calls(fwd)) == 1, chip
  assert len(_mosaic_calls(bwd)) == 3, chip
  for compiled in (fwd, bwd):
    assert " pad(" not in compiled.as_text(), chip
  # the forward's temporaries: at most the head-major views of q, k, v, out (E on 128 lanes in
  # HBM tiles) and the lane-dense log-sum-exp ([W*T, 128] f32 per head); inside a model XLA
  # folds the views into their producers
  q_bytes = b * w * t * c * 128 * 2
  lse_bytes = b * c * w * t * 128 * 4
  assert fwd.memory_analysis().temp_size_in_bytes <= 4.1 * q_bytes + lse_bytes, chip
  # its roofline inputs: the kernel's estimate is in XLA's cost analysis (2 matmuls per pair)
  assert fwd.cost_analysis()["flops"] >= 2 * 2 * b * c * (w * t) ** 2 * e / 2 * 0.9, chip
  # decode: the grpo recipes' cache (512 prompt + 4096 new columns), 8 slots (a cache too big
  # for XLA to stage in VMEM, as the real ones are)
  b, s = 8, 4608
  args = (sd(b, w, c, e), sd(b, w, c, e, s), sd(b, w, c, e, s), sd(b, w, s, dt=jnp.bool_),
          sd(b, dt=jnp.int32), sd(b, w, c, e), sd(b, w, c, e), sd(b, w, dt=jnp.bool_))
  for mask in ("causal", "other_threads"):
    dec = _compile(lambda *a: lattice_decode_attention(*a, mask=mask, implementation="pallas"),
                   *args)
    assert len(_mosaic_calls(dec)) == 1, (chip, mask)
    # the cache is read in place: no copy of it among the temporaries
    assert dec.memory_analysis().temp_size_in_bytes < b * w * s * c * e * 2, (chip, mask)


def _experiment(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "experiments",
                                                                   f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def _slice(name, lattice=True):
  cfg = _experiment(name)
  cfg.model.num_layers = 2
  cfg.lattice.layers = (1,)
  cfg.lattice.enabled = lattice
  assert cfg.model.dtype == "bfloat16"
  cfg.train.grad_accum = 1
  if cfg.mode == "grpo":
    cfg.grpo.update(questions_per_step=4, rollouts_per_question=2, max_new_tokens=512)
  else:
    cfg.train.batch_size = 4
  return cfg


def _calls(cfg) -> dict[str, int]:
  from lace_jax import plan
  # as a run compiles them (conftest's "highest" would ask Mosaic for f32 products of the
  # backbone flash kernel's bf16 operands, which it refuses)
  with jax.default_matmul_precision("default"):
    report = plan.plan_target(cfg, "tpu:v5e:2x2", log=lambda *a: None)
  assert report["fits"], report
  return {f["function"]: f["custom_calls"].get(MOSAIC, 0) for f in report["functions"]}


def test_sft_slice_runs_the_lattice_as_mosaic_kernels():
  """sft_1p7b cut to 2 layers: the train step with the lattice has at least 3 more Mosaic
  calls (forward, dq, dk/dv; the rematerialised forward adds one) than without it."""
  with_lattice, base = _calls(_slice("sft_1p7b")), _calls(_slice("sft_1p7b", lattice=False))
  assert with_lattice["train_step"] >= base["train_step"] + 3, (with_lattice, base)


@pytest.mark.parametrize("name", sorted(HEAD_DIMS.values()))
def test_grpo_slice_decodes_and_trains_with_mosaic_kernels(name):
  """grpo_1p7b / grpo_4b cut to 2 layers: the decode loop calls the lattice decode kernel (the
  backbone's one-column attention is XLA's), the prefill the lattice forward beside the
  backbone's flash attention, the train step the three lattice kernels beside flash's."""
  calls = _calls(_slice(name))
  assert calls["rollout_decode"] >= 1, calls
  assert calls["rollout_prefill"] >= 2, calls
  assert calls["train_step"] >= 3 + 2, calls
