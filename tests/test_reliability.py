"""Nothing lost, nothing poisoned (issue 28): non-finite weights are never saved or exported,
bad optimizer numbers and config keys are one `error:` line (exit 2) before any work."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from lace_jax import modes, sweep, workdir
from lace_jax.errors import ConfigError, NonFiniteError
from lace_jax.training import checkpointer, lm, loop
from lace_jax.training.metrics import read_metrics
from lace_jax.workdir import WorkdirBusy
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

def _nan_gradient_loss(make_loss):
  """The LM loss plus 0 * sqrt(0 * embed): the same finite value, a NaN gradient."""
  def make(*args, **kw):
    inner = make_loss(*args, **kw)

    def loss(model, params, batch):
      total, count, aux = inner(model, params, batch)
      return total + 0.0 * jnp.sqrt(0.0 * jnp.sum(params["embed"])), count, aux
    return loss
  return make


@pytest.mark.parametrize("case,expected", [
    ("nan_gradient", r"the weights are not finite after the update of step 1 \(loss [0-9.]+, "),
    ("lr_1e30", r"the weights' norm overflows after the update of step 1 \(param_norm inf: the "
                r"run diverged; loss [0-9.]+, ")])
def test_an_update_to_non_finite_weights_is_never_saved_or_exported(tmp_path, monkeypatch, case,
                                                                      expected):
  """The step's loss (of the weights before its update) is finite, its update is not: a NaN
  gradient, or lr = 1e30 (finite, so it passes the start checks) whose weights' norm overflows.
  On main before issue 28 such a run exited 0 and exported the weights."""
  cfg = _sft_config(steps=1, save_every=1)
  if case == "nan_gradient":
    monkeypatch.setattr(lm, "make_loss", _nan_gradient_loss(lm.make_loss))
  else:
    cfg.optim.lr = 1e30
  with pytest.raises(NonFiniteError) as err:
    modes.get_mode("sft")(cfg, str(tmp_path))
  assert re.match(expected + r".*\): stopping before they are saved\. No checkpoint was saved "
                  r"yet in \S+; lower optim\.lr", str(err.value)), str(err.value)
  assert os.listdir(tmp_path / "checkpoints") == []
  assert not os.path.exists(tmp_path / "export")


def test_export_refuses_non_finite_parameters(tmp_path):
  params = {"embed": jnp.ones((4, 2)), "layers": {"w": jnp.array([[1.0, np.nan]])}}
  with pytest.raises(NonFiniteError, match=r"not exporting to \S+: 1 parameters are not finite "
                                           r"\(layers/w\)"):
    loop.export(None, params, None, str(tmp_path))
  assert not os.path.exists(tmp_path / "export")


# ----- one run per workdir ------------------------------------------------------------------------

def test_a_second_lock_on_a_workdir_is_refused_naming_the_holder(tmp_path):
  with workdir.lock(str(tmp_path)) as path:
    holder = json.load(open(path))
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(WorkdirBusy, match=rf"in use by another run \(host "
                                          rf"{re.escape(socket.gethostname())}, PID {os.getpid()}, "
                                          r"started .*\): one run per workdir"):
      workdir.acquire(str(tmp_path), log=lambda m: None)
  assert not os.path.exists(path)  # released on exit
  workdir.release(workdir.acquire(str(tmp_path)))  # and free again


def _dead_pid() -> int:
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


@pytest.mark.parametrize("stale", ["dead_pid", "reused_pid", "unreadable"])
def test_a_stale_lock_is_taken_over_with_a_message(tmp_path, stale):
  path = workdir.lock_path(str(tmp_path))
  record = {"host": socket.gethostname(), "pid": _dead_pid(), "started": "earlier",
            "command": "python -m lace_jax.main (killed)"}
  if stale == "reused_pid":  # a live PID that is now another process
    record.update(pid=os.getpid(), pid_start="1")
  with open(path, "w") as f:
    f.write("{half a reco" if stale == "unreadable" else json.dumps(record))
  said = []
  with workdir.lock(str(tmp_path), log=said.append):
    assert json.load(open(path))["pid"] == os.getpid()
  assert len(said) == 1 and said[0].startswith("taking over the lock of a run that ended "
                                               "without releasing it"), said


def test_a_lock_of_another_host_is_refused_with_the_file_to_delete(tmp_path):
  path = workdir.lock_path(str(tmp_path), process_index=3)
  assert path.endswith(".lock.3")
  with open(path, "w") as f:
    json.dump({"host": "another-host", "pid": 1, "started": "x", "command": "y"}, f)
  with pytest.raises(WorkdirBusy, match=rf"host another-host, PID 1.*delete {re.escape(path)}"):
    workdir.acquire(str(tmp_path), process_index=3)


def test_two_runs_in_one_workdir_the_second_is_refused_at_once(tmp_path):
  """The same SFT command twice at once: on main before issue 28 both exited 0 and wrote one
  metrics.jsonl (57 lines for 30 steps)."""
  args = (SFT, "--config.train.steps=12", "--config.train.save_every=6")
  first = subprocess.Popen([sys.executable, "-m", "lace_jax.main", *args,
                            f"--workdir={tmp_path}"], env=_env(), cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  lock = workdir.lock_path(str(tmp_path))
  deadline = time.time() + 120
  while not os.path.exists(lock) and first.poll() is None and time.time() < deadline:
    time.sleep(0.1)
  assert os.path.exists(lock), first.communicate()[1][-3000:]
  t0 = time.time()
  second = _cli(*args, workdir=tmp_path)
  took = time.time() - t0
  out, err = first.communicate(timeout=600)
  assert first.returncode == 0, err[-3000:]
  assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
  errors = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and f"PID {first.pid}" in errors[0], second.stderr[-3000:]
  # refused before jax starts a backend: the process's own start-up is all it costs
  assert took < 30, took
  assert [m["step"] for m in read_metrics(str(tmp_path))] == list(range(1, 13))
  assert not os.path.exists(lock)


# ----- sweeps: no point outlives its runner, none is started twice -------------------------------

SWEEP = '''
import importlib.util, os
from lace_jax import sweep

_spec = importlib.util.spec_from_file_location("sft", os.path.join({root!r}, "experiments",
                                                                    "sft_1p7b.py"))
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)


def get_config(arg=None):
  cfg = _mod.get_config("runlocal")
  cfg.train.steps = 2000  # far longer than the test waits
  return cfg


def sweep_seeds():
  return sweep.values("seed", [0, 1])
'''


def _sweep_runner(tmp_path, *extra):
  path = tmp_path / "sweep_sft.py"
  path.write_text(SWEEP.replace("{root!r}", repr(ROOT)))
  env = dict(_env(), PYTHONPATH=ROOT)
  return subprocess.Popen([sys.executable, "-m", "lace_jax.main", f"--config={path}",
                           f"--workdir={tmp_path / 'sw'}", "--sweep=seeds", *extra],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True), path


def _gone(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  # a zombie (exited, not yet reaped by init) is gone too
  with open(f"/proc/{pid}/stat") as f:
    return f.read().rsplit(")", 1)[1].split()[0] == "Z"


def test_a_killed_sweep_runner_leaves_no_point_running(tmp_path):
  """On main before issue 28 the point kept training as an orphan after its runner's SIGKILL."""
  runner, _ = _sweep_runner(tmp_path)
  deadline = time.time() + 180
  holder = None
  while time.time() < deadline and runner.poll() is None:
    locks = [p for p in (tmp_path / "sw").glob("*/.lock")] if (tmp_path / "sw").exists() else []
    holder = workdir.read_holder(str(locks[0])) if locks else None
    if holder:
      break
    time.sleep(0.2)
  assert holder and holder["pid"] != runner.pid, runner.communicate()[0][-3000:]
  runner.kill()
  runner.wait()
  deadline = time.time() + 120
  while time.time() < deadline and not _gone(holder["pid"]):
    time.sleep(0.5)
  assert _gone(holder["pid"]), f"point process {holder['pid']} outlived its runner"


