"""Sharded training: continued pre-training (stage 1) and SFT (stage 2).

The step is one pure function `train_step(state, batch, rng) -> (state, metrics)`, jitted with
explicit in/out shardings and a donated state, and compiled ahead of time (its
`memory_analysis()` is logged before the loop). The state is created already sharded:
`eval_shape` -> shardings -> jitted init, with no host-side full copy of a fresh model.

Batch arrays are [A, B/A, W, T]: A = gradient-accumulation microbatches (a `lax.scan`), B the
global batch of examples, W threads, T tokens. The loss is the mean over every target token of
the global batch, so accumulation and sharding change nothing but the summation order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from lace_jax import sharding
from lace_jax.config import LatticeConfig, ModelConfig
from lace_jax.model import Model, Params, abstract_params, init_params, is_lattice_param

log = logging.getLogger(__name__)

TRAINABLE = ("all", "lattice")


def trainable_labels(params: Params, trainable: str) -> Params:
  """"train" / "frozen" per parameter."""
  if trainable not in TRAINABLE:
    raise ValueError(f"train.trainable={trainable!r}; expected one of {TRAINABLE}")
  return jax.tree_util.tree_map_with_path(
      lambda p, _: "train" if trainable == "all" or is_lattice_param(p) else "frozen", params)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int, labels: Params,
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (decay on matrices only) with linear warmup + cosine decay and global-norm
  clipping; frozen parameters get exactly zero updates and carry no optimizer state."""
  warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
  base = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=optim.lr * optim.min_lr_ratio)
  schedule = lambda count: base(count + 1)  # the first update already moves: lr = peak / warmup
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
  tx = optax.chain(
      optax.clip_by_global_norm(optim.clip_norm),
      optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                  weight_decay=optim.weight_decay, mask=decay_mask))
  tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule


def token_loss(model: Model, params: Params, batch: dict[str, jax.Array]
               ) -> tuple[jax.Array, jax.Array]:
  """(sum of next-token cross-entropy over loss_mask, number of loss tokens) of [B, W, T]."""
  logits = model.apply(params, batch["tokens"], valid=batch["valid"])  # [B, W, T, V] float32
  logz = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
  mask = batch["loss_mask"].astype(jnp.float32)
  return jnp.sum((logz - target_logit) * mask), jnp.sum(mask)


def sft_loss(model: Model, params: Params, batch: dict[str, jax.Array]):
  """The LossFn of pretrain / sft: (loss sum, normaliser, {} extra metric sums)."""
  total, count = token_loss(model, params, batch)
  return total, count, {}


