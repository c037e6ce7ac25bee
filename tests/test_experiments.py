"""Every experiment file loads (default and :runlocal), builds its model configs, and the CLI
rejects typos and unavailable modes clearly."""

import glob
import json
import os
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from lace_jax import modes
from lace_jax.training import setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py")))


def _load(path_with_arg):
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=fv, lock_config=True)
  fv(["prog", f"--config={path_with_arg}"])
  return fv.config


def test_there_are_experiments():
  names = {os.path.basename(f) for f in FILES}
  assert {"pretrain_1p7b.py", "pretrain_4b.py", "sft_1p7b.py", "sft_4b.py", "grpo_1p7b.py",
          "grpo_4b.py", "eval_1p7b.py", "eval_4b.py", "overhead.py"} <= names


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
@pytest.mark.parametrize("arg", ["", ":runlocal"])
def test_experiment_loads(path, arg):
  cfg = _load(path + arg)
  assert cfg.mode in modes.MODES
  model, lattice = setup.model_configs(cfg)
  if arg:
    assert model.name == "tiny"
  assert lattice is None or max(lattice.layers) < model.num_layers
  assert os.path.basename(path)[:-3] in open(path).read()  # the docstring names its command
  with pytest.raises(AttributeError):
    cfg.no_such_field = 1  # locked: a typo cannot add a field


REAL = ("pretrain_1p7b", "pretrain_4b", "sft_1p7b", "sft_4b", "grpo_1p7b", "grpo_4b",
        "eval_1p7b", "eval_4b")


@pytest.mark.parametrize("name", REAL)
def test_real_experiments_name_their_targets(name):
  """Every shipped real-scale recipe names the accelerators it is made for (plan mode's
  `--config.plan.target=default`), and runs normally unless a plan target is given."""
  from lace_jax import plan
  cfg = _load(os.path.join(ROOT, "experiments", f"{name}.py"))
  assert cfg.plan.target == ""
  assert "cuda:h100x8" in cfg.plan.targets and "tpu:v5p:2x2x2" in cfg.plan.targets
  cfg.plan.target = "default"
  assert plan.targets_of(cfg) == list(cfg.plan.targets)


def _with_gpu_variants():
  for name in REAL:
    yield name, ""
    if "rtx6000pro" in open(os.path.join(ROOT, "experiments", f"{name}.py")).read():
      yield name, ":rtx6000pro"


@pytest.mark.parametrize("name,arg", list(_with_gpu_variants()))
def test_real_experiments_compute_in_bf16(name, arg):
  """The recipes made for GPUs (and TPUs) compute in bfloat16 over float32 parameters: tensor
  cores for every matmul and bf16 lattice kernels (the library's own default is float32, where
  the Pallas kernels use exact IEEE dots)."""
  cfg = _load(os.path.join(ROOT, "experiments", f"{name}.py") + arg)
  assert (cfg.model.dtype, cfg.model.param_dtype) == ("bfloat16", "float32")
  model, _ = setup.model_configs(cfg)
  assert model.dtype == "bfloat16"


def test_isolated_parallel_ablation_is_an_override():
  cfg = _load(os.path.join(ROOT, "experiments", "sft_4b.py"))
  cfg.lattice.layers = ()
  assert setup.model_configs(cfg)[1] is None


def _main(*args, workdir=None):
  cmd = [sys.executable, "-m", "lace_jax.main", *args]
  if workdir:
    cmd.append(f"--workdir={workdir}")
  return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_cli_typo_in_override_fails():
  r = _main("--config=experiments/overhead.py:runlocal", "--config.overhead.num_thread=2")
  assert r.returncode != 0 and "num_thread" in r.stderr


def test_cli_unknown_mode_names_the_available_ones():
  r = _main("--config=experiments/overhead.py:runlocal", "--config.mode=distill")
  assert r.returncode == 2
  assert "unknown mode 'distill'" in r.stderr and "'datagen'" in r.stderr


def test_cli_overhead_runlocal(tmp_path):
  r = _main("--config=experiments/overhead.py:runlocal", "--config.overhead.num_threads=2",
            workdir=tmp_path)
  assert r.returncode == 0, r.stderr
  result = json.loads((tmp_path / "overhead.json").read_text())
  row = result["overhead"][0]
  assert row["preset"] == "tiny" and row["num_threads"] == 2 and row["lattice_params"] > 0
  assert row["lattice_flops"] > row["base_flops"]


def test_every_lattice_field_is_a_config_key():
  """One schema: the lattice section is derived from LatticeConfig, so each field overrides."""
  import dataclasses

  import lace_jax as lj
  cfg = _load(os.path.join(ROOT, "experiments", "sft_4b.py"))
  assert set(cfg.lattice.keys()) == {f.name for f in dataclasses.fields(lj.LatticeConfig)} | {
      "enabled"}
  cfg.lattice.init_std = 0.05
  cfg.lattice.implementation = "xla_chunked"
  lat = setup.model_configs(cfg)[1]
  assert lat.init_std == 0.05 and lat.implementation == "xla_chunked"
  assert lat == lj.LatticeConfig.default(lj.ModelConfig.preset("qwen3-4b"), init_std=0.05,
                                         implementation="xla_chunked")


@pytest.mark.parametrize("name", ["sft_1p7b", "sft_4b", "grpo_1p7b"])
def test_single_gpu_variants_name_the_rtx6000pro(name):
  """`:rtx6000pro` is the recipe's one-GPU form: same batch, more micro-batches."""
  path = os.path.join(ROOT, "experiments", f"{name}.py")
  base, one = _load(path), _load(path + ":rtx6000pro")
  assert one.plan.targets == ("cuda:rtx6000pro",)
  assert one.train.grad_accum == 8 > base.train.grad_accum
  assert one.model.preset == base.model.preset
  if name.startswith("sft"):
    assert one.train.batch_size == base.train.batch_size
  else:
    assert one.grpo.questions_per_step == base.grpo.questions_per_step
    assert one.grpo.rollouts_per_question == base.grpo.rollouts_per_question
    assert (one.grpo.rollout_batch, base.grpo.rollout_batch) == (16, 0)
