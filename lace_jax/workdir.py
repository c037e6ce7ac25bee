"""One run per workdir: a lock file naming its holder (host, PID, start time, command).

  with workdir.lock(workdir):   # WorkdirBusy (one `error:` line) if a live run holds it
    ...

`python -m lace_jax.main` takes it for every mode that has a --workdir, on every process of a
multi-process run (process i locks `WORKDIR/.lock.i`; process 0 `WORKDIR/.lock`), so two pods
launched into the same directory on a shared filesystem collide too. The file is created with
O_EXCL (atomic on local disks and NFS), so exactly one of two runs started together gets it. A
lock left by a run that was killed (SIGKILL, a crash) is taken over with a message when its PID
is dead on this host, or alive but a different process (PIDs are reused: the lock records the
process's start time from /proc). A lock of another host cannot be checked from here: the
message says which file to delete if that run is gone. The sweep runner (`lace_jax.sweep`)
reads a point's lock to never start a point that is running.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator

from lace_jax.errors import RunError


class WorkdirBusy(RunError):
  """Another live run holds the workdir's lock; the message names it."""


def lock_path(workdir: str, process_index: int = 0) -> str:
  return os.path.join(workdir, ".lock" if process_index == 0 else f".lock.{process_index}")


def _start_time(pid: int) -> str | None:
  """The process's start time in clock ticks since boot (/proc/PID/stat field 22): with the
  PID, it names one process; None where /proc is not there."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      stat = f.read()
  except OSError:
    return None
  return stat.rsplit(")", 1)[1].split()[19]  # fields after the command name, from field 3


def _me() -> dict:
  return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _start_time(os.getpid()),
          "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": shlex.join(sys.argv)}


def read_holder(path: str) -> dict | None:
  """The lock's holder, or None if there is no lock ({} for one that cannot be read: a holder
  that died while writing it)."""
  try:
    with open(path) as f:
      text = f.read()
  except FileNotFoundError:
    return None
  try:
    holder = json.loads(text)
    return holder if isinstance(holder, dict) else {}
  except ValueError:
    return {}


def alive(holder: dict) -> bool | None:
  """Whether the holder's process is running: True / False on this host, None on another."""
  if holder.get("host") != socket.gethostname():
    return None
  pid = holder.get("pid")
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's live process
    pass
  recorded, now = holder.get("pid_start"), _start_time(pid)
  return recorded is None or now is None or recorded == now


def describe(holder: dict) -> str:
  if not holder:
    return "an unreadable lock"
  return (f"host {holder.get('host')}, PID {holder.get('pid')}, started {holder.get('started')}"
          f" ({holder.get('command', '?')})")


def _create(path: str) -> bool:
  """Creates the lock file holding this process's record; False if it exists."""
  try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w") as f:
    json.dump(_me(), f)
  return True


def acquire(workdir: str, process_index: int = 0, log=print) -> str:
  """Takes the workdir's lock for this process (see the module doc); returns its path."""
  os.makedirs(workdir, exist_ok=True)
  path = lock_path(workdir, process_index)
  for _ in range(3):  # lose a race for a stale lock at most twice
    if _create(path):
      return path
    holder = read_holder(path)
    if holder is None:  # released between the two calls
      continue
    live = alive(holder) if holder else False
    if holder == {}:  # half-written: give its writer a moment, then call it stale
      time.sleep(0.5)
      holder = read_holder(path)
      if holder:
        live = alive(holder)
    if live is False:
      # exactly one contender renames the stale file away; the others see it gone and retry
      stale = f"{path}.stale.{os.getpid()}"
      try:
        os.rename(path, stale)
      except FileNotFoundError:
        continue
      os.remove(stale)
      log(f"taking over the lock of a run that ended without releasing it ({describe(holder)})")
      continue
    where = (f"; if that run is gone (its host is not this one, so this cannot be checked), "
             f"delete {path}" if live is None else "")
    raise WorkdirBusy(f"{workdir} is in use by another run ({describe(holder)}): one run per "
                      f"workdir. Wait for it, stop it, or use another --workdir{where}")
  raise WorkdirBusy(f"{workdir}: could not take the lock {path} (other runs kept taking it)")


def release(path: str) -> None:
  """Removes the lock if this process still holds it."""
  holder = read_holder(path)
  if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)


@contextlib.contextmanager
def lock(workdir: str, process_index: int = 0, log=print) -> Iterator[str]:
  path = acquire(workdir, process_index, log)
  try:
    yield path
  finally:
    release(path)
