"""Nothing lost, nothing poisoned (issue 28): non-finite weights are never saved or exported,
bad optimizer numbers and config keys are one `error:` line (exit 2) before any work."""

import os
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from lace_jax import modes
from lace_jax.errors import ConfigError, NonFiniteError
from lace_jax.training import loop
from tests.test_experiments import ROOT, _load

SFT = "--config=experiments/sft_1p7b.py:runlocal"


def _env() -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = ""
  env["JAX_NUM_CPU_DEVICES"] = "1"
  return env


def _cli(*args, workdir):
  return subprocess.run([sys.executable, "-m", "lace_jax.main", *args, f"--workdir={workdir}"],
                        env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)


def _sft_config(**train):
  cfg = _load(os.path.join(ROOT, "experiments", "sft_1p7b.py:runlocal"))
  cfg.train.update(batch_size=8, **train)  # 8 fake devices in-process: fsdp = 8
  return cfg


# ----- config errors: one line, exit 2, naming the key ------------------------------------------

@pytest.mark.parametrize("override,expected", [
    ("--config.foo=1", r"--config\.foo=1: no config key 'foo' in \S+; known keys: .*\btrain\b"),
    ("--config.train.stepz=3", r"no config key 'train\.stepz' in \S+; closest: train\.steps\b"),
    ("--config.optimm.lr=1", r"no config key 'optimm' in \S+; closest: optim\b"),
    ("--config.train.steps=abc", r"flag --config\.train\.steps=abc: invalid literal for int"),
    ("--config.optim.lr=inf", r"optim\.lr=inf; expected a finite number > 0"),
    ("--config.optim.warmup_steps=-1", r"optim\.warmup_steps=-1; expected a finite int >= 0"),
    ("--config.train.steps=0", r"train\.steps=0; expected an int >= 1"),
])
def test_a_config_error_is_one_line_naming_the_key(tmp_path, override, expected):
  r = _cli(SFT, override, workdir=tmp_path / "w")
  assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
  lines = [line for line in r.stderr.splitlines() if line.strip()]
  assert "Traceback" not in r.stderr, r.stderr[-2000:]
  errors = [line for line in lines if line.startswith("error: ")]
  assert len(errors) == 1 and re.search(expected, errors[0]), lines
  assert not os.path.exists(tmp_path / "w" / "checkpoints")  # nothing ran


def test_a_missing_experiment_file_is_one_line(tmp_path):
  r = _cli("--config=experiments/no_such.py", workdir=tmp_path)
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert r.stderr.strip() == (f"error: --config=experiments/no_such.py: no such experiment "
                              f"file ({os.path.join(ROOT, 'experiments', 'no_such.py')})")


@pytest.mark.parametrize("key,value", [
    ("lr", float("inf")), ("lr", float("nan")), ("lr", -1e-3), ("lr", 0.0),
    ("warmup_steps", -1), ("weight_decay", -0.1), ("clip_norm", -1.0),
    ("min_lr_ratio", 1.5), ("b2", 1.0), ("eps", 0.0), ("lattice_lr_multiplier", 0.0)])
def test_bad_optimizer_numbers_are_refused_before_any_work(tmp_path, key, value):
  cfg = _sft_config()
  cfg.optim[key] = value
  with pytest.raises(ConfigError, match=rf"^optim\.{key}={re.escape(repr(value))}; expected a "
                                        "finite"):
    modes.get_mode("sft")(cfg, str(tmp_path))
  assert os.listdir(tmp_path) == []


# ----- non-finite weights are never saved or exported --------------------------------------------

def test_an_update_to_non_finite_weights_is_never_saved_or_exported(tmp_path):
  """lr = 1e30 is finite, so it passes the start checks; its first update sends the weights to
  inf while the step's loss (of the weights before it) is finite. On main before issue 28 this
  run exited 0 with every exported tensor NaN."""
  cfg = _sft_config(steps=1, save_every=1)
  cfg.optim.lr = 1e30
  with pytest.raises(NonFiniteError) as err:
    modes.get_mode("sft")(cfg, str(tmp_path))
  assert re.match(r"the weights are not finite after the update of step 1 \(param_norm "
                  r"(inf|nan); loss [0-9.]+, .*\): stopping before they are saved\. No checkpoint "
                  r"was saved yet in \S+; lower optim\.lr", str(err.value)), str(err.value)
  assert os.listdir(tmp_path / "checkpoints") == []
  assert not os.path.exists(tmp_path / "export")


def test_export_refuses_non_finite_parameters(tmp_path):
  params = {"embed": jnp.ones((4, 2)), "layers": {"w": jnp.array([[1.0, np.nan]])}}
  with pytest.raises(NonFiniteError, match=r"not exporting to \S+: 1 parameters are not finite "
                                           r"\(layers/w\)"):
    loop.export(None, params, None, str(tmp_path))
  assert not os.path.exists(tmp_path / "export")
