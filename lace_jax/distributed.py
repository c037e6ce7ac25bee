"""Multi-process start-up, and the watchdog that turns a lost process into an error. The same
command runs on every host; this module decides whether and how to call
`jax.distributed.initialize` before any other JAX work.

config `distributed`:
  initialize         "auto" | "yes" | "no". auto: initialise when a coordinator is configured
                     (here or in JAX_COORDINATOR_ADDRESS) or on a multi-host Cloud TPU slice.
  coordinator_address, num_processes, process_id   explicit settings ("" / -1: auto-detect)
  cpu_collectives    e.g. "gloo" for multi-process CPU runs
  heartbeat_timeout_s  seconds without a heartbeat after which a process is reported lost

A multi-process run whose process dies (a host lost, `kill -9`) would otherwise hang: the others
block in their next collective (gloo's may also fail at once, "Connection reset by peer") until
JAX's runtime aborts them with a C++ check-failure dump. Here a daemon thread on every process
publishes a heartbeat through the distributed runtime's key-value store every few seconds and
watches the others'; when one has published nothing new for `heartbeat_timeout_s` it prints one
`error:` line naming the lost process and the last checkpoint, and ends this process with exit
code 1, whatever its main thread is blocked in. JAX's own heartbeat timeout is set longer, so
this message comes first. A process that finishes (`finished`) marks itself done: the others
never report it lost. A process whose run raised (`report_lost_peer`) marks itself failed and
waits until its peers prove alive (the error is its own, reported as usual) or one is lost (that
is the error reported).

Not covered: the coordinator (process 0) itself dying. The runtime's error poll on every other
process fails as soon as its connection closes and aborts that process at once in C++ (JAX's
client takes no working Python callback for it in jaxlib 0.10), before any Python code can run.
A coordinator that stops answering without closing its connections is reported as lost.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from typing import Any

import jax
import ml_collections
from jax._src.distributed import global_state  # the runtime's client: no public handle

from lace_jax.errors import ConfigError

log = logging.getLogger(__name__)

MAX_HEARTBEAT_TIMEOUT_S = 300
_KEY = "lace_jax/heartbeat/"  # + process index: a count, "done" or "failed"
_DONE, _FAILED = "done", "failed"


def _multihost_tpu() -> bool:
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h]) > 1


def heartbeat_timeout(cfg: ml_collections.ConfigDict) -> float:
  """`distributed.heartbeat_timeout_s`, checked: a number of seconds in (0, 300] (a lost process
  is reported within minutes, well before JAX's own timeout of twice that and more)."""
  value = cfg.get("heartbeat_timeout_s", 120.0)
  number = isinstance(value, (int, float)) and not isinstance(value, bool)
  if not number or not 0 < value <= MAX_HEARTBEAT_TIMEOUT_S:
    shown = f"{value:g}" if number else repr(value)
    raise ConfigError(f"distributed.heartbeat_timeout_s={shown}; expected a number of seconds > 0 "
                     f"and <= {MAX_HEARTBEAT_TIMEOUT_S}")
  return float(value)


def maybe_initialize(cfg: ml_collections.ConfigDict | None) -> None:
  if cfg is None:
    return
  timeout_s = heartbeat_timeout(cfg)
  if cfg.cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
  mode = cfg.initialize
  if mode not in ("auto", "yes", "no"):
    raise ConfigError(f"distributed.initialize={mode!r}; expected auto, yes or no")
  address = cfg.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  if mode == "no" or (mode == "auto" and not address and not _multihost_tpu()):
    return
  # JAX's own timeout (its C++ abort) comes well after the watchdog's report
  kwargs = {"heartbeat_timeout_seconds": int(2 * timeout_s) + 30}
  if address:
    kwargs["coordinator_address"] = address
  if cfg.num_processes > 0:
    kwargs["num_processes"] = cfg.num_processes
  if cfg.process_id >= 0:
    kwargs["process_id"] = cfg.process_id
  jax.distributed.initialize(**kwargs)
  log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
  if jax.process_count() > 1:
    global _watchdog
    _watchdog = _Watchdog(global_state.client, jax.process_index(), jax.process_count(),
                          timeout_s)


class _Watchdog:
  """Publishes this process's heartbeat and reports a peer lost (one line, exit code 1) when
  its heartbeat has not changed for `timeout_s`. Times are this host's monotonic clock: only
  changes of the peers' values are compared, never their clocks. A value is a count, or
  "done" (finished: never reported) or "failed" (stopped on an error it reports itself)."""

  def __init__(self, client, me: int, count: int, timeout_s: float):
    self.client, self.me, self.count, self.timeout_s = client, me, count, timeout_s
    self.interval_s = min(5.0, timeout_s / 5)
    now = time.monotonic()
    self.seen = {p: (None, now) for p in range(count) if p != me}  # last value, when it changed
    self.reached = now  # the last time a read of the store succeeded
    self.state = None  # this process's final value, once it has one: no more counts
    self.stop = threading.Event()
    self.lock = threading.Lock()
    self.publishing = threading.Lock()  # a count is never published after the final value
    self.reporting = False
    self._publish(0)
    self.threads = [threading.Thread(target=f, name=f"lace_jax-{f.__name__[1:]}", daemon=True)
                    for f in (self._heartbeats, self._watch)]
    for t in self.threads:
      t.start()

  def _publish(self, value) -> None:
    self.client.key_value_set(f"{_KEY}{self.me}", str(value), allow_overwrite=True)

  def _heartbeats(self) -> None:
    """Publishes a count every `interval_s` and reads the peers' (this thread may block in an
    RPC to a coordinator that is gone: `_watch` keeps time on its own)."""
    beat = 0
    while not self.stop.wait(self.interval_s):
      beat += 1
      try:
        with self.publishing:
          if self.state is None:
            self._publish(beat)
        values = dict(self.client.key_value_dir_get(_KEY))
      except Exception as e:  # noqa: BLE001 (no news: `_watch` decides when it is a loss)
        log.debug("heartbeat: %s", e)
        continue
      now = time.monotonic()
      with self.lock:
        self.reached = now
        for p, (last, _) in self.seen.items():
          value = values.get(f"{_KEY}{p}")
          if value != last:
            self.seen[p] = (value, now)

  def _watch(self) -> None:
    while not self.stop.wait(1.0):
      now = time.monotonic()
      with self.lock:
        stale = {p: (v, now - t) for p, (v, t) in self.seen.items() if v != _DONE}
        unreachable = now - self.reached
      lost = [p for p, (_, s) in stale.items() if s > self.timeout_s]
      if not lost:
        continue
      if self.me != 0 and 0 in stale and unreachable > self.timeout_s:
        self._report(0, f"the coordinator cannot be reached for {unreachable:.0f} s")
      value, seconds = stale[lost[0]]
      if value == _FAILED:  # its own error is in its own output
        self._report(lost[0], f"it stopped on an error of its own {seconds:.0f} s ago, see its "
                     "output")
      self._report(lost[0], f"no heartbeat for {seconds:.0f} s")

  def _report(self, process: int, why: str) -> None:
    """Prints the one error line and ends the process (the main thread may be blocked inside a
    collective for good: os._exit, not an exception)."""
    with self.lock:
      if self.stop.is_set() or self.reporting:
        return
      self.reporting = True
    print(f"\nerror: process {process} of {self.count} is lost: {why} (distributed."
          f"heartbeat_timeout_s={self.timeout_s:g}). {_last_checkpoint()} Rerun the same "
          "command on every host to resume.", file=sys.stderr, flush=True)
    os._exit(1)

  def finish(self, state: str) -> None:
    """Publishes this process's final value: its heartbeat stops. "done" also stops the
    watching (the threads end before the process does)."""
    if state == _DONE:
      with self.lock:
        self.stop.set()
      for t in self.threads:
        t.join(timeout=10)
    with self.publishing:
      self.state = state
      try:
        self._publish(state)
      except Exception as e:  # noqa: BLE001 (nothing more to tell the peers)
        log.debug("cannot publish %r for process %d: %s", state, self.me, e)

  def confirm(self) -> None:
    """This process failed. Waits until every peer has published a newer count, is done or
    failed itself (returns: the failure is this process's own), or one is reported lost (ends
    the process), for at most one heartbeat timeout and a bit.

    "Newer" is measured against the store read now, not against the last values the heartbeat
    thread saw: that thread reads every `interval_s`, so a peer killed just after publishing a
    count would otherwise show one change after this process failed on its death and pass for
    alive. When the store cannot be read, a peer must advance two counts past the last value
    seen (the thread's lag is at most one)."""
    try:
      stored = dict(self.client.key_value_dir_get(_KEY))
      before, need = {p: stored.get(f"{_KEY}{p}") for p in self.seen}, 1
    except Exception as e:  # noqa: BLE001 (the coordinator may be the lost one)
      log.debug("confirm: %s", e)
      with self.lock:
        before, need = {p: v for p, (v, _) in self.seen.items()}, 2
    self.finish(_FAILED)
    deadline = time.monotonic() + self.timeout_s + 3 * self.interval_s
    while time.monotonic() < deadline:
      with self.lock:
        if all(_advanced(v, before[p], need) for p, (v, _) in self.seen.items()):
          return
      time.sleep(0.2)


def _advanced(value: str | None, before: str | None, need: int) -> bool:
  """Whether a peer's heartbeat value shows it alive (or finished) since `before`."""
  if value in (_DONE, _FAILED):
    return True
  if value is None or not value.isdigit():
    return False
  start = int(before) if before is not None and before.isdigit() else -1
  return int(value) >= start + need


_watchdog: _Watchdog | None = None
_checkpoint: tuple[int | None, str] | None = None  # the last complete checkpoint: step, directory


def note_checkpoint(step: int | None, directory: str) -> None:
  """Called by the checkpointer: its directory when it opens (step None), then each step a save
  completed in or a restore read. Named when a process is reported lost: a rerun resumes there."""
  global _checkpoint
  _checkpoint = (step, os.path.abspath(directory))


def _last_checkpoint() -> str:
  step, directory = _checkpoint or (None, "")
  try:  # a save that completed after it was noted (orbax names a complete step by its number)
    step = max([s for s in [step] if s is not None]
               + [int(e) for e in os.listdir(directory) if e.isdigit()])
  except (OSError, ValueError):  # not a local directory, or nothing in it
    pass
  if step is None:
    return "Last checkpoint: no checkpoint saved yet."
  return f"Last checkpoint: step {step} in {directory}."


def finished() -> None:
  """The run has ended normally on this process: its peers must not report it lost."""
  if _watchdog is not None:
    _watchdog.finish(_DONE)


def report_lost_peer() -> None:
  """Called when the run raised on this process. If a peer is lost (a collective whose peer
  died can fail at once, before the watchdog's timeout), that is the error to report: waits
  until the watchdog confirms it (and ends the process) or every peer proves alive (returns)."""
  if _watchdog is not None:
    _watchdog.confirm()


_broadcasts = 0  # how many `from_process_0` calls this process has made: each its own key


def from_process_0(value: Any, timeout_s: float = 600.0) -> Any:
  """Process 0's `value` (JSON-serialisable) on every process, through the coordination
  service's key-value store (no device collective: usable before any array exists). Every
  process must make the same calls in the same order."""
  global _broadcasts
  _broadcasts += 1
  if jax.process_count() == 1:
    return value
  key = f"lace_jax/from_process_0/{_broadcasts}"
  client = global_state.client
  if jax.process_index() == 0:
    client.key_value_set(key, json.dumps(value))
    return value
  return json.loads(client.blocking_key_value_get(key, int(timeout_s * 1000)))
