"""Training as users run it: `python -m lace_jax.main` in subprocesses. Interrupt + resume is
exact, NaN stops with the last good checkpoint kept, two processes (gloo) match one."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import lace_jax as lj
from lace_jax import modes
from lace_jax.training.metrics import read_metrics
from tests.test_experiments import ROOT, _load

SFT = "--config=experiments/sft_1p7b.py:runlocal"


def _env(devices: int = 1) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = ""  # not the 8 fake devices of the in-process tests
  env["JAX_NUM_CPU_DEVICES"] = str(devices)
  return env


def _cmd(*args, workdir):
  return [sys.executable, "-m", "lace_jax.main", *args, f"--workdir={workdir}"]


def _losses(workdir):
  return {m["step"]: m["loss"] for m in read_metrics(str(workdir))}


def test_interrupt_and_resume_reproduces_the_uninterrupted_run(tmp_path):
  args = (SFT, "--config.train.steps=40", "--config.train.save_every=1000")
  full = subprocess.run(_cmd(*args, workdir=tmp_path / "full"), env=_env(), cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert full.returncode == 0, full.stderr[-3000:]

  part = tmp_path / "part"
  proc = subprocess.Popen(_cmd(*args, workdir=part), env=_env(), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline:
    if (part / "metrics.jsonl").exists() and len(_losses(part)) >= 4:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 143, err[-3000:]
  saved = sorted(int(s) for s in os.listdir(part / "checkpoints") if s.isdigit())
  assert len(saved) == 1 and 4 <= saved[0] < 40, saved
  assert "Run the same command to resume" in out

  resumed = subprocess.run(_cmd(*args, workdir=part), env=_env(), cwd=ROOT, capture_output=True,
                           text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed from step {saved[0]}" in resumed.stdout
  assert _losses(part) == _losses(tmp_path / "full")  # every step, bit for bit


def _sft_config(**train):
  cfg = _load(os.path.join(ROOT, "experiments", "sft_1p7b.py:runlocal"))
  cfg.train.update(batch_size=8, **train)  # 8 fake devices in-process: fsdp = 8
  return cfg


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  cfg = _sft_config(steps=4, save_every=2)
  summary = modes.get_mode("sft")(cfg, str(tmp_path))
  assert np.isfinite(summary["final_loss"])
  cfg.train.steps = 10
  cfg.optim.lr = 1e30  # diverges on the next update
  with pytest.raises(FloatingPointError) as err:
    modes.get_mode("sft")(cfg, str(tmp_path))
  msg = str(err.value)
  m = re.match(r"(loss is (?:nan|inf) at step|the weights are not finite after the update of "
               r"step|the weights' norm overflows after the update of step) (\d+).*: stopping "
               r"before they are saved. The last good checkpoint is step (\d+) in (\S+);", msg)
  assert m, msg
  bad, good = int(m.group(2)), int(m.group(3))
  entries = os.listdir(tmp_path / "checkpoints")
  assert all(e.isdigit() for e in entries), entries  # no half-written checkpoint left behind
  saved = sorted(int(e) for e in entries)
  assert 4 <= good < bad and saved[-1] == good  # nothing saved at or after the bad step
  assert all(np.isfinite(v) for s, v in _losses(tmp_path).items() if s <= good)


def test_export_is_a_loadable_checkpoint_of_the_trained_model(tmp_path):
  cfg = _sft_config(steps=2, save_every=2)
  summary = modes.get_mode("sft")(cfg, str(tmp_path))
  model, params = lj.load_pretrained(summary["export"])
  assert model.lattice == lj.LatticeConfig.default(lj.ModelConfig.preset("tiny"))
  tok = lj.Tokenizer.from_dir(summary["export"])
  assert tok.vocab_size <= model.config.vocab_size
  fresh = model.init(seed=0)
  assert not np.array_equal(params["embed"], fresh["embed"])  # trained
  events = os.listdir(tmp_path / "tensorboard")
  assert any(e.startswith("events.out.tfevents") for e in events), events
  assert sorted(_losses(tmp_path)) == [1, 2] and (tmp_path / "config.yaml").exists()


def test_resume_with_a_changed_model_config_names_the_field_in_one_message(tmp_path):
  cfg = _sft_config(steps=2, save_every=2)
  modes.get_mode("sft")(cfg, str(tmp_path))  # in-process (8 fake devices): quick
  r = subprocess.run(_cmd(SFT, "--config.train.steps=4", "--config.lattice.width=64",
                          workdir=tmp_path), env=_env(), cwd=ROOT, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 1, r.stderr[-3000:]
  errors = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1, r.stderr[-3000:]
  msg = errors[0]
  # orbax names whichever mismatched array it reads first (not always the same one)
  assert msg.startswith(f"error: cannot restore checkpoint step 2 from {tmp_path}/checkpoints/2: "
                        "ValueError: Requested shape: ("), msg
  assert re.search(r"is not compatible with the stored shape: \(", msg), msg
  assert "params/layers_2/lattice/down (4, 32, 16) vs (4, 32, 64)" in msg, msg
  assert "params/layers_2/lattice/" in msg and "Truncating/padding" not in msg
  assert (f"differs from the run's saved config {tmp_path}/config.yaml in lattice.width: 16 "
          "(saved) vs 64 (now). Resume with") in msg
  # the first cause alone: no orbax tracebacks, no coroutines finalised at exit
  for noise in ("orbax", "Event loop is closed", "Exception ignored", "shutting down"):
    assert noise not in r.stderr, r.stderr[-3000:]


def test_a_full_disk_is_one_clear_error_naming_the_checkpoint(tmp_path, monkeypatch, caplog):
  import asyncio
  import errno

  from orbax.checkpoint._src.serialization import serialization

  from lace_jax.errors import RunError
  from lace_jax.training import checkpointer

  async def full(*args, **kwargs):  # every array write of a save finds the disk full
    await asyncio.sleep(0)
    raise OSError(errno.ENOSPC, "No space left on device", "/disk/ckpt/array")

  monkeypatch.setattr(serialization, "async_serialize_from_host", full)
  cfg = _sft_config(steps=3, save_every=1)
  with pytest.raises(checkpointer.StateCheckpointError) as err:
    modes.get_mode("sft")(cfg, str(tmp_path))
  assert isinstance(err.value, RunError) and err.value.__cause__ is None
  assert str(err.value).startswith(
      f"cannot save checkpoint step 1 to {tmp_path}/checkpoints/1: no space left on device "
      "(writing /disk/ckpt/array); free space on the disk of"), str(err.value)
  assert "start again (no complete checkpoint yet)" in str(err.value)
  orbax_errors = [r for r in caplog.records if r.levelname == "ERROR" and "orbax" in r.pathname]
  assert not orbax_errors, [r.getMessage() for r in orbax_errors]  # held back: one message
  assert not [e for e in os.listdir(tmp_path / "checkpoints") if e.isdigit()]


def _first_fails_others_wait(error: Exception, cancelled: list):
  """A stand-in for orbax's per-array read or write: the first call fails, the others wait
  until cancelled (and say so in `cancelled`)."""
  import asyncio
  import itertools
  calls = itertools.count()

  async def array_io(*args, **kwargs):
    i = next(calls)
    await asyncio.sleep(0)  # the others start meanwhile
    if i == 0:
      raise error
    try:
      await asyncio.sleep(60)
    except asyncio.CancelledError:
      cancelled.append(i)
      raise
  return array_io


def _hooks():
  import threading
  return sys.excepthook, threading.excepthook, sys.unraisablehook


def _small_state(n=6):
  import jax.numpy as jnp
  return {f"w{i}": jnp.full((8, 4), float(i)) for i in range(n)}


def test_a_failed_restore_leaves_nothing_running_and_no_hooks(tmp_path, monkeypatch):
  import jax
  from orbax.checkpoint._src.serialization import serialization

  from lace_jax.training.checkpointer import Checkpointer, StateCheckpointError

  state = _small_state()
  ckpt = Checkpointer(str(tmp_path), keep=2)
  ckpt.save(1, state, None)
  ckpt.close()
  abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
              for k, v in state.items()}
  cancelled = []
  monkeypatch.setattr(serialization, "async_deserialize",
                      _first_fails_others_wait(ValueError("unreadable array"), cancelled))
  hooks = _hooks()
  ckpt = Checkpointer(str(tmp_path), keep=2)
  with pytest.raises(StateCheckpointError) as err:
    ckpt.restore(1, abstract, None)
  ckpt.close()
  assert str(err.value) == (f"cannot restore checkpoint step 1 from {tmp_path}/1: "
                            "ValueError: unreadable array"), str(err.value)
  # the other reads were cancelled and awaited before the restore raised, not left running
  assert sorted(cancelled) == list(range(1, len(state))), cancelled
  assert all(a is b for a, b in zip(_hooks(), hooks))  # no process-wide hook installed


def test_a_failed_save_leaves_nothing_running_and_no_hooks(tmp_path, monkeypatch):
  import errno

  from orbax.checkpoint._src.serialization import serialization

  from lace_jax.training.checkpointer import Checkpointer, StateCheckpointError

  state = _small_state()
  cancelled = []
  monkeypatch.setattr(serialization, "async_serialize_from_host", _first_fails_others_wait(
      OSError(errno.ENOSPC, "No space left on device", "/disk/ckpt/array"), cancelled))
  hooks = _hooks()
  ckpt = Checkpointer(str(tmp_path), keep=2)
  with pytest.raises(StateCheckpointError, match="no space left on device"):
    ckpt.save(1, state, None)
    ckpt.wait()  # the background commit's failure
  ckpt.close()
  assert sorted(cancelled) == list(range(1, len(state))), cancelled
  assert all(a is b for a, b in zip(_hooks(), hooks))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def one_and_two(tmp_path, *args, timeout: int = 600):
  """The command as 1 process x 4 devices (workdir one/) and as 2 processes x 2 devices
  (workdir two/, gloo, as on two hosts); asserts every run exits 0; returns [(stdout, stderr)]
  of the two processes."""
  single = subprocess.run(_cmd(*args, workdir=tmp_path / "one"), env=_env(4), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
  assert single.returncode == 0, single.stderr[-3000:]
  port = _free_port()
  procs = [subprocess.Popen(
      _cmd(*args, f"--config.distributed.coordinator_address=127.0.0.1:{port}",
           "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
           "--config.distributed.cpu_collectives=gloo", workdir=tmp_path / "two"),
      env=_env(2), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=timeout) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return outs


def test_two_processes_match_one(tmp_path):
  outs = one_and_two(tmp_path, SFT, "--config.train.steps=3", "--config.train.save_every=3")
  assert "mesh data=1 x fsdp=4 x tensor=1" in outs[0][0]  # 2 processes x 2 devices
  one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
  assert sorted(one) == sorted(two) == [1, 2, 3]
  np.testing.assert_allclose([two[s] for s in (1, 2, 3)], [one[s] for s in (1, 2, 3)], atol=1e-5)
  assert json.load(open(tmp_path / "two" / "export" / "config.json"))["lace_lattice"]


# ----- issue 16 item 9: the run's counts are checked before any work; resuming a finished run

@pytest.mark.parametrize("key,value", [("train.steps", 0), ("train.steps", -5),
                                       ("train.save_every", 0), ("train.log_every", 0),
                                       ("train.grad_accum", 0), ("train.keep_checkpoints", 0),
                                       ("train.batch_size", 0), ("data.max_len", -1)])
def test_bad_counts_are_refused_before_any_work(tmp_path, key, value):
  cfg = _sft_config()
  section, name = key.split(".")
  cfg[section][name] = value
  with pytest.raises(ValueError, match=rf"^{re.escape(key)}={value}; expected an int >= 1"):
    modes.get_mode("sft")(cfg, str(tmp_path))
  assert os.listdir(tmp_path) == []  # no checkpoint, log or export: nothing ran


def test_resuming_a_finished_run_trains_nothing_and_says_so(tmp_path, capsys):
  cfg = _sft_config(steps=2, save_every=2)
  modes.get_mode("sft")(cfg, str(tmp_path))
  capsys.readouterr()
  again = modes.get_mode("sft")(cfg, str(tmp_path))  # the same command again: exit 0
  out = capsys.readouterr().out
  assert "already done: step 2 >= train.steps=2" in out and "done: 2 steps" not in out, out
  assert again["trained_steps"] == 0 and again["final_loss"] is None
  assert os.path.isfile(os.path.join(again["export"], "model.safetensors"))
  assert sorted(_losses(tmp_path)) == [1, 2]  # nothing trained or logged again
  # a config asking for fewer steps than the workdir's run trained: refused, exit code 2
  args = (SFT, "--config.train.steps=1", "--config.train.batch_size=8")
  fewer = subprocess.run(_cmd(*args, workdir=tmp_path), env=_env(8), cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
  assert fewer.returncode == 2 and "Traceback" not in fewer.stderr, fewer.stderr[-3000:]
  assert "holds step 2, past train.steps=1" in fewer.stderr, fewer.stderr[-3000:]
  assert "done:" not in fewer.stdout


@pytest.mark.parametrize("key", ["grpo.inner_updates", "grpo.questions_per_step",
                                 "train.save_every"])
def test_grpo_counts_are_refused_before_any_work(tmp_path, key):
  cfg = _load(os.path.join(ROOT, "experiments", "grpo_1p7b.py:runlocal"))
  section, name = key.split(".")
  cfg[section][name] = 0
  with pytest.raises(ValueError, match=rf"^{re.escape(key)}=0; expected an int >= 1"):
    modes.get_mode("grpo")(cfg, str(tmp_path))
  assert os.listdir(tmp_path) == []