# A LossFn maps (model, params, microbatch) to (loss sum, normaliser, {name: metric sum}); the
# step divides the sums over all microbatches by the summed normaliser, so accumulation is
# exact. Metrics are reported as sum / normaliser as well.
LossFn = Callable[[Model, Params, dict], tuple[jax.Array, jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class Trainer:
  """The model, optimizer and shardings of one run; builds the jitted step and state."""

  model: Model
  tx: optax.GradientTransformation
  labels: Params
  mesh: Mesh
  rules: tuple
  state_sharding: Any
  schedule: optax.Schedule

  @classmethod
  def create(cls, model_cfg: ModelConfig, lattice: LatticeConfig | None,
             optim: ml_collections.ConfigDict, *, total_steps: int, trainable: str, mesh: Mesh,
             rules: tuple) -> Trainer:
    model = Model(model_cfg, lattice)
    shapes = abstract_params(model_cfg, lattice)
    labels = trainable_labels(shapes, trainable)
    tx, schedule = make_optimizer(optim, total_steps, labels)
    params_sh = sharding.logical_to_sharding(model.logical_axes(), mesh, rules)
    sharding.check_divisible(shapes, params_sh)
    opt_shapes = jax.eval_shape(tx.init, shapes)
    state_sh = {"step": sharding.replicated(mesh), "params": params_sh,
                "opt_state": sharding.like_params(opt_shapes, params_sh, mesh)}
    return cls(model, tx, labels, mesh, rules, state_sh, schedule)

  def abstract_state(self) -> Any:
    shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32),
              "params": abstract_params(self.model.config, self.model.lattice)}
    shapes["opt_state"] = jax.eval_shape(self.tx.init, shapes["params"])
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, self.state_sharding)

  def init_state(self, seed: int, params: Params | None = None) -> Any:
    """A sharded train state: fresh parameters from `seed`, or `params` (e.g. loaded from a
    checkpoint) placed onto the mesh."""
    if params is None:
      cfg, lat = self.model.config, self.model.lattice

      def init():
        p = init_params(cfg, lat, seed)
        return {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": self.tx.init(p)}

      return jax.jit(init, out_shardings=self.state_sharding)()
    params = jax.device_put(params, self.state_sharding["params"])
    opt_state = jax.jit(self.tx.init, out_shardings=self.state_sharding["opt_state"])(params)
    return {"step": jax.device_put(jnp.zeros((), jnp.int32), self.state_sharding["step"]),
            "params": params, "opt_state": opt_state}

  def step_fn(self, loss: LossFn = sft_loss) -> Callable:
    model, tx, labels, schedule = self.model, self.tx, self.labels, self.schedule

    def train_step(state, batch, rng):
      del rng  # no dropout; kept in the signature for stochastic variants
      params = state["params"]
      frozen = jax.tree.map(lambda l: l == "frozen", labels)

      def loss_fn(p, micro):
        # frozen parameters get no gradient computation at all
        p = jax.tree.map(lambda x, f: jax.lax.stop_gradient(x) if f else x, p, frozen)
        total, count, aux = loss(model, p, micro)
        return total, (count, aux)

      grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
      _, (_, aux_shape) = jax.eval_shape(loss_fn, params, jax.tree.map(lambda x: x[0], batch))

      def accumulate(carry, micro):
        g_sum, l_sum, n_sum, a_sum = carry
        (l, (n, aux)), g = grad_fn(params, micro)
        return (jax.tree.map(jnp.add, g_sum, g), l_sum + l, n_sum + n,
                jax.tree.map(jnp.add, a_sum, aux)), None

      zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params)
      a_zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), aux_shape)
      (g_sum, l_sum, n_sum, a_sum), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0, a_zeros),
                                                     batch)
      denom = jnp.maximum(n_sum, 1e-9)
      grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), g_sum, params)
      updates, opt_state = tx.update(grads, state["opt_state"], params)
      new_params = optax.apply_updates(params, updates)
      trained = jax.tree.map(lambda g, f: jnp.zeros_like(g) if f else g, grads, frozen)
      metrics = {"loss": l_sum / denom, "tokens": n_sum, "valid_tokens": jnp.sum(batch["valid"]),
                 "grad_norm": optax.tree.norm(trained), "lr": schedule(state["step"]),
                 "param_norm": optax.tree.norm(new_params),
                 **{k: v / denom for k, v in a_sum.items()}}
      return {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}, metrics

    return train_step

  def compile(self, batch_shapes: dict[str, jax.ShapeDtypeStruct], loss: LossFn = sft_loss):
    """AOT-compiles the step for these [A, B, ...] batch shapes (batch axis 1 sharded);
    returns (compiled, memory stats dict)."""
    rep = sharding.replicated(self.mesh)
    batch_sh = {k: sharding.batch_sharding(self.mesh, len(v.shape), leading=1)
                for k, v in batch_shapes.items()}
    jitted = jax.jit(self.step_fn(loss), in_shardings=(self.state_sharding, batch_sh, rep),
                     out_shardings=(self.state_sharding, rep), donate_argnums=(0,))
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh[k])
             for k, v in batch_shapes.items()}
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep)
    compiled = jitted.trace(self.abstract_state(), batch, rng).lower().compile()
    return compiled, memory_stats(compiled)


def memory_stats(compiled) -> dict[str, int]:
  m = compiled.memory_analysis()
  if m is None:
    return {}
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "alias_size_in_bytes", "generated_code_size_in_bytes")
  return {f: int(getattr(m, f)) for f in fields if hasattr(m, f)}


# ----------------------------------------------------------------------------------------------
# The loop: `python -m lace_jax.main --config=experiments/{pretrain,sft}_*.py --workdir=DIR`


