"""A lost process of a multi-process run is one error, not a hang (lace_jax.distributed's
watchdog): two processes (gloo) train, one is killed with SIGKILL, the survivor stops with one
`error:` line naming the lost process and the last checkpoint, and the same command rerun on
both resumes from that checkpoint."""

import os
import re
import subprocess
import time

import pytest

from lace_jax import distributed
from lace_jax.experiment import base_config
from tests.test_experiments import ROOT
from tests.test_train_cli import _cmd, _env, _free_port, _losses

CONFIG = "experiments/grpo_1p7b.py:runlocal"  # the run whose processes are killed: Lattice GRPO
STEPS = 40  # long enough to be mid-run when the first checkpoint is complete
TIMEOUT_S = 20  # distributed.heartbeat_timeout_s of these runs


def _launch(workdir, port: int, *more: str) -> list[subprocess.Popen]:
  """The same command on two processes x 2 CPU devices, as on two hosts."""
  args = (f"--config={CONFIG}", f"--config.train.steps={STEPS}", "--config.train.save_every=5",
          f"--config.distributed.heartbeat_timeout_s={TIMEOUT_S}",
          f"--config.distributed.coordinator_address=127.0.0.1:{port}",
          "--config.distributed.num_processes=2", "--config.distributed.cpu_collectives=gloo",
          *more)
  return [subprocess.Popen(_cmd(*args, f"--config.distributed.process_id={i}", workdir=workdir),
                           env=_env(2), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True) for i in range(2)]


def _saved(workdir) -> list[int]:
  """The complete checkpoints' steps (orbax renames a step's directory to its number last)."""
  directory = workdir / "checkpoints"
  return sorted(int(e) for e in os.listdir(directory) if e.isdigit()) if directory.is_dir() else []


def _wait(procs, ready, timeout_s: float = 400) -> None:
  deadline = time.monotonic() + timeout_s
  while not ready():
    for p in procs:
      if p.poll() is not None:
        pytest.fail(f"a process ended early ({p.returncode}): {p.communicate()[1][-3000:]}")
    assert time.monotonic() < deadline, "the run did not get there in time"
    time.sleep(0.1)


def _errors(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith("error: ")]


@pytest.mark.parametrize("value", [0, -5, 301, 300.5, 1000])
def test_a_heartbeat_timeout_out_of_range_is_refused(value):
  cfg = base_config("sft", "tiny").distributed
  cfg.heartbeat_timeout_s = value
  with pytest.raises(ValueError, match=rf"^distributed\.heartbeat_timeout_s={value}; expected a "
                     r"number of seconds > 0 and <= 300$"):
    distributed.maybe_initialize(cfg)


@pytest.mark.parametrize("value", [0.5, 300])
def test_a_heartbeat_timeout_in_range_is_accepted(value):
  cfg = base_config("sft", "tiny").distributed
  cfg.update(heartbeat_timeout_s=value, initialize="no")
  distributed.maybe_initialize(cfg)  # no coordinator: nothing starts


def test_the_cli_refuses_a_bad_heartbeat_timeout_in_one_line(tmp_path):
  r = subprocess.run(_cmd(f"--config={CONFIG}", "--config.distributed.heartbeat_timeout_s=301",
                          workdir=tmp_path), env=_env(), cwd=ROOT, capture_output=True, text=True,
                     timeout=300, check=False)
  assert r.returncode == 2, r.stderr[-3000:]
  assert _errors(r.stderr) == [("error: distributed.heartbeat_timeout_s=301; expected a number "
                                "of seconds > 0 and <= 300")], r.stderr[-3000:]
  assert "Traceback" not in r.stderr and os.listdir(tmp_path) == []


def test_an_error_on_every_process_is_each_ones_own_not_a_lost_peer(tmp_path):
  procs = _launch(tmp_path, _free_port(), "--config.train.steps=0")  # refused after start-up
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 2, err[-3000:]  # a config error: one line, exit code 2
    assert "error: train.steps=0; expected an int >= 1" in err, err[-3000:]
    assert "is lost" not in err, err[-3000:]


class _Store:
  """The distributed runtime's key-value store, in memory (the watchdog's only use of it)."""

  def __init__(self):
    self.values = {}

  def key_value_set(self, key, value, allow_overwrite=False):
    del allow_overwrite
    self.values[key] = value

  def key_value_dir_get(self, prefix):
    return [(k, v) for k, v in self.values.items() if k.startswith(prefix)]


