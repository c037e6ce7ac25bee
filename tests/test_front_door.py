"""The CLI as a newcomer meets it: --help, a real recipe without its inputs, a clean CPU start
with the accelerator plugins installed (issue 30)."""

import glob
import importlib.util
import os
import subprocess
import sys

import pytest

from lace_jax import modes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what the CUDA and TPU plugins print when they start on a machine without their device
PLUGIN_NOISE = ("Traceback", "cuInit", "CUDA", "libtpu", "TPU_", "accelerator type",
                "Unable to initialize backend")


def _cli(*args, env=None, timeout=600):
  return subprocess.run([sys.executable, "-m", "lace_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _env_without_platforms() -> dict:
  """The user's environment: no JAX_PLATFORMS (the suite's conftest sets it to cpu)."""
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  env["JAX_NUM_CPU_DEVICES"] = "1"
  return env


def test_help_lists_every_mode_and_experiment_file():
  out = _cli("--help")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  for mode in modes.MODES:
    assert any(line.split()[:1] == [mode] for line in lines), mode
  assert set(modes.SUMMARY) == set(modes.MODES)
  files = sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py")))
  assert files
  for path in files:
    rows = [line for line in lines if line.split()[:1] == [f"experiments/{os.path.basename(path)}"]]
    assert len(rows) == 1 and len(rows[0].split()) > 2, path  # its name and a description
  assert _cli("-h").stdout == out.stdout


@pytest.mark.parametrize("recipe,keys", [
    ("grpo_4b", ["--config.model.checkpoint=DIR"]),
    ("sft_1p7b", ["--config.model.checkpoint=DIR", "--config.data.path=FILE.jsonl"]),
    ("eval_4b", ["--config.model.checkpoint=DIR"]),
])
def test_a_real_recipe_without_its_inputs_is_one_error_line(recipe, keys, tmp_path):
  out = _cli(f"--config=experiments/{recipe}.py", f"--workdir={tmp_path}",
             env=_env_without_platforms())
  assert out.returncode == 2, out.stderr
  errors = out.stderr.strip().splitlines()
  assert len(errors) == 1 and errors[0].startswith("error: "), out.stderr
  for key in keys:
    assert key in errors[0]
  assert f"--config=experiments/{recipe}.py:runlocal" in errors[0]  # what runs without them
  assert not os.listdir(tmp_path)  # nothing started


def test_a_cpu_run_starts_clean_with_the_accelerator_plugins_installed(tmp_path):
  """The test extras install the CUDA plugin and libtpu; on a machine without either device
  a run of the main job must not print their start-up tracebacks."""
  assert importlib.util.find_spec("jax_plugins.xla_cuda12") is not None  # CI installs them
  assert importlib.util.find_spec("libtpu") is not None
  env = _env_without_platforms()
  # the control: JAX left to itself does print them here (else this test would prove nothing)
  bare = subprocess.run([sys.executable, "-c", "import jax; print(jax.devices())"], env=env,
                        capture_output=True, text=True, timeout=300)
  if not any(glob.glob(p) for p in ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")):
    assert any(n in bare.stderr for n in PLUGIN_NOISE), bare.stderr
  out = _cli("--config=experiments/toy_selection.py", f"--workdir={tmp_path}",
             "--config.selection.steps=4", "--config.selection.eval_every=2",
             "--config.selection.eval_problems=16", "--config.selection.batch_size=8", env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  noise = [line for line in out.stderr.splitlines() if any(n in line for n in PLUGIN_NOISE)]
  assert not noise, out.stderr[-3000:]
  assert "accuracy" in out.stdout


def test_datagen_without_its_server_is_one_error_line(tmp_path):
  """Not every problem failing after its retries (26 hours for GSM8K): one line naming the key."""
  import socket
  with socket.socket() as s:  # a port nothing listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  out = _cli("--config=experiments/datagen_gsm8k.py", f"--workdir={tmp_path}",
             f"--config.datagen.endpoint=http://127.0.0.1:{port}/v1", env=_env_without_platforms())
  assert out.returncode == 2, out.stderr[-2000:]
  errors = out.stderr.strip().splitlines()
  assert len(errors) == 1 and errors[0].startswith(
      f"error: datagen.endpoint=http://127.0.0.1:{port}/v1: nothing answers there"), out.stderr
  assert "--config.datagen.endpoint=URL" in errors[0]
