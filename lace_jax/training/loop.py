"""The one run loop: continued pre-training, SFT and Lattice GRPO (and any later stage) plug
into it by supplying how a batch is made and the loss.

  python -m lace_jax.main --config=experiments/{pretrain,sft,grpo}_*.py --workdir=DIR

The loop owns everything else: the workdir, resume-or-init (the train state and the stage's
data iterator are restored together), the AOT compile with its memory log, the metrics logs
(`metrics.jsonl` + TensorBoard), the progress bar, stop requests (SIGTERM / SIGINT: checkpoint
at the next step boundary, exit 143; rerun the same command to resume), the NaN check, the
checkpoints and the export of WORKDIR/export as a Hugging Face directory.

Single-host and multi-host runs behave the same: every process runs every step on its share of
the batch; only process 0 prints and writes files. The metrics of step N-1 are fetched after
step N is dispatched, so the host never waits on the device between steps of a stage whose
batches do not depend on the state (GRPO's do: its rollouts need the current parameters, so
it fetches each step's metrics at once; see `Stage.pipelined`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np

import yaml
from jax.experimental import multihost_utils
from tqdm import tqdm

from lace_jax import sharding
from lace_jax.hf_io import save_pretrained
from lace_jax.model import Model, Params
from lace_jax.tokenizer import Tokenizer
from lace_jax.training.checkpointer import Checkpointer, StateCheckpointError
from lace_jax.training.metrics import MetricsLogger
from lace_jax.training.setup import Setup, load_checkpoint, make_setup
from lace_jax.training.trainer import LossFn, Trainer, check_batch


class Stage(Protocol):
  """What a stage supplies to the loop.

  rows: examples (for GRPO: rollouts) per optimizer update, the global batch B; rows_key
    names the config key(s) that set it, for error messages.
  batch_shapes: the global batch, {name: ShapeDtypeStruct [A, B/A, ...]} (A = grad_accum).
  loss: the stage's `LossFn` (see `lace_jax.training.trainer`).
  updates_per_batch: optimizer updates on each batch (GRPO's inner updates mu; else 1).
  iterator: a grain iterator checkpointed with the state, or None (a batch that is a pure
    function of the step and the state needs none).
  pipelined: fetch step N-1's metrics after step N is dispatched (the host never waits
    between steps). False for a stage whose batch needs the updated state anyway (GRPO's
    rollouts): each step's metrics are then fetched right after its dispatch, so its NaN check
    comes before the next rollouts and `update_time` is the updates' own time.
  """

  rows: int
  rows_key: str
  batch_shapes: dict[str, jax.ShapeDtypeStruct]
  loss: LossFn
  updates_per_batch: int
  iterator: Any
  pipelined: bool

  def next_batch(self, state: dict, step: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """(this process's share of the batch of `step` (0-based) as [A, b/A, ...] arrays, host
    metrics of making it to log beside the step's metrics)."""

  def summary(self) -> dict:
    """Extra entries for the run's summary."""

  def close(self) -> None:
    """Releases what the stage holds (e.g. grader processes); called once, on every exit."""


def log0(msg: str) -> None:
  """Prints on process 0 only."""
  if jax.process_index() == 0:
    print(msg, flush=True)


# The run loop's counts, each an int >= 1, with what it means (for the error message).
TRAIN_COUNTS = {
    "train.steps": "optimizer steps of the run (batches)",
    "train.save_every": "steps between checkpoints; the last step is always saved, so "
                        "train.save_every >= train.steps saves only at the end",
    "train.log_every": "steps between logged metrics; the last step is always logged",
    "train.grad_accum": "microbatches per step",
    "train.keep_checkpoints": "checkpoints kept on disk",
}


def check_counts(cfg: ml_collections.ConfigDict, counts: dict[str, str]) -> None:
  """Raises ValueError naming the first key of `counts` ("section.key": meaning) whose value
  in `cfg` is not an int >= 1; run before anything is loaded or compiled."""
  for key, meaning in counts.items():
    section, name = key.split(".")
    if section not in cfg or name not in cfg[section]:
      raise ValueError(f"config has no {key} ({meaning}); expected an int >= 1")
    value = cfg[section][name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{key}={value!r}; expected an int >= 1 ({meaning})")


def run(cfg: ml_collections.ConfigDict, workdir: str | None,
        make_stage: Callable[[Setup], Stage]) -> dict:
  """Runs (or resumes) the training stage `make_stage` builds; returns a summary dict.

  The run's counts (`TRAIN_COUNTS`) are checked first, before anything is loaded or compiled.
  Resuming from a checkpoint at step train.steps trains nothing: it says so ("already done")
  and exports that checkpoint again; a checkpoint past train.steps (the run trained further
  than this config asks) raises ValueError, since no step-train.steps model is left to export.
  """
  if not workdir:
    raise ValueError(f"mode {cfg.mode!r} needs --workdir (checkpoints, logs and the export go "
                     "there)")
  check_counts(cfg, TRAIN_COUNTS)
  t0 = time.perf_counter()
  tr = cfg.train
  setup = make_setup(cfg)
  model_cfg, lattice = setup.model.config, setup.model.lattice
  tokenizer, mesh = setup.tokenizer, setup.mesh
  preempted_at = None
  # everything opened below is closed on every exit, in reverse order; the checkpointer's close
  # waits for in-flight saves, so no error leaves a half-written checkpoint behind
  with contextlib.ExitStack() as cleanup:
    stage = make_stage(setup)
    cleanup.callback(stage.close)
    rules = sharding.rules_with_overrides(cfg.sharding.rules)
    check_batch(stage.rows, tr.grad_accum, mesh, name=stage.rows_key, rules=rules)
    trainer = Trainer.create(model_cfg, lattice, cfg.optim,
                             total_steps=tr.steps * stage.updates_per_batch,
                             trainable=tr.trainable, mesh=mesh, rules=rules)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tr.keep_checkpoints,
                        async_save=tr.async_checkpointing)
    cleanup.callback(ckpt.close)
    start = ckpt.latest_step()
    if start is not None and start > tr.steps:
      raise ValueError(f"{ckpt.directory} holds step {start}, past train.steps={tr.steps}: this "
                       f"workdir's run already trained further than the config asks. Set "
                       f"train.steps >= {start} to continue it, or use a new --workdir")
    if start is not None:
      try:
        state = ckpt.restore(start, trainer.abstract_state(), stage.iterator)
      except StateCheckpointError as e:
        raise StateCheckpointError(f"{e}. {explain_config_change(workdir, cfg)}") from None
      log0(f"resumed from step {start} ({ckpt.directory})")
    else:
      start = 0
      state = trainer.init_state(cfg.seed, load_checkpoint(cfg, model_cfg, lattice))
    if start == tr.steps:  # a finished run's command again: nothing to train or compile
      log0(f"already done: step {start} >= train.steps={tr.steps} in {ckpt.directory}; "
           "nothing to train (raise train.steps to continue); exporting that checkpoint")
      export_dir = export(setup.model, state["params"], tokenizer, workdir)
      return {"steps": tr.steps, "start_step": start, "trained_steps": 0, "final_loss": None,
              "last": {}, "export": export_dir, "seconds": time.perf_counter() - t0,
              "compiled_memory": {}, **stage.summary()}

    compiled, mem = trainer.compile(stage.batch_shapes, stage.loss)
    log0(f"mesh {sharding.describe(mesh)}; compiled {cfg.mode} step memory: "
         + ", ".join(f"{k}={v / 2**20:.1f}MiB" for k, v in mem.items() if "code" not in k))

    logger = MetricsLogger(workdir, resume_from_step=start)
    cleanup.callback(logger.close)
    logger.write_text("config", str(cfg))
    if jax.process_index() == 0:
      with open(os.path.join(workdir, "config.yaml"), "w") as f:
        f.write(cfg.to_yaml())
    bar = tqdm(total=tr.steps, initial=start, disable=jax.process_index() != 0,
               dynamic_ncols=True, desc=cfg.mode)
    cleanup.callback(bar.close)
    base_rng = jax.random.key(cfg.seed)
    history: list[dict[str, float]] = []
    last_time = time.perf_counter()

    def finish(pending) -> None:
      """Fetches a dispatched step's metrics (blocking until it is done), checks, logs them."""
      nonlocal last_time
      step, device_metrics, host, batch_time, dispatched = pending
      m = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
      if not np.isfinite(m["loss"]):
        ckpt.wait()  # the last good checkpoint may still be being written: finish it first
        raise FloatingPointError(
            f"loss is {m['loss']} at step {step}: stopping. The last good checkpoint is step "
            f"{ckpt.latest_step()} in {ckpt.directory}; lower optim.lr or check the data.")
      now = time.perf_counter()
      dt, last_time = now - last_time, now
      m["step_time"] = dt
      m["batch_time"] = batch_time  # making the batch on the host (GRPO: rollouts, rewards)
      if not stage.pipelined:  # fetched right after dispatch: the updates' own time
        m["update_time"] = now - dispatched
      m["tokens_per_sec"] = m.pop("valid_tokens") / dt if dt > 0 else 0.0
      m.update(host)
      if step % tr.log_every == 0 or step == tr.steps:
        logger.write(step, m)
      history.append(m)
      bar.set_postfix({k: f"{m[k]:.4g}" for k in ("loss", "reward", "accuracy",
                                                  "tokens_per_sec") if k in m})
      bar.update(1)

    pending = None  # (step, device metrics, host metrics, batch time, dispatch time)
    with stop_requests() as stop:
      step = start
      while step < tr.steps:
        t_batch = time.perf_counter()
        local, host = stage.next_batch(state, step)
        batch = sharding.global_batch(local, mesh, leading=1, rules=rules)
        dispatched = time.perf_counter()
        for mu in range(stage.updates_per_batch):
          rng = jax.random.fold_in(base_rng, step * stage.updates_per_batch + mu)
          state, metrics = compiled(state, batch, rng)
        step += 1
        if pending is not None:
          finish(pending)  # step - 1, fetched while step runs
        pending = (step, metrics, host, dispatched - t_batch, dispatched)
        if (not stage.pipelined or step % tr.save_every == 0 or step == tr.steps
            or stop["flag"]):
          finish(pending)  # and never save a state whose loss was not checked
          pending = None
        if step % tr.save_every == 0 or step == tr.steps or stop["flag"]:
          ckpt.save(step, state, stage.iterator)
          if stop["flag"]:
            preempted_at = step
            break
  if preempted_at is not None:
    log0(f"stopped at step {preempted_at} on request; checkpoint saved in {ckpt.directory}. "
         "Run the same command to resume.")
    raise SystemExit(143)
  export_dir = export(setup.model, state["params"], tokenizer, workdir)
  summary = {"steps": tr.steps, "start_step": start, "trained_steps": tr.steps - start,
             "final_loss": history[-1]["loss"] if history else None,
             "last": history[-1] if history else {}, "export": export_dir,
             "seconds": time.perf_counter() - t0, "compiled_memory": mem, **stage.summary()}
  resumed = f" ({tr.steps - start} in this run, resumed from step {start})" if start else ""
  log0(f"done: {tr.steps} steps{resumed}, final loss {summary['final_loss']}, exported to "
       f"{export_dir} ({summary['seconds']:.0f}s)")
  return summary


# what shapes the train state: a change here makes a checkpoint unrestorable
STATE_KEYS = ("model", "lattice", "train.trainable")


def _flat_config(text: str) -> dict[str, Any]:
  """{dotted key: value} of a ConfigDict's YAML (`to_yaml`), read with a safe loader: python
  tags become plain values (a ConfigDict its fields, a FieldReference its value)."""
  class Loader(yaml.SafeLoader):
    pass

  def python(loader, suffix, node):
    del suffix
    if isinstance(node, yaml.MappingNode):
      d = loader.construct_mapping(node, deep=True)
      return d.get("_fields", d.get("_value", d)) if isinstance(d, dict) else d
    if isinstance(node, yaml.SequenceNode):
      return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)

  Loader.add_multi_constructor("tag:yaml.org,2002:python/", python)
  flat: dict[str, Any] = {}

  def walk(prefix: str, x: Any) -> None:
    if isinstance(x, dict) and ("_fields" in x or "_value" in x):  # a ConfigDict in a list
      x = x.get("_fields", x.get("_value"))
    if isinstance(x, dict):
      for k, v in x.items():
        walk(f"{prefix}.{k}" if prefix else str(k), v)
    else:
      flat[prefix] = tuple(x) if isinstance(x, list) else x

  walk("", yaml.load(text, Loader=Loader))
  return flat