@pytest.mark.parametrize("peer_alive", [False, True])
def test_a_peer_killed_right_after_a_beat_is_not_taken_for_alive(monkeypatch, peer_alive):
  # the CI race: the peer publishes a count and dies before this process's heartbeat thread
  # reads it; this process then fails in a collective on the peer's death. The count it had not
  # read yet must not pass for a sign of life (only a count published after the failure may).
  store, reports = _Store(), []
  watchdog = distributed._Watchdog.__new__(distributed._Watchdog)
  watchdog.client, watchdog.me, watchdog.count = store, 0, 2
  watchdog.timeout_s, watchdog.interval_s = 1.0, 0.2
  watchdog.lock, watchdog.publishing = distributed.threading.Lock(), distributed.threading.Lock()
  watchdog.state, watchdog.stop = None, distributed.threading.Event()
  watchdog.seen = {1: ("4", time.monotonic())}  # what the heartbeat thread last read
  store.values[distributed._KEY + "1"] = "5"  # the peer's last beat, not read yet
  monkeypatch.setattr(watchdog, "_report", lambda p, why: reports.append(p))

  def heartbeat_thread_reads():  # the store as the heartbeat thread sees it, a bit later
    time.sleep(0.3)
    if peer_alive:
      store.values[distributed._KEY + "1"] = "6"
    watchdog.seen[1] = (store.values[distributed._KEY + "1"], time.monotonic())

  reader = distributed.threading.Thread(target=heartbeat_thread_reads)
  reader.start()
  start = time.monotonic()
  watchdog.confirm()
  reader.join()
  waited = time.monotonic() - start
  assert store.values[distributed._KEY + "0"] == "failed"
  if peer_alive:  # a newer count: the failure is this process's own, known at once
    assert waited < 1.0, waited
  else:  # nothing newer: confirm waits for the watchdog's verdict until its deadline
    assert waited >= watchdog.timeout_s, waited


def test_a_killed_process_is_reported_lost_and_the_rerun_resumes(tmp_path):
  workdir = tmp_path / "run"
  procs = _launch(workdir, _free_port())
  _wait(procs, lambda: _saved(workdir))
  procs[1].kill()  # SIGKILL: no goodbye, as a lost host
  killed = time.monotonic()
  _, err = procs[0].communicate(timeout=TIMEOUT_S + 120)
  took = time.monotonic() - killed
  procs[1].communicate()
  assert procs[0].returncode == 1, err[-3000:]
  # the heartbeat last seen is at most two heartbeat intervals (timeout / 5 each) old; the
  # bounds leave room for a loaded CI machine (2 shared cores)
  assert TIMEOUT_S * 0.4 <= took <= TIMEOUT_S + 30, took
  saved = _saved(workdir)
  assert saved and saved[-1] < STEPS, saved
  errors = _errors(err)
  assert len(errors) == 1, err[-3000:]
  assert re.fullmatch(
      rf"error: process 1 of 2 is lost: no heartbeat for \d+ s \(distributed\.heartbeat_timeout_s="
      rf"{TIMEOUT_S}\)\. Last checkpoint: step {saved[-1]} in "
      rf"{re.escape(str(workdir / 'checkpoints'))}\. Rerun the same command on every host to "
      r"resume\.", errors[0]), errors[0]
  for noise in ("Check failed", "Check failure", "Traceback", "Terminating process"):
    assert noise not in err, err[-3000:]

  procs = _launch(workdir, _free_port())  # the same command again, on every host
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (o, e) in zip(procs, outs):
    assert p.returncode == 0, e[-3000:]
    assert not _errors(e), e[-3000:]
  assert f"resumed from step {saved[-1]}" in outs[0][0], outs[0][0][-3000:]
  assert max(_losses(workdir)) == STEPS


def test_a_killed_coordinator_ends_the_other_process_at_once(tmp_path):
  """Process 0 hosts JAX's coordination service: when it dies, the runtime's error poll on
  the other process fails as its connection closes and JAX aborts that process at once, in
  C++ (jaxlib 0.10 takes no working Python callback for it). Not a hang; the watchdog's line
  would name process 0 where the runtime leaves it the time to report."""
  workdir = tmp_path / "run"
  procs = _launch(workdir, _free_port())
  _wait(procs, lambda: (workdir / "metrics.jsonl").exists())  # training: in collectives
  procs[0].kill()
  killed = time.monotonic()
  _, err = procs[1].communicate(timeout=TIMEOUT_S + 120)
  took = time.monotonic() - killed
  procs[0].communicate()
  assert procs[1].returncode != 0 and took <= TIMEOUT_S + 15, (procs[1].returncode, took)
  errors = _errors(err)
  if procs[1].returncode == -6:  # SIGABRT: JAX's own report
    assert "another task died" in err and not errors, err[-3000:]
  else:
    assert len(errors) == 1 and errors[0].startswith("error: process 0 of 2 is lost: "), \
        err[-3000:]
