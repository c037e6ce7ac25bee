"""Train-state + data-iterator checkpoints (orbax CheckpointManager, async, keep-N).

The train state and the grain iterator are saved together as one step, so a resumed run sees
exactly the batches the interrupted one would have. Restoring takes abstract arrays carrying
the *current* mesh's shardings, so a run may resume on a different mesh or device count.

A failed save or restore raises one `StateCheckpointError` stating the first cause (a full disk
as "no space left on device" with the checkpoint path; a restore whose arrays do not fit the
current model with the parameters that differ) instead of orbax's cascade: the ERROR logs of
its background threads (kept back while the checkpointer is open, re-logged if nothing raised
them) and the cancelled coroutines that, left to interpreter exit, each print a traceback.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import sys
import threading
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from lace_jax.errors import RunError

log = logging.getLogger(__name__)


class StateCheckpointError(RunError):
  """A train-state checkpoint could not be saved or restored; the message names the cause."""


def _causes(e: BaseException) -> list[BaseException]:
  """`e` and everything it was raised from or during (causes, contexts, group members)."""
  out, todo, seen = [], [e], set()
  while todo:
    x = todo.pop(0)
    if x is None or id(x) in seen:
      continue
    seen.add(id(x))
    out.append(x)
    todo += [x.__cause__, x.__context__, *getattr(x, "exceptions", ())]
  return out


def _no_space(e: BaseException) -> BaseException | None:
  for x in _causes(e):
    if (isinstance(x, OSError) and x.errno == errno.ENOSPC) or \
        "no space left on device" in str(x).lower():
      return x
  return None


def _first_line(e: BaseException) -> str:
  msg = str(e).strip().split("\n")[0]
  # orbax's advice to pad or truncate mismatched arrays would restore a different model
  msg = msg.split(" Truncating/padding is disabled.")[0]
  return f"{type(e).__name__}: {msg.rstrip('.')}"


_ORPHAN_ERRORS = ("Event loop is closed", "Python is likely shutting down",
                  "Encountered error while reading array index",
                  "Encountered error while writing array")


def _orphan(exc: BaseException | None) -> bool:
  """An error of a read or write that a failed orbax operation left running."""
  return exc is not None and any(m in str(exc) for m in _ORPHAN_ERRORS)


def _silence_orphans() -> None:
  """From now on, errors of the reads and writes a failed orbax operation left running are
  logged at debug level instead of printed. They arrive on tensorstore's threads at any later
  moment (a traceback ending in "Event loop is closed" each, dozens of them), after the one
  StateCheckpointError that says the first cause; every other error is printed as before."""
  if getattr(sys.excepthook, "_lace_orphans", False):
    return
  previous, previous_thread, previous_unraisable = (sys.excepthook, threading.excepthook,
                                                    sys.unraisablehook)

  def excepthook(kind, value, tb):
    if _orphan(value):
      log.debug("after a failed checkpoint operation: %s", value)
    else:
      previous(kind, value, tb)

  def thread_hook(args):
    if _orphan(args.exc_value):
      log.debug("after a failed checkpoint operation: %s", args.exc_value)
    else:
      previous_thread(args)

  def unraisable(u):
    if _orphan(u.exc_value):
      log.debug("after a failed checkpoint operation: %s", u.exc_value)
    else:
      previous_unraisable(u)

  excepthook._lace_orphans = True
  sys.excepthook, threading.excepthook, sys.unraisablehook = excepthook, thread_hook, unraisable


def _collect_quietly() -> None:
  """Silences the orphans of a failed orbax operation (`_silence_orphans`) and finalises now
  the coroutines of its cancelled reads and writes."""
  _silence_orphans()
  gc.collect()


class _HeldOrbaxErrors(logging.Filter):
  """Holds back orbax's ERROR records (one traceback per background thread of a failed save):
  the failure reaches the caller as one StateCheckpointError; `release` logs what was held if
  no error was raised for it."""

  def __init__(self):
    super().__init__()
    self.held: list[logging.LogRecord] = []

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname:
      self.held.append(record)
      return False
    return True

  def release(self, logger: logging.Logger, emit: bool) -> None:
    logger.removeFilter(self)
    if emit:
      for record in self.held:
        logger.handle(record)
    self.held.clear()


class Checkpointer:

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._closed = False
    self._failed: StateCheckpointError | None = None
    self._saving: int | None = None  # the step of the last save started
    self._absl = logging.getLogger("absl")  # orbax logs through absl
    self._held = _HeldOrbaxErrors()
    self._absl.addFilter(self._held)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def _save_failed(self, step: int | None, e: BaseException) -> StateCheckpointError:
    where = os.path.join(self.directory, str(step)) if step is not None else self.directory
    full = _no_space(e)
    if full is not None:
      path = getattr(full, "filename", None)
      last = self._manager.latest_step()
      msg = (f"cannot save checkpoint step {step} to {where}: no space left on device"
             + (f" (writing {path})" if path else "")
             + f"; free space on the disk of {self.directory}, then rerun the same command to "
             + (f"resume from the last complete checkpoint, step {last}" if last is not None
                else "start again (no complete checkpoint yet)"))
    else:
      msg = f"cannot save checkpoint step {step} to {where}: {_first_line(e)}"
    self._failed = StateCheckpointError(msg)
    return self._failed

  def save(self, step: int, state: Any, iterator: grain.DatasetIterator | None) -> None:
    if self._failed is not None:
      raise self._failed
    items = {"state": ocp.args.StandardSave(state)}
    if iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(iterator)
    if step in self._manager.all_steps():
      return
    self.wait()  # the previous save's failure is that step's (orbax would wait here anyway)
    _silence_orphans()  # before the writes start: a failed write's siblings report at any moment
    error = None
    self._saving = step
    try:
      self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # noqa: BLE001 (reported as one clear error below)
      error = self._save_failed(step, e)
    if error is not None:
      _collect_quietly()
      raise error

  def restore(self, step: int, abstract_state: Any,
              iterator: grain.DatasetIterator | None) -> Any:
    """Restores the state onto the shardings carried by `abstract_state`, and the iterator in
    place."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(iterator)
    _silence_orphans()  # before the reads start: a failed read's siblings report at any moment
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001 (reported as one clear error below)
      cause = _first_line(e)
    else:
      return restored["state"]
    _collect_quietly()  # outside the except block: nothing holds the failed reads any more
    where = os.path.join(self.directory, str(step))
    msg = f"cannot restore checkpoint step {step} from {where}: {cause}"
    diff = self._shape_changes(step, abstract_state)
    if diff:
      msg += f". Arrays that differ (saved vs now): {diff}"
    raise StateCheckpointError(msg)

  def _shape_changes(self, step: int, abstract_state: Any, limit: int = 4) -> str:
    """The saved arrays whose shapes differ from `abstract_state`'s, params first."""
    try:
      saved = self._manager.item_metadata(step)["state"]
      saved = saved.tree if hasattr(saved, "tree") else saved
      name = lambda path: "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
      before = {name(p): tuple(m.shape) for p, m in
                jax.tree_util.tree_flatten_with_path(saved)[0] if hasattr(m, "shape")}
      now = {name(p): tuple(s.shape) for p, s in
             jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    except Exception as e:  # noqa: BLE001 (the metadata only refines the message)
      log.debug("no checkpoint metadata for step %s: %s", step, e)
      return ""
    rows = [f"{k} {before[k]} vs {now[k]}" for k in now if k in before and before[k] != now[k]]
    rows += [f"{k} missing from the checkpoint" for k in now if k not in before]
    rows += [f"{k} saved but not in this model" for k in before if k not in now]
    params = [r for r in rows if r.startswith("params/")]
    rows = params or rows  # the optimizer state follows the parameters
    more = f" (and {len(rows) - limit} more)" if len(rows) > limit else ""
    return "; ".join(rows[:limit]) + more

  def wait(self) -> None:
    if self._failed is not None:
      return
    error = None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 (reported as one clear error below)
      error = self._save_failed(self._saving, e)
    if error is not None:
      _collect_quietly()
      raise error

  def close(self) -> None:
    """Waits for in-flight saves, then shuts the manager down (idempotent). A save failure not
    raised yet is raised here; one already raised is not raised again."""
    if self._closed:
      return
    self._closed = True
    error = None
    try:
      self.wait()
    except StateCheckpointError as e:
      error = e
    try:
      self._manager.close()
    except Exception as e:  # noqa: BLE001
      if error is None and self._failed is None:
        raise
      log.debug("closing the checkpoint manager after a failure: %s", e)
    finally:
      self._held.release(self._absl, emit=self._failed is None)
    if error is not None:
      raise error
