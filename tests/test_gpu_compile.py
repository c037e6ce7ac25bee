"""The GPU path compiled all the way, with no GPU: XLA:GPU and Triton compile every Pallas kernel
and the whole model's functions for compile-only NVIDIA devices (`jax[cuda12]`, installed by
.ci/run; `JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1` lets the CUDA plugin load without a GPU, conftest).

  kernels  lattice forward, gradient (dq, dk/dv) and split-key decode, bf16, for an H100 and an
           RTX PRO 6000 (the paper's GPU, Blackwell), at the 1.7B and 4B lattice head dims
           (E = 64, 80; C = 4) and W in {4, 16, 128}
  model    the rollout prefill (forward), the decode loop and the GRPO train step (backward) of
           grpo_1p7b / grpo_4b cut to 2 layers (one lattice layer; real widths and vocabulary),
           planned by `lace_jax.plan` for the same devices and W

The kernels run on a GPU in tests/test_kernels_gpu.py (GPU backends only).
"""

import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import pytest

from lace_jax.kernels.lattice_attention import decode as decode_lib
from lace_jax.kernels.lattice_attention import lattice_attention_pallas

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPUS = ("h100", "rtx6000pro")
HEAD_DIMS = {64: "grpo_1p7b", 80: "grpo_4b"}  # lattice head dim E -> the experiment using it


@pytest.fixture(scope="module", params=GPUS)
def gpu(request):
  """(name, compile-only device). Fails (never skips) without the CUDA plugin: CI installs it.
  The persistent compilation cache is off meanwhile: a compile-only executable is written to it
  but cannot be read back without a GPU client."""
  if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
    pytest.fail("the CUDA plugin is missing: pip install 'jax[cuda12]==0.10.2' "
                "(requirements-test.txt; no GPU needed)")
  from lace_jax import plan
  cache = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  yield request.param, plan.resolve_target(f"cuda:{request.param}").devices[0]
  jax.config.update("jax_enable_compilation_cache", cache)


def _compile(fn, *args):
  return jax.jit(fn).trace(*args).lower().compile()


@pytest.mark.parametrize("e", sorted(HEAD_DIMS))
@pytest.mark.parametrize("w", [4, 16, 128])
def test_lattice_kernels_compile_for_gpu(gpu, e, w):
  name, device = gpu
  sharding = jax.sharding.SingleDeviceSharding(device)
  sd = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt, sharding=sharding)
  b, t, c = 2, 512, 4
  q, valid = sd(b, w, t, c, e), sd(b, w, t, dt=jnp.bool_)
  f = lambda q, k, v, m: lattice_attention_pallas(q, k, v, key_valid=m)
  grad = jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=(0, 1, 2))
  fwd = _compile(f, q, q, q, valid)
  bwd = _compile(grad, q, q, q, valid)
  # no padded copy of q, k, v or dO (E = 80 is computed in 128 masked lanes): no pad at all in
  # the compiled programs. The forward's temporaries are at most the head-major copies of its
  # three arguments (inside a model XLA folds those transposes into the producers); with the
  # padded copies E = 80, W = 128 needed 512.8 MiB = 6.4 operands forward
  q_bytes = b * w * t * c * e * 2
  for compiled in (fwd, bwd):
    assert not re.search(r"\bpad\(", compiled.as_text()), name
  assert fwd.memory_analysis().temp_size_in_bytes <= 3.1 * q_bytes, name
  assert bwd.memory_analysis().temp_size_in_bytes <= 4.2 * q_bytes, name
  s = 4096  # decode: a long cache, several key splits
  args = (sd(b, w, c, e), sd(b, w, c, e, s), sd(b, w, c, e, s), sd(b, w, s, dt=jnp.bool_),
          sd(b, dt=jnp.int32), sd(b, w, c, e), sd(b, w, c, e), sd(b, w, dt=jnp.bool_))
  for mask in ("causal", "other_threads"):
    dec = _compile(lambda *a: decode_lib.decode_pallas(*a, mask=mask), *args)
    assert dec.memory_analysis().temp_size_in_bytes < b * w * s * c * e * 2  # below one cache


