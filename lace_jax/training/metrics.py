"""Run logs a researcher can plot: `metrics.jsonl` (one JSON object per step) and TensorBoard
event files, written by process 0 only."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax


class MetricsLogger:

  def __init__(self, workdir: str | None, *, resume_from_step: int = 0):
    self.active = bool(workdir) and jax.process_index() == 0
    self._tb = None
    self._file = None
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    # drop steps logged after the checkpoint being resumed from: they will be redone
    kept = []
    if os.path.exists(path):
      with open(path) as f:
        for line in f:
          try:
            if json.loads(line).get("step", 0) <= resume_from_step:
              kept.append(line)
          except json.JSONDecodeError:
            continue
    with open(path, "w") as f:
      f.writelines(kept)
    self._file = open(path, "a")
    from tensorboardX import SummaryWriter
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.active:
      return
    row = {"step": step}
    for k, v in metrics.items():
      v = float(v)
      row[k] = v if math.isfinite(v) else str(v)
      if math.isfinite(v):
        self._tb.add_scalar(k, v, step)
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()

  def write_text(self, tag: str, text: str) -> None:
    if self.active:
      self._tb.add_text(tag, text, 0)

  def close(self) -> None:
    if self.active:
      self._file.close()
      self._tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]
