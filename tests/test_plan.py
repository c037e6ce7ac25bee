"""The plan mode (`lace_jax.plan`): every jitted function of a stage compiled, with no weights
allocated, for this machine and for compile-only TPU devices (libtpu, installed by .ci/run)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from lace_jax import plan, runtime, sampling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, timeout=900):
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user's machine
  env.pop("JAX_PLATFORMS", None)  # as a user runs it (the test process pins "cpu")
  return subprocess.run([sys.executable, "-m", "lace_jax.main", *args], capture_output=True,
                        text=True, cwd=ROOT, env=env, timeout=timeout)


@pytest.mark.parametrize("experiment,functions", [
    ("sft_1p7b", ["train_step"]),
    ("grpo_1p7b", ["rollout_prefill", "rollout_admit", "rollout_decode", "logprobs",
                   "train_step"]),
    ("eval_4b", ["prefill", "decode"]),
])
def test_plan_local_runlocal(tmp_path, experiment, functions):
  """Each stage's functions compile for this machine; a table and plan.json come out; GRPO
  with a KL term plans its log-prob pass too."""
  extra = ["--config.grpo.kl_beta=0.1"] if experiment.startswith("grpo") else []
  r = _main(f"--config=experiments/{experiment}.py:runlocal", "--config.plan.target=local",
            f"--workdir={tmp_path}", *extra)
  assert r.returncode == 0, r.stderr[-3000:]
  report = json.load(open(tmp_path / "plan.json"))
  (rep,) = report["plans"]
  assert [f["function"] for f in rep["functions"]] == functions
  for f in rep["functions"]:
    assert f["fits"] and f["total_bytes"] > 0 and f["temp_bytes"] >= 0
    if f["function"] != "rollout_admit":  # (copies prompts into the slots: no model)
      assert f["params_bytes"] > 0  # the tiny model's parameters, counted per device
  assert "| train_step |" in r.stdout or "| prefill |" in r.stdout
  assert not os.path.exists(tmp_path / "checkpoints")  # nothing ran
  rows = {f["function"]: f for f in rep["functions"]}
  if "rollout_decode" in rows:  # a decode call of the engine runs decode_chunk one-token
    # columns over every slot: per column at least the prefill's FLOPs per prompt column, and
    # enough calls per step for every new token of every rollout
    pre, dec = rows["rollout_prefill"], rows["rollout_decode"]
    spec = importlib.util.spec_from_file_location("g", os.path.join(ROOT, "experiments",
                                                                     f"{experiment}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config("runlocal")
    p, n, chunk = cfg.data.prompt_len, cfg.grpo.max_new_tokens, cfg.grpo.decode_chunk
    width = sampling.bucket(p, 16)
    assert dec["loop_trips"] == min(chunk, n)
    assert dec["calls_per_step"] * dec["loop_trips"] >= n
    assert dec["model_flops_per_device"] >= pre["model_flops_per_device"] * min(chunk, n) / width


def test_plan_exits_nonzero_naming_the_function(tmp_path):
  """A budget the step cannot fit: status 1, the function and the shortfall named."""
  r = _main("--config=experiments/sft_1p7b.py:runlocal", "--config.plan.target=local",
            "--config.plan.device_memory=1e6", f"--workdir={tmp_path}")
  assert r.returncode == 1, r.stderr[-2000:]
  assert "does not fit: sft.train_step on local" in r.stderr
  assert "GB more than the 0.00 GB available" in r.stderr
  report = json.load(open(tmp_path / "plan.json"))
  assert report["fits"] is False


def test_plan_compile_only_tpu(tmp_path):
  """The train step and the sampler compile for 4 compile-only TPU v5e chips (XLA:TPU, with
  the TPU kernels: Pallas flash attention under shard_map), with XLA's memory and cost, under
  the experiment's XLA:TPU options (runtime.libtpu_init_args, set before libtpu starts)."""
  # Qwen3-1.7B cut to 2 layers, bf16 (its real head dim 128 and cache dtype: with the tiny
  # preset's head dim 32, or an f32 cache, XLA:TPU copies the cache to a lane-friendlier layout
  # or to bf16 for the dot every column)
  r = _main("--config=experiments/grpo_1p7b.py:runlocal", "--config.plan.target=tpu:v5e:2x2",
            "--config.data.prompt_len=128", "--config.grpo.max_new_tokens=4096",
            "--config.grpo.questions_per_step=16", "--config.model.preset=qwen3-1.7b",
            "--config.model.num_layers=2", "--config.lattice.layers=(1,)",
            "--config.model.dtype=bfloat16", "--config.train.grad_accum=4",
            f"--workdir={tmp_path}")
  assert r.returncode == 0, r.stderr[-3000:]
  report = json.load(open(tmp_path / "plan.json"))
  # the decode loop updates the donated cache in place: no second cache among its temporaries,
  # beside the embedding table FSDP gathers for the output head (a second cache: the sampler
  # returning the loop's cache instead of the last step's, or the engine's cache written
  # row-major and read head-major, put 86-100% of the cache's size in temporaries)
  dec = [f for f in report["plans"][0]["functions"] if f["function"] == "rollout_decode"][0]
  table = 151936 * 2048 * 2  # Qwen3-1.7B's vocab x d_model, bf16
  assert dec["temp_bytes"] < 0.5 * dec["cache_bytes"] + table, (dec["temp_bytes"],
                                                                 dec["cache_bytes"])
  assert report["libtpu_init_args"].split()[-2:] == list(runtime.DEFAULT_LIBTPU_INIT_ARGS)
  (rep,) = report["plans"]
  assert rep["devices"] == "4 x TPU v5e" and "fsdp=4" in rep["mesh"]
  assert 15e9 < rep["chip"]["memory"] < 18e9  # XLA:TPU's own figure for a v5e chip
  for f in rep["functions"]:
    assert f["fits"] and f["predicted_seconds"] > 0
    assert f["flops"] > 0 or f["function"] == "rollout_admit"  # (copies into the slots)


