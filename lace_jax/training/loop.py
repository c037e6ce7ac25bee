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
import dataclasses
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import yaml
from jax.experimental import multihost_utils
from tqdm import tqdm

from lace_jax import sharding
from lace_jax.errors import ConfigError, NonFiniteError
from lace_jax.hf_io import save_pretrained
from lace_jax.model import Model, Params
from lace_jax.tokenizer import Tokenizer
from lace_jax.training.checkpointer import Checkpointer, StateCheckpointError
from lace_jax.training.metrics import MetricsLogger
from lace_jax.training.setup import Setup, load_checkpoint, make_setup
from lace_jax.training.trainer import LossFn, Trainer, check_batch, check_optim


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
      raise ConfigError(f"config has no {key} ({meaning}); expected an int >= 1")
    value = cfg[section][name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ConfigError(f"{key}={value!r}; expected an int >= 1 ({meaning})")


def _resume_or_init(cfg: ml_collections.ConfigDict, workdir: str, model: Model,
                    trainer: Trainer, ckpt: Checkpointer, iterator: Any) -> tuple[int, dict]:
  """(the step to start from, the train state): the latest checkpoint's, restored together with
  the stage's data `iterator`, else step 0 and a fresh state (cfg.model.checkpoint's weights if
  set). ValueError for a checkpoint past train.steps; a state that does not restore names the
  config change that broke it (`explain_config_change`)."""
  tr = cfg.train
  start = ckpt.latest_step()
  if start is not None and start > tr.steps:
    raise ConfigError(f"{ckpt.directory} holds step {start}, past train.steps={tr.steps}: this "
                     f"workdir's run already trained further than the config asks. Set "
                     f"train.steps >= {start} to continue it, or use a new --workdir")
  bad = []  # (step, what is wrong) of each step given up on, newest first
  for step in reversed(ckpt.all_steps()):
    problems = ckpt.verify(step)
    if problems:
      bad.append((step, "; ".join(problems)))
      _give_up(ckpt, step, bad[-1][1])
      continue
    try:
      state = ckpt.restore(step, trainer.abstract_state(), iterator)
    except StateCheckpointError as e:
      # files that match their checksums, or a changed model config: the step is not damaged,
      # the config (or the environment) is what changed
      if problems == [] or _changed_config(workdir, cfg):
        raise StateCheckpointError(f"{e}. {explain_config_change(workdir, cfg)}") from None
      # no checksums (its run was killed before sealing it) and the same config: damaged
      bad.append((step, str(e)))
      _give_up(ckpt, step, str(e))
      continue
    unverified = " (unverified: it has no checksums, its run stopped before writing them)" \
        if problems is None else ""
    log0(f"resumed from step {step} ({ckpt.directory}){unverified}")
    return step, state
  if bad:
    raise StateCheckpointError(
        f"no intact checkpoint in {ckpt.directory}: "
        + "; ".join(f"step {s}: {why}" for s, why in bad)
        + ". The bad steps were moved to "
        f"{os.path.join(os.path.dirname(ckpt.directory), 'corrupt_checkpoints')}; rerun to "
        "start from step 0, or restore the checkpoints from a copy")
  return 0, trainer.init_state(cfg.seed, load_checkpoint(cfg, model.config, model.lattice))


def _changed_config(workdir: str, cfg: ml_collections.ConfigDict) -> bool:
  """Whether the model config differs from the one the run's checkpoints were written with."""
  path = os.path.join(workdir, "config.yaml")
  try:
    return bool(config_changes(path, cfg)) if os.path.exists(path) else False
  except Exception:  # noqa: BLE001 (unknown: not a reason to call a checkpoint corrupt)
    return True


def _give_up(ckpt: Checkpointer, step: int, why: str) -> None:
  """Reports a bad step in one message and moves it aside; the loop tries the next older."""
  where = ckpt.quarantine(step)
  older = [s for s in ckpt.all_steps() if s < step]
  then = f"trying step {older[-1]}, the newest older one" if older else "no older step is left"
  log0(f"checkpoint step {step} in {ckpt.directory} is damaged: {why}. Moved it to {where}; "
       f"{then}")


def _compile(cfg: ml_collections.ConfigDict, trainer: Trainer, stage: Stage,
             mesh: jax.sharding.Mesh) -> tuple[Callable, dict[str, int]]:
  """The stage's train step compiled ahead of time, and its memory (bytes by kind), logged."""
  compiled, mem = trainer.compile(stage.batch_shapes, stage.loss)
  log0(f"mesh {sharding.describe(mesh)}; compiled {cfg.mode} step memory: "
       + ", ".join(f"{k}={v / 2**20:.1f}MiB" for k, v in mem.items() if "code" not in k))
  return compiled, mem


def _open_logs(cfg: ml_collections.ConfigDict, workdir: str, start: int,
               cleanup: contextlib.ExitStack) -> tuple[MetricsLogger, tqdm]:
  """The metrics logger (resumed at `start`; the config written beside it, also as
  WORKDIR/config.yaml) and the progress bar, both closed by `cleanup`."""
  logger = MetricsLogger(workdir, resume_from_step=start)
  cleanup.callback(logger.close)
  logger.write_text("config", str(cfg))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.yaml"), "w") as f:
      f.write(cfg.to_yaml())
  bar = tqdm(total=cfg.train.steps, initial=start, disable=jax.process_index() != 0,
             dynamic_ncols=True, desc=cfg.mode)
  cleanup.callback(bar.close)
  return logger, bar


class _Pending(NamedTuple):
  """A dispatched step whose metrics are not fetched yet."""

  step: int  # the steps done once it is (1-based: what is logged and saved)
  metrics: dict[str, jax.Array]  # on the device
  host: dict[str, float]  # the stage's metrics of making the batch
  batch_time: float  # seconds making the batch on the host (GRPO: rollouts, rewards)
  dispatched: float  # time.perf_counter() when its updates were dispatched


@dataclasses.dataclass
class _StepLoop:
  """`run`'s step loop and what it carries from step to step: the train state, the metrics of
  every finished step and when the last one finished."""

  tr: ml_collections.ConfigDict  # cfg.train
  stage: Stage
  compiled: Callable  # the train step: (state, batch, rng) -> (state, metrics)
  ckpt: Checkpointer
  logger: MetricsLogger
  bar: tqdm
  mesh: jax.sharding.Mesh
  rules: Any
  base_rng: jax.Array  # update u draws with fold_in(base_rng, u)
  state: dict
  history: list[dict[str, float]] = dataclasses.field(default_factory=list)
  last_time: float = dataclasses.field(default_factory=time.perf_counter)

  def train(self, start: int) -> int | None:
    """Runs steps `start` .. train.steps - 1, saving a checkpoint every train.save_every steps,
    after the last and after the step during which a stop request came; returns that stopped
    step (its checkpoint saved), or None once every step ran. A step's loss is checked before
    its state is saved; otherwise step N-1's metrics are fetched once step N is dispatched
    (`Stage.pipelined`)."""
    tr, stage = self.tr, self.stage
    pending = None
    with stop_requests() as stop:
      step = start
      while step < tr.steps:
        dispatched = self._dispatch(step)
        step += 1
        if pending is not None:
          self._finish(pending)  # step - 1, fetched while step runs
        pending = dispatched
        if (not stage.pipelined or step % tr.save_every == 0 or step == tr.steps
            or stop["flag"]):
          self._finish(pending)  # and never save a state whose loss was not checked
          pending = None
        # the flag is read again: a request may have come while the metrics were fetched
        if step % tr.save_every == 0 or step == tr.steps or stop["flag"]:
          self.ckpt.save(step, self.state, stage.iterator)
          if stop["flag"]:
            return step
    return None

  def _dispatch(self, step: int) -> _Pending:
    """Makes the batch of `step` (0-based) and dispatches its updates to the device, which
    runs them while the host goes on."""
    t_batch = time.perf_counter()
    local, host = self.stage.next_batch(self.state, step)
    batch = sharding.global_batch(local, self.mesh, leading=1, rules=self.rules)
    dispatched = time.perf_counter()
    updates = self.stage.updates_per_batch
    for mu in range(updates):
      rng = jax.random.fold_in(self.base_rng, step * updates + mu)
      self.state, metrics = self.compiled(self.state, batch, rng)
    return _Pending(step + 1, metrics, host, dispatched - t_batch, dispatched)

  def _finish(self, pending: _Pending) -> None:
    """Fetches a dispatched step's metrics (blocking until it is done), checks, logs them."""
    step, device_metrics, host, batch_time, dispatched = pending
    m = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    # the loss is of the weights before the step's update, param_norm of those after it: a
    # step whose update made them NaN or infinite is caught here, before any save or export
    bad = None
    numbers = (f"loss {m['loss']:.4g}, grad_norm {m.get('grad_norm', math.nan):.4g}, "
               f"lr {m.get('lr', math.nan):.4g}")
    if not np.isfinite(m["loss"]):
      bad = f"loss is {m['loss']} at step {step}"
    elif m.get("params_finite", 1.0) != 1.0:
      bad = f"the weights are not finite after the update of step {step} ({numbers})"
    elif not np.isfinite(m.get("param_norm", 0.0)):  # finite, but beyond float32's range squared
      bad = (f"the weights' norm overflows after the update of step {step} (param_norm "
             f"{m['param_norm']}: the run diverged; {numbers})")
    m.pop("params_finite", None)
    if bad is not None:
      self.ckpt.wait()  # the last good checkpoint may still be being written: finish it first
      last = self.ckpt.latest_step()
      where = (f"The last good checkpoint is step {last} in {self.ckpt.directory}"
               if last is not None else f"No checkpoint was saved yet in {self.ckpt.directory}")
      raise NonFiniteError(f"{bad}: stopping before they are saved. {where}; lower optim.lr "
                           "or check the data.")
    now = time.perf_counter()
    dt, self.last_time = now - self.last_time, now
    m["step_time"] = dt
    m["batch_time"] = batch_time
    if not self.stage.pipelined:  # fetched right after dispatch: the updates' own time
      m["update_time"] = now - dispatched
    m["tokens_per_sec"] = m.pop("valid_tokens") / dt if dt > 0 else 0.0
    m.update(host)
    if step % self.tr.log_every == 0 or step == self.tr.steps:
      self.logger.write(step, m)
    self.history.append(m)
    self.bar.set_postfix({k: f"{m[k]:.4g}" for k in ("loss", "reward", "accuracy",
                                                     "tokens_per_sec") if k in m})
    self.bar.update(1)


def _summary(tr: ml_collections.ConfigDict, start: int, history: list[dict[str, float]],
             export_dir: str, t0: float, mem: dict[str, int], stage: Stage) -> dict:
  """The dict `run` returns: the steps (all, and trained in this run), the last step's
  metrics, the export directory, the seconds since `t0`, the compiled step's memory and the
  stage's own entries."""
  return {"steps": tr.steps, "start_step": start, "trained_steps": tr.steps - start,
          "final_loss": history[-1]["loss"] if history else None,
          "last": history[-1] if history else {}, "export": export_dir,
          "seconds": time.perf_counter() - t0, "compiled_memory": mem, **stage.summary()}


def run(cfg: ml_collections.ConfigDict, workdir: str | None,
        make_stage: Callable[[Setup], Stage]) -> dict:
  """Runs (or resumes) the training stage `make_stage` builds; returns a summary dict.

  The run's counts (`TRAIN_COUNTS`) are checked first, before anything is loaded or compiled.
  Resuming from a checkpoint at step train.steps trains nothing: it says so ("already done")
  and exports that checkpoint again; a checkpoint past train.steps (the run trained further
  than this config asks) raises ValueError, since no step-train.steps model is left to export.
  """
  if not workdir:
    raise ConfigError(f"mode {cfg.mode!r} needs --workdir (checkpoints, logs and the export go "
                     "there)")
  check_counts(cfg, TRAIN_COUNTS)
  check_optim(cfg.optim)
  t0 = time.perf_counter()
  tr = cfg.train
  setup = make_setup(cfg)
  model_cfg, lattice = setup.model.config, setup.model.lattice
  tokenizer, mesh = setup.tokenizer, setup.mesh
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
    start, state = _resume_or_init(cfg, workdir, setup.model, trainer, ckpt, stage.iterator)
    if start == tr.steps:  # a finished run's command again: nothing to train or compile
      log0(f"already done: step {start} >= train.steps={tr.steps} in {ckpt.directory}; "
           "nothing to train (raise train.steps to continue); exporting that checkpoint")
      export_dir = export(setup.model, state["params"], tokenizer, workdir)
      return _summary(tr, start, [], export_dir, t0, {}, stage)
    compiled, mem = _compile(cfg, trainer, stage, mesh)
    logger, bar = _open_logs(cfg, workdir, start, cleanup)
    step_loop = _StepLoop(tr, stage, compiled, ckpt, logger, bar, mesh, rules,
                          jax.random.key(cfg.seed), state)
    del state  # the loop replaces it step by step: no reference here keeps the first one alive
    preempted_at = step_loop.train(start)
  if preempted_at is not None:
    log0(f"stopped at step {preempted_at} on request; checkpoint saved in {ckpt.directory}. "
         "Run the same command to resume.")
    raise SystemExit(143)
  export_dir = export(setup.model, step_loop.state["params"], tokenizer, workdir)
  summary = _summary(tr, start, step_loop.history, export_dir, t0, mem, stage)
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


@jax.jit
def _all_finite(params: Params) -> Params:
  return jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), params)


def _finite_leaves(params: Params) -> dict[str, bool]:
  """{parameter path: all its values finite}, computed where the parameters live."""
  flags = jax.device_get(_all_finite(params))
  return {jax.tree_util.keystr(p, simple=True, separator="/"): bool(v)
          for p, v in jax.tree_util.tree_flatten_with_path(flags)[0]}


def export(model: Model, params: Params, tokenizer: Tokenizer, workdir: str) -> str:
  """Writes WORKDIR/export (an HF directory + tokenizer.json); all processes must call it
  (the parameters are gathered across hosts), process 0 writes."""
  export_dir = os.path.join(workdir, "export")
  bad = [k for k, ok in _finite_leaves(params).items() if not ok]
  if bad:
    raise NonFiniteError(f"not exporting to {export_dir}: {len(bad)} parameters are not finite "
                         f"({', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''})")
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