def config_changes(saved_yaml: str, cfg: ml_collections.ConfigDict,
                   keys: tuple[str, ...] = STATE_KEYS) -> list[str]:
  """"key: saved (saved) vs now (now)" for each key under `keys` whose value in the run's saved
  config (WORKDIR/config.yaml) differs from `cfg`'s."""
  with open(saved_yaml) as f:
    saved = _flat_config(f.read())
  now = _flat_config(cfg.to_yaml())
  under = lambda k: any(k == p or k.startswith(p + ".") for p in keys)
  return [f"{k}: {saved.get(k, '(absent)')} (saved) vs {now.get(k, '(absent)')} (now)"
          for k in sorted(set(saved) | set(now)) if under(k) and saved.get(k) != now.get(k)]


def explain_config_change(workdir: str, cfg: ml_collections.ConfigDict) -> str:
  """What in the model config changed since the run's checkpoints were written, as a sentence
  for a restore error."""
  path = os.path.join(workdir, "config.yaml")
  if not os.path.exists(path):
    return (f"The run's config ({path}) is missing, so the change cannot be named; resume with "
            "the model config the checkpoints were written with, or use a new --workdir")
  try:
    changes = config_changes(path, cfg)
  except Exception as e:  # noqa: BLE001 (the comparison only refines the message)
    return f"The run's saved config {path} could not be compared ({type(e).__name__}: {e})"
  if not changes:
    return (f"The run's saved config {path} has the same {', '.join(STATE_KEYS)} as this "
            "command")
  return (f"This command's config differs from the run's saved config {path} in "
          + "; ".join(changes) + ". Resume with the saved values, or use a new --workdir to "
          "start a run with the new ones")


