"""The toy-scale comparison: the relay mechanism check (issue 7) and the toy pipeline's pieces."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from lace_jax import toydata
from tests.test_train_cli import _env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_relay_check_lattice_learns_what_isolated_threads_cannot(tmp_path):
  """Each thread holds a private digit; every thread must answer the sum. Trained from scratch
  through the real SFT + sampler + grader path: the lattice model reaches >= 90% (greedy, per
  thread) while lattice=None stays within chance (10%) + 10 points."""
  out = subprocess.run(
      [sys.executable, "-m", "lace_jax.main", "--config=experiments/toy_relay.py",
       f"--workdir={tmp_path}"], cwd=ROOT, env=_env(), capture_output=True, text=True,
      timeout=1200)
  assert out.returncode == 0, out.stderr[-4000:]
  result = json.load(open(tmp_path / "results.json"))
  acc = result["check"]["accuracy"]
  assert acc["lace"] >= 0.9, acc
  assert acc["isolated"] <= 0.2, acc
  assert result["check"]["passed"]
  assert "relay check PASSED" in out.stdout
  # the rerun skips every finished stage and reproduces the table
  again = subprocess.run(
      [sys.executable, "-m", "lace_jax.main", "--config=experiments/toy_relay.py",
       f"--workdir={tmp_path}"], cwd=ROOT, env=_env(), capture_output=True, text=True,
      timeout=600)
  assert again.returncode == 0, again.stderr[-4000:]
  assert json.load(open(tmp_path / "results.json"))["table"] == result["table"]