def test_a_sweep_rerun_never_starts_a_point_that_is_running(tmp_path):
  wd = tmp_path / "sw"
  path = tmp_path / "sweep_sft.py"
  path.write_text(SWEEP.replace("{root!r}", repr(ROOT)))
  points = sweep.points_of(str(path), ["seeds"], str(wd))
  busy = points[0]
  os.makedirs(busy.workdir)
  with workdir.lock(busy.workdir):  # this process stands for a point left running
    # the other point fails at once (a config error): only the busy one could run long
    r = subprocess.run([sys.executable, "-m", "lace_jax.main", f"--config={path}",
                        f"--workdir={wd}", "--sweep=seeds", "--config.train.steps=0"],
                       cwd=ROOT, env=dict(_env(), PYTHONPATH=ROOT), capture_output=True,
                       text=True, timeout=300)
  assert f"[{busy.index}] is running already (host {socket.gethostname()}, PID {os.getpid()}" \
      in r.stdout, r.stdout[-3000:]
  assert busy.state["status"] == "pending"  # never started: no state, no log
  assert not os.path.exists(os.path.join(busy.workdir, sweep.LOG))
  assert points[1].state["status"] == "failed"


# ----- damaged checkpoints: detected, reported in one message, the newest intact step used -------

def _largest_file(step_dir):
  files = [os.path.join(r, n) for r, _, ns in os.walk(step_dir / "state") for n in ns]
  return max(files, key=os.path.getsize)


