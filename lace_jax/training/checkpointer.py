"""Train-state + data-iterator checkpoints (orbax CheckpointManager, async, keep-N).

The train state and the grain iterator are saved together as one step, so a resumed run sees
exactly the batches the interrupted one would have. Restoring takes abstract arrays carrying
the *current* mesh's shardings, so a run may resume on a different mesh or device count.

Every finished step is sealed with a manifest of its files' sizes and SHA-256 digests
(`MANIFEST`, written by process 0 on a background thread once the step is committed, so the
loop never waits for it; the last step's on close). `verify(step)` checks a step against it:
a flipped byte, a truncated or a deleted file is named before any array is read, and the loop
(`lace_jax.training.loop`) then resumes from the newest intact step, moving the bad one aside
(`quarantine`). A step without a manifest (its run was killed before sealing it) is restored
unverified, and a failed restore of it is treated the same way.

A failed save or restore raises one `StateCheckpointError` stating the first cause (a full disk
as "no space left on device" with the checkpoint path; a restore whose arrays do not fit the
current model with the parameters that differ) instead of orbax's cascade: the ERROR logs of
its background threads (kept back while the checkpointer is open, re-logged if nothing raised
them), and the reads and writes that the failed operation would leave running (each operation's
own event loop is drained before orbax closes it: `_close_draining`). Nothing process-wide is
changed: no exception hooks, no global orbax registry or asyncio policy.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import functools
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from lace_jax import distributed
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


# orbax runs each restore, and each save's background commit, on an event loop of its own
# (`asyncio_utils.run_sync`: a new loop, closed when the operation's coroutine ends) and, unlike
# `asyncio.run`, closes it without cancelling the tasks still on it. When one array read or
# write fails, its siblings are left running on tensorstore's threads: each then reports against
# the closed loop ("Event loop is closed": dozens of tracebacks, at any later moment, on
# tensorstore's threads) and prints "Exception ignored in ..." / "Task exception was never
# retrieved" when collected. The train state's handler (`_state_handler`) has an array-metadata
# store of its own, whose read and write orbax runs on that same loop next to the array reads and
# writes; they make the loop cancel and wait for its remaining tasks when orbax closes it, and
# drop what tensorstore still hands it once closed (`_call_soon_unless_closed`).
_DRAIN_TIMEOUT_S = 60.0


def _close_draining(loop: asyncio.AbstractEventLoop) -> None:
  """`loop.close()` of one orbax operation's loop: first cancels the tasks still on it and waits
  for them (as `asyncio.run` does), so that the operation leaves nothing running."""
  del loop.close  # the loop's own close from here on
  try:
    for _ in range(3):  # a task ending on cancellation may start another
      pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
      if not pending or loop.is_running():
        break
      for t in pending:
        t.cancel()
      done, stuck = loop.run_until_complete(asyncio.wait(pending, timeout=_DRAIN_TIMEOUT_S))
      for t in done:
        if not t.cancelled():
          t.exception()  # retrieved: the operation's first error is the one that is raised
      if stuck:  # not waited for any longer: left as orbax would leave them
        log.debug("%d tasks of a checkpoint operation did not end when cancelled", len(stuck))
        break
  except Exception as e:  # noqa: BLE001 (closing must not replace the operation's own error)
    log.debug("draining a checkpoint operation's event loop: %s", e)
  finally:
    loop.close()


def _call_soon_unless_closed(loop: asyncio.AbstractEventLoop, callback, *args, context=None):
  """`loop.call_soon_threadsafe` of one orbax operation's loop, which drops a callback that comes
  after the loop is closed. A read or write that completed on a tensorstore thread just as its
  task was cancelled (too late to be cancelled, its callback still waiting for the GIL) hands
  its result to the loop after the drain: its task has ended, so there is nothing to deliver."""
  try:
    return type(loop).call_soon_threadsafe(loop, callback, *args, context=context)
  except RuntimeError:
    if loop.is_closed():
      return None
    raise


def _drain_on_close() -> None:
  """Makes the running loop (orbax's own, for one operation) drain itself when it is closed."""
  loop = asyncio.get_running_loop()
  if getattr(loop.close, "func", None) is _close_draining:
    return
  try:
    loop.call_soon_threadsafe = functools.partial(_call_soon_unless_closed, loop)
    loop.close = functools.partial(_close_draining, loop)
  except AttributeError:  # a loop without instance attributes (uvloop): left as it is
    log.debug("cannot drain %r when it closes", loop)


try:  # orbax's per-array metadata store (not exported): without it, no draining
  from orbax.checkpoint._src.metadata.array_metadata_store import (
    Store as _ArrayMetadataStore,
  )
except ImportError:
  _ArrayMetadataStore = None

if _ArrayMetadataStore is not None:

  class _DrainingArrayMetadataStore(_ArrayMetadataStore):
    """orbax's store of per-array metadata. Its `read` runs in the same `gather` as a restore's
    array reads and its `write` in that of a save's array writes, on the operation's own loop,
    before any of them can fail: both make that loop drain itself when closed."""

    async def read(self, *args, **kwargs):
      _drain_on_close()
      return await super().read(*args, **kwargs)

    async def write(self, *args, **kwargs):
      _drain_on_close()
      return await super().write(*args, **kwargs)


def _state_handler() -> ocp.StandardCheckpointHandler | None:
  """The train state's orbax handler: StandardCheckpointHandler (same files, same metadata, same
  options) whose jax.Array handler has a `_DrainingArrayMetadataStore`. Its type registry is its
  own (orbax's global one is left as it is). None, for orbax's default handler, where this orbax
  version is built differently."""
  if _ArrayMetadataStore is None:
    return None
  try:
    th = ocp.type_handlers
    registry = th.create_type_handler_registry(
        *((t, th.get_type_handler(t)) for t in th.supported_types()))
    registry.add(jax.Array, th.ArrayHandler(array_metadata_store=_DrainingArrayMetadataStore()),
                 override=True, ignore_warnings=True)
    handler = ocp.StandardCheckpointHandler()
    if not isinstance(getattr(handler, "_impl", None), ocp.PyTreeCheckpointHandler):
      return None
    # the PyTreeCheckpointHandler StandardCheckpointHandler makes, with the registry above
    handler._impl = ocp.PyTreeCheckpointHandler(save_concurrent_gb=96, restore_concurrent_gb=96,
                                                type_handler_registry=registry)
    return handler
  except (AttributeError, TypeError, ValueError) as e:
    log.debug("orbax's default state checkpoint handler (no draining): %s", e)
    return None


MANIFEST = "lace_checksums.json"  # in each step's directory: {relative path: size, sha256}
_CHUNK = 1 << 23


def _digest(path: str) -> tuple[int, str]:
  h, size = hashlib.sha256(), 0
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
      size += len(chunk)
  return size, h.hexdigest()


def _files(step_dir: str) -> list[str]:
  out = []
  for root, _, names in os.walk(step_dir):
    out += [os.path.relpath(os.path.join(root, n), step_dir) for n in names if n != MANIFEST]
  return sorted(out)


def checksums(step_dir: str) -> dict[str, dict]:
  """{file path relative to the step: {"size", "sha256"}} of every file of a step (hashed in
  parallel: hashlib releases the GIL)."""
  files = _files(step_dir)
  with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
    digests = list(pool.map(lambda p: _digest(os.path.join(step_dir, p)), files))
  return {p: {"size": n, "sha256": d} for p, (n, d) in zip(files, digests)}


def write_manifest(step_dir: str) -> None:
  entries = checksums(step_dir)
  tmp = os.path.join(step_dir, MANIFEST + ".tmp")
  with open(tmp, "w") as f:
    json.dump({"algorithm": "sha256", "sealed": time.time(), "files": entries}, f, indent=1)
  os.replace(tmp, os.path.join(step_dir, MANIFEST))  # never a half-written manifest


def verify_step(step_dir: str, limit: int = 3) -> list[str] | None:
  """What is wrong with a step's files against its manifest ([] if nothing), or None if it
  has no manifest (it cannot be checked)."""
  path = os.path.join(step_dir, MANIFEST)
  try:
    with open(path) as f:
      files = json.load(f)["files"]
  except FileNotFoundError:
    return None
  except (ValueError, KeyError, TypeError) as e:
    return [f"its manifest {MANIFEST} is unreadable ({type(e).__name__})"]
  problems = []
  for rel, want in files.items():
    p = os.path.join(step_dir, rel)
    if not os.path.exists(p):
      problems.append(f"{rel} is missing")
      continue
    size = os.path.getsize(p)
    if size != want["size"]:
      problems.append(f"{rel} has {size} bytes, {want['size']} were saved (truncated or "
                      "overwritten)")
    elif _digest(p)[1] != want["sha256"]:
      problems.append(f"{rel} does not match its SHA-256 (corrupted bytes)")
    if len(problems) >= limit:
      break
  return problems


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
    handlers = ocp.handlers.DefaultCheckpointHandlerRegistry()  # others: by their args' type
    state_handler = _state_handler()
    if state_handler is not None:
      handlers.add("state", ocp.args.StandardSave, state_handler)
      handlers.add("state", ocp.args.StandardRestore, state_handler)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          handler_registry=handlers)
    self._closed = False
    self._failed: StateCheckpointError | None = None
    self._saving: int | None = None  # the step of the last save started
    self._absl = logging.getLogger("absl")  # orbax logs through absl
    self._held = _HeldOrbaxErrors()
    self._absl.addFilter(self._held)
    self._sealing: threading.Thread | None = None  # hashing the last finished step
    self._sealed: set[int] = set()
    distributed.note_checkpoint(None, self.directory)  # named if a process is lost

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _seal(self, step: int) -> None:
    """Writes the step's manifest on a background thread (process 0); the next save or close
    waits for it."""
    self._join_sealing()
    if step in self._sealed or jax.process_index() != 0:
      return
    self._sealed.add(step)
    step_dir = self.step_dir(step)

    def seal():
      try:
        write_manifest(step_dir)
      except FileNotFoundError:  # deleted meanwhile (keep_checkpoints): nothing to seal
        pass
      except OSError as e:  # the checkpoint is good; it only stays unverifiable
        log.warning("could not write the checksums of %s: %s", step_dir, e)

    self._sealing = threading.Thread(target=seal, name="lace_jax-seal", daemon=True)
    self._sealing.start()

  def _join_sealing(self) -> None:
    if self._sealing is not None:
      self._sealing.join()
      self._sealing = None

  def verify(self, step: int) -> list[str] | None:
    """Problems of a step's files against its manifest ([] if intact; None if it has none).
    Process 0 reads the files; every process gets its verdict."""
    problems = verify_step(self.step_dir(step)) if jax.process_index() == 0 else None
    if jax.process_count() > 1:
      problems = distributed.from_process_0(problems)
    return problems

  def quarantine(self, step: int) -> str:
    """Moves a bad step out of the manager's directory (to WORKDIR/corrupt_checkpoints/STEP),
    so it is kept for inspection and the run can save that step again; returns where."""
    dest = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints",
                        f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      shutil.move(self.step_dir(step), dest)
    if jax.process_count() > 1:
      distributed.from_process_0(None)  # every process sees the move done
    self._manager.reload()
    return dest

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
    error = None
    self._saving = step
    try:
      self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # noqa: BLE001 (reported as one clear error below)
      error = self._save_failed(step, e)
    if error is not None:
      raise error

  def restore(self, step: int, abstract_state: Any,
              iterator: grain.DatasetIterator | None) -> Any:
    """Restores the state onto the shardings carried by `abstract_state`, and the iterator in
    place."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(iterator)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001 (reported as one clear error below)
      cause = _first_line(e)
    else:
      distributed.note_checkpoint(step, self.directory)
      return restored["state"]
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
      raise error
    if self._saving is not None:
      distributed.note_checkpoint(self._saving, self.directory)
      if self._saving in self._manager.all_steps():
        self._seal(self._saving)

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
    self._join_sealing()  # the last step's manifest is written before the run ends
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