class _Preempted(Exception):
  pass


def _check_batch(batch_size: int, accum: int, mesh: Mesh) -> None:
  data_ways = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % accum:
    raise ValueError(f"train.batch_size={batch_size} is not divisible by train.grad_accum={accum}")
  if (batch_size // accum) % data_ways:
    raise ValueError(f"microbatch {batch_size // accum} (train.batch_size / grad_accum) is not "
                     f"divisible by the data-parallel ways data*fsdp = {data_ways}")
  if batch_size % jax.process_count():
    raise ValueError(f"train.batch_size={batch_size} is not divisible by the "
                     f"{jax.process_count()} processes")


def run(cfg: ml_collections.ConfigDict, workdir: str | None) -> dict:
  """Runs (or resumes) a pretrain / sft job; returns a summary dict."""
  import numpy as np
  from tqdm import tqdm

  from lace_jax import data as data_lib
  from lace_jax import experiment
  from lace_jax.training.checkpointer import Checkpointer
  from lace_jax.training.metrics import MetricsLogger

  if not workdir:
    raise ValueError(f"mode {cfg.mode!r} needs --workdir (checkpoints, logs and the export go "
                     "there)")
  t0 = time.perf_counter()
  model_cfg, lattice = experiment.model_configs(cfg)
  tokenizer, tok_path = experiment.resolve_tokenizer(cfg)
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ValueError(f"tokenizer {tok_path} has {tokenizer.vocab_size} tokens but the model's "
                     f"vocab_size is {model_cfg.vocab_size}")
  d, tr = cfg.data, cfg.train
  examples, report = data_lib.load_examples(
      d.path, tokenizer, num_threads=d.num_threads, max_len=d.max_len, fmt=d.format,
      instruction=d.instruction, thinking=d.thinking, truncate=d.truncate,
      bad_records=d.bad_records)
  _log0(report.summary())

  mesh = sharding.make_mesh(dict(cfg.sharding.mesh))
  rules = sharding.rules_with_overrides(cfg.sharding.rules)
  _check_batch(tr.batch_size, tr.grad_accum, mesh)
  trainer = Trainer.create(model_cfg, lattice, cfg.optim, total_steps=tr.steps,
                           trainable=tr.trainable, mesh=mesh, rules=rules)
  iterator = iter(data_lib.make_dataset(
      examples, batch_size=tr.batch_size // jax.process_count(), max_len=d.max_len,
      pad_id=tokenizer.pad_id, loss_on=d.loss_on, shuffle_threads=d.shuffle_threads,
      seed=cfg.seed, process_index=jax.process_index(), process_count=jax.process_count()))

  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tr.keep_checkpoints,
                      async_save=tr.async_checkpointing)
  start = ckpt.latest_step()
  if start is not None:
    state = ckpt.restore(start, trainer.abstract_state(), iterator)
    _log0(f"resumed from step {start} ({ckpt.directory})")
  else:
    start = 0
    loaded = experiment.load_checkpoint(cfg, model_cfg, lattice)
    state = trainer.init_state(cfg.seed, loaded)

  accum = tr.grad_accum
  local_b = tr.batch_size // jax.process_count()
  shapes = {k: jax.ShapeDtypeStruct((accum, tr.batch_size // accum, d.num_threads, d.max_len),
                                    jnp.int32 if k in ("tokens", "targets") else jnp.bool_)
            for k in ("tokens", "valid", "targets", "loss_mask")}
  compiled, mem = trainer.compile(shapes)
  _log0(f"mesh {sharding.describe(mesh)}; compiled train step memory: "
        + ", ".join(f"{k}={v / 2**20:.1f}MiB" for k, v in mem.items() if "code" not in k))

  logger = MetricsLogger(workdir, resume_from_step=start)
  logger.write_text("config", str(cfg))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.yaml"), "w") as f:
      f.write(cfg.to_yaml())
  def next_batch():
    local = next(iterator)
    local = {k: v.reshape(accum, local_b // accum, *v.shape[1:]) for k, v in local.items()}
    return sharding.global_batch(local, mesh, leading=1)

  bar = tqdm(total=tr.steps, initial=start, disable=jax.process_index() != 0,
             dynamic_ncols=True, desc=cfg.mode)
  base_rng = jax.random.key(cfg.seed)
  pending = None  # (step, device metrics) of the step in flight
  last_time = time.perf_counter()
  history = []

  def finish(pending):
    step, m = pending
    m = {k: float(v) for k, v in jax.device_get(m).items()}  # blocks until the step is done
    now = time.perf_counter()
    if not np.isfinite(m["loss"]):
      ckpt.wait()  # the last good checkpoint may still be being written: finish it first
      raise FloatingPointError(
          f"loss is {m['loss']} at step {step}: stopping. The last good checkpoint is step "
          f"{ckpt.latest_step()} in {ckpt.directory}; lower optim.lr or check the data.")
    nonlocal last_time
    dt = now - last_time
    last_time = now
    m["step_time"] = dt
    m["tokens_per_sec"] = m.pop("valid_tokens") / dt if dt > 0 else 0.0
    if step % tr.log_every == 0 or step == tr.steps:
      logger.write(step, m)
    history.append((step, m["loss"]))
    bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_sec']:.0f}",
                    step_s=f"{dt:.2f}")
    bar.update(1)

  try:
    with stop_requests() as preempted:
      step = start
      while step < tr.steps:
        batch = next_batch()
        state, metrics = compiled(state, batch, jax.random.fold_in(base_rng, step))
        step += 1
        if pending is not None:
          finish(pending)  # step - 1, fetched while step runs
        pending = (step, metrics)
        if step % tr.save_every == 0 or step == tr.steps or preempted["flag"]:
          finish(pending)  # never save a state whose loss was not checked
          pending = None
          ckpt.save(step, state, iterator)
          if preempted["flag"]:
            raise _Preempted(step)
      if pending is not None:
        finish(pending)
  except _Preempted as e:
    ckpt.close()
    bar.close()
    logger.close()
    _log0(f"stopped at step {e.args[0]} on request; checkpoint saved in {ckpt.directory}. "
          "Run the same command to resume.")
    raise SystemExit(143)
  except BaseException:
    ckpt.close()  # never leave a half-written checkpoint behind an error
    bar.close()
    logger.close()
    raise
  bar.close()
  ckpt.close()
  logger.close()
  export_dir = export_model(model_cfg, lattice, state["params"], tokenizer, workdir)
  summary = {"steps": tr.steps, "start_step": start, "final_loss": history[-1][1] if history
             else None, "export": export_dir, "data": report.summary(),
             "seconds": time.perf_counter() - t0, "compiled_memory": mem}
  _log0(f"done: {summary['steps']} steps, final loss {summary['final_loss']}, exported to "
        f"{export_dir} ({summary['seconds']:.0f}s)")
  return summary


def export_model(model_cfg: ModelConfig, lattice: LatticeConfig | None, params: Params,
                 tokenizer, workdir: str) -> str:
  """Writes WORKDIR/export (an HF directory + tokenizer.json); all processes must call it
  (the parameters are gathered across hosts), process 0 writes."""
  from lace_jax.hf_io import save_pretrained
  export_dir = os.path.join(workdir, "export")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    params = multihost_utils.process_allgather(params, tiled=True)
  if jax.process_index() == 0:
    save_pretrained(Model(model_cfg, lattice), jax.device_get(params), export_dir)
    tokenizer.save(os.path.join(export_dir, "tokenizer.json"))
  return export_dir


@contextlib.contextmanager
def stop_requests():
  """Yields a dict whose "flag" turns True on SIGTERM / SIGINT (main thread only), so a loop
  can checkpoint at the next step boundary; the previous handlers are restored on exit."""
  flag = {"flag": False}

  def on_signal(signum, frame):
    del frame
    flag["flag"] = True
    _log0(f"received signal {signum}: saving a checkpoint after this step")

  old = {}
  if threading.current_thread() is threading.main_thread():
    for sig in (signal.SIGTERM, signal.SIGINT):
      old[sig] = signal.signal(sig, on_signal)
  try:
    yield flag
  finally:
    for sig, handler in old.items():
      signal.signal(sig, handler)


def _log0(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)