def test_plan_names_a_batch_that_does_not_split_over_the_mesh(tmp_path):
  """Eval's 2 prompts on 4 compile-only TPU chips (fsdp=4): exit 2 naming eval.batch_size and
  what to do, not a sharding traceback."""
  r = _main("--config=experiments/eval_4b.py:runlocal", "--config.plan.target=tpu:v5e:2x2",
            "--config.eval.batch_size=2", f"--workdir={tmp_path}")
  assert r.returncode == 2, r.stderr[-2000:]
  assert "eval.batch_size gives 2 rows per call" in r.stderr
  assert "4 devices of the batch axes" in r.stderr and "Traceback" not in r.stderr


def test_plan_functions_picks_the_functions_to_compile(tmp_path):
  r = _main("--config=experiments/grpo_1p7b.py:runlocal", "--config.plan.target=local",
            "--config.plan.functions=rollout_decode,rollout_prefill", f"--workdir={tmp_path}")
  assert r.returncode == 0, r.stderr[-3000:]
  (rep,) = json.load(open(tmp_path / "plan.json"))["plans"]
  assert [f["function"] for f in rep["functions"]] == ["rollout_prefill", "rollout_decode"]
  bad = _main("--config=experiments/grpo_1p7b.py:runlocal", "--config.plan.target=local",
              "--config.plan.functions=decode", f"--workdir={tmp_path / 'bad'}")
  assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
  errors = [line for line in bad.stderr.splitlines() if line.startswith("error: ")]
  assert errors == ["error: plan for local: plan.functions names ['decode']; the grpo stage's "
                    "functions are "
                    "['rollout_prefill', 'rollout_admit', 'rollout_decode', 'train_step']"], \
      bad.stderr[-2000:]


def test_target_parsing_errors():
  with pytest.raises(ValueError, match="tpu:<chip>:<topology>"):
    plan.resolve_target("tpu:v9:2x2")
  with pytest.raises(ValueError, match="cuda:<gpu>"):
    plan.resolve_target("cuda:a100x8")
  with pytest.raises(ValueError, match="expected local"):
    plan.resolve_target("h100")


def test_gpu_target_config_has_the_chip():
  text = plan.gpu_target_config("rtx6000pro")
  assert "core_count: 188" in text and "major: 12" in text
  assert "collective_memory_granularity" not in text  # unknown to jax 0.10.2's proto


def test_oom_message_parsed():
  msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
         "temporaries (167.91G) exceeds available HBM (95.74G).")
  temp, avail = plan._parse_oom(msg)
  assert temp == pytest.approx(167.91 * 2**30) and avail == pytest.approx(95.74 * 2**30)


def test_roofline_mfu_only_when_xla_counts_the_model_flops():
  """MFU comes from a time XLA's own counts bound; where XLA counted fewer FLOPs than the model
  has (a loop body counted once), the time is a lower bound and no MFU is claimed."""
  chip = plan.Chip(name="x", platform="tpu", memory=1e9, peak_flops=100.0, bandwidth=10.0)
  # compute-bound, XLA's count complete: 200 FLOPs at 100/s = 2 s; MFU = 150 / 200
  seconds, mfu, bound = plan.roofline(200.0, 10.0, 150.0, chip)
  assert (seconds, bound) == (2.0, False) and mfu == pytest.approx(0.75)
  # memory-bound: 50 bytes at 10/s = 5 s; MFU = 150 / 500
  seconds, mfu, bound = plan.roofline(200.0, 50.0, 150.0, chip)
  assert seconds == 5.0 and mfu == pytest.approx(0.3)
  # XLA counted a third of the model's FLOPs: 3 s from the model's count, a bound, no MFU
  seconds, mfu, bound = plan.roofline(100.0, 10.0, 300.0, chip)
  assert (seconds, mfu, bound) == (3.0, None, True)
  # an empty analysis (compile-only XLA:GPU)
  assert plan.roofline(0.0, 0.0, 300.0, chip)[1:] == (None, True)


def test_libtpu_args_merge_and_guard():
  """The experiment's XLA:TPU flags are added to LIBTPU_INIT_ARGS unless the user set the same
  flag; malformed flags name the config field; applying after a backend started is refused."""
  from lace_jax import runtime
  got = runtime.merge_libtpu_args("--xla_tpu_enable_windowed_einsum_for_all_gather=true --a",
                                  runtime.DEFAULT_LIBTPU_INIT_ARGS)
  assert got.split() == ["--xla_tpu_enable_windowed_einsum_for_all_gather=true", "--a",
                         "--xla_tpu_enable_windowed_einsum_for_reduce_scatter=false"]
  assert runtime.merge_libtpu_args("", ("--x=1",)) == "--x=1"
  with pytest.raises(ValueError, match="runtime.libtpu_init_args.*'x=1'"):
    runtime.merge_libtpu_args("", ("x=1",))
  import jax
  jax.devices()  # a backend is running in this process now
  with pytest.raises(RuntimeError, match="before JAX starts a backend"):
    runtime.apply_libtpu_args(("--x=1",), environ={})