def _experiment(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "experiments",
                                                                   f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


@pytest.mark.parametrize("e", sorted(HEAD_DIMS))
@pytest.mark.parametrize("w", [4, 16, 128])
def test_model_compiles_for_gpu(gpu, e, w):
  """Forward, decode loop and train step of the real recipe (2 layers) with the GPU kernels."""
  from lace_jax import plan
  from lace_jax.training import setup
  name, _ = gpu
  cfg = _experiment(HEAD_DIMS[e])
  cfg.model.num_layers = 2
  cfg.lattice.layers = (1,)
  assert setup.model_configs(cfg)[1].head_dim == e and cfg.model.dtype == "bfloat16"
  cfg.data.num_threads = w
  cfg.data.prompt_len = 64
  cfg.grpo.update(questions_per_step=1, rollouts_per_question=2, max_new_tokens=32,
                  rollout_batch=2)
  cfg.train.grad_accum = 1
  report = plan.plan_target(cfg, f"cuda:{name}", log=lambda *a: None)
  assert [f["function"] for f in report["functions"]] == ["rollout_prefill", "rollout_admit",
                                                          "rollout_decode", "train_step"]
  assert report["fits"], report
  for f in report["functions"]:
    assert f["total_bytes"] < f["capacity"], f
    if f["function"] == "rollout_admit":  # copies into the slots: no model in it
      continue
    assert f["temp_bytes"] > 0
    # the lattice layer (and the backbone's flash attention) run as Triton kernels
    assert f["custom_calls"].get("__gpu$xla.gpu.triton", 0) >= 1, f["custom_calls"]
  train = report["functions"][-1]["custom_calls"]["__gpu$xla.gpu.triton"]  # train_step
  assert train >= 2 * 3, train  # forward, dq, dk/dv of the lattice layer and of the backbone


def test_cudnn_backward_has_no_bias_gradient(monkeypatch):
  """The 4B backbone's attention backward with implementation="cudnn", compiled for an H100:
  the old call (a dense mask, which jax turns into a bias whose [rows, 1, T, S] gradient cuDNN
  always returns) against the bias-free call (is_causal + sequence lengths). Two rematerialised
  layers at the 4B heads (32 query, 8 kv, head dim 128, d_model 2560): XLA's temporaries must
  drop by at least one bias gradient, and the new backward must return none.
  (benchmarks/cudnn_bias_memory.py gives the full sft_4b figures.)"""
  from lace_jax import kernels
  from jax._src.cudnn import fused_attention_stablehlo as fa
  monkeypatch.setattr(fa, "check_cudnn_version", lambda: 90800)  # needs a GPU jaxlib to ask
  spec = importlib.util.spec_from_file_location(
      "cudnn_bias_memory", os.path.join(ROOT, "benchmarks", "cudnn_bias_memory.py"))
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  rows, t = 2, 4096  # one thread of sft_4b (T = 4096), two of them
  bias = rows * t * t * 2  # one bf16 [rows, 1, T, S] bias gradient
  cache = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  temp, texts = {}, {}
  try:
    for variant in ("mask", "lengths"):
      fn, shapes = bench.build(variant, rows, t, 32, 8, 128, 2560, layers=2)
      with kernels.target_platform("gpu"):
        mem, texts[variant] = bench.compile_memory(fn, shapes, "h100")
      temp[variant] = mem.temp_size_in_bytes
  finally:
    jax.config.update("jax_enable_compilation_cache", cache)
  assert "fmhaScaleBiasSoftmaxBackward" in texts["mask"]  # the old call: a bias gradient
  assert "Bias" not in texts["lengths"] and "fmhaSoftmaxBackward" in texts["lengths"]
  assert temp["mask"] - temp["lengths"] >= bias, (temp, bias)