def export(model: Model, params: Params, tokenizer: Tokenizer, workdir: str) -> str:
  """Writes WORKDIR/export (an HF directory + tokenizer.json); all processes must call it
  (the parameters are gathered across hosts), process 0 writes."""
  export_dir = os.path.join(workdir, "export")
  if jax.process_count() > 1:
    params = multihost_utils.process_allgather(params, tiled=True)
  if jax.process_index() == 0:
    save_pretrained(model, jax.device_get(params), export_dir)
    tokenizer.save(os.path.join(export_dir, "tokenizer.json"))
  return export_dir


@contextlib.contextmanager
def stop_requests() -> Iterator[dict[str, bool]]:
  """Yields a dict whose "flag" turns True on SIGTERM / SIGINT (main thread only), so a loop
  can checkpoint at the next step boundary; the previous handlers are restored on exit."""
  flag = {"flag": False}

  def on_signal(signum, frame):
    del frame
    flag["flag"] = True
    log0(f"received signal {signum}: saving a checkpoint after this step")

  old = {}
  if threading.current_thread() is threading.main_thread():
    for sig in (signal.SIGTERM, signal.SIGINT):
      old[sig] = signal.signal(sig, on_signal)
  try:
    yield flag
  finally:
    for sig, handler in old.items():
      signal.signal(sig, handler)
