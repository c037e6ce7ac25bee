"""Train-state + data-iterator checkpoints (orbax CheckpointManager, async, keep-N).

The train state and the grain iterator are saved together as one step, so a resumed run sees
exactly the batches the interrupted one would have. Restoring takes abstract arrays carrying
the *current* mesh's shardings, so a run may resume on a different mesh or device count.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import grain
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._closed = False

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, iterator: grain.DatasetIterator | None) -> None:
    items = {"state": ocp.args.StandardSave(state)}
    if iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(iterator)
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state: Any,
              iterator: grain.DatasetIterator | None) -> Any:
    """Restores the state onto the shardings carried by `abstract_state`, and the iterator in
    place."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for in-flight saves, then shuts the manager down (idempotent)."""
    if self._closed:
      return
    self._manager.wait_until_finished()
    self._manager.close()
    self._closed = True