def _flip(path):
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.seek(size // 2 - min(2048, size // 2))
    block = f.read(4096)
    f.seek(-len(block), 1)
    f.write(bytes(b ^ 0xFF for b in block))


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """An SFT run of 12 steps saving every 3 (steps 6, 9, 12 kept), sealed on close."""
  wd = tmp_path_factory.mktemp("ckpt")
  modes.get_mode("sft")(_sft_config(steps=12, save_every=3), str(wd))
  return wd


@pytest.mark.parametrize("damage", ["flipped", "truncated", "metadata_deleted", "unsealed"])
def test_a_damaged_checkpoint_is_detected_and_the_previous_intact_step_resumed(
    finished_run, tmp_path, capsys, damage):
  """On main before issue 28: flipped bytes restored silently (NaN weights two steps later);
  a truncated file or a deleted _METADATA stopped the run blaming the model config."""
  wd = tmp_path / "run"
  shutil.copytree(finished_run, wd)
  last = wd / "checkpoints" / "12"
  manifest = json.load(open(last / checkpointer.MANIFEST))["files"]
  assert manifest and all(len(v["sha256"]) == 64 for v in manifest.values())
  target = _largest_file(last)
  rel = os.path.relpath(target, last)
  if damage == "flipped":
    _flip(target)
  elif damage == "truncated":
    _truncate(target)
  else:
    rel = "state/_METADATA"
    os.remove(last / rel)
    if damage == "unsealed":  # as if killed before sealing it: only the restore can tell
      os.remove(last / checkpointer.MANIFEST)
  expected = {"flipped": f"{rel} does not match its SHA-256 (corrupted bytes)",
              "truncated": f"{rel} has {os.path.getsize(target)} bytes, "
                           f"{manifest[rel]['size']} were saved",
              "metadata_deleted": f"{rel} is missing",
              "unsealed": "cannot restore checkpoint step 12"}[damage]
  capsys.readouterr()
  summary = modes.get_mode("sft")(_sft_config(steps=12, save_every=3), str(wd))  # the same run
  out = capsys.readouterr().out
  said = [line for line in out.splitlines() if "is damaged" in line]
  assert len(said) == 1 and said[0].startswith(f"checkpoint step 12 in {wd / 'checkpoints'} is "
                                               "damaged: ") and expected in said[0], out
  assert "trying step 9, the newest older one" in said[0]
  assert "resumed from step 9" in out, out
  assert summary["start_step"] == 9 and np.isfinite(summary["final_loss"])
  moved = os.listdir(wd / "corrupt_checkpoints")
  assert len(moved) == 1 and moved[0].startswith("12-")
  # the steps redone from the intact step 9 are the original run's, bit for bit
  first = {m["step"]: m["loss"] for m in read_metrics(str(finished_run))}
  again = {m["step"]: m["loss"] for m in read_metrics(str(wd))}
  assert sorted(again) == list(range(1, 13)) and again == first
  assert sorted(int(s) for s in os.listdir(wd / "checkpoints") if s.isdigit())[-1] == 12


def test_a_checkpoint_whose_files_all_fail_is_one_error_listing_each_step(finished_run, tmp_path):
  wd = tmp_path / "run"
  shutil.copytree(finished_run, wd)
  for step in (6, 9, 12):
    _flip(_largest_file(wd / "checkpoints" / str(step)))
  with pytest.raises(checkpointer.StateCheckpointError,
                     match=r"^no intact checkpoint in \S+: step 12: .*; step 9: .*; step 6: "
                           r".*corrupt_checkpoints; rerun to start from step 0"):
    modes.get_mode("sft")(_sft_config(steps=12, save_every=3), str(wd))
