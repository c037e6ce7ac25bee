"""The sharded train step of every stage (CPT, SFT, Lattice GRPO): `Trainer`.

The step is one pure function `train_step(state, batch, rng) -> (state, metrics)`, jitted with
explicit in/out shardings and a donated state, and compiled ahead of time (its
`memory_analysis()` is logged before the loop). The state is created already sharded:
`eval_shape` -> shardings -> jitted init, with no host-side full copy of a fresh model.

Batch arrays are [A, B/A, W, T]: A = gradient-accumulation microbatches (a `lax.scan`), B the
global batch of examples, W threads, T tokens. A stage's `LossFn` returns sums and a
normaliser; the step divides the sums over the whole global batch by the summed normaliser, so
accumulation and sharding change nothing but the summation order. The loop that drives it is
`lace_jax.training.loop`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from lace_jax import sharding
from lace_jax.config import LatticeConfig, ModelConfig
from lace_jax.errors import ConfigError
from lace_jax.model import Model, Params, abstract_params, init_params, is_lattice_param

TRAINABLE = ("all", "lattice")


def trainable_labels(params: Params, trainable: str) -> Params:
  """"train" / "frozen" per parameter."""
  if trainable not in TRAINABLE:
    raise ConfigError(f"train.trainable={trainable!r}; expected one of {TRAINABLE}")
  return jax.tree_util.tree_map_with_path(
      lambda p, _: "train" if trainable == "all" or is_lattice_param(p) else "frozen", params)


# The optimizer's numbers: (key, lower bound, bound included, upper bound or None, what it is).
OPTIM_NUMBERS = (
    ("lr", 0.0, False, None, "the peak learning rate"),
    ("warmup_steps", 0, True, None, "linear warmup steps (an int)"),
    ("min_lr_ratio", 0.0, True, 1.0, "the cosine decay's end, as a fraction of lr"),
    ("weight_decay", 0.0, True, None, "AdamW's decoupled weight decay"),
    ("clip_norm", 0.0, True, None, "the global gradient-norm clip (0 = no clipping)"),
    ("b1", 0.0, True, 1.0, "Adam's first-moment decay, below 1"),
    ("b2", 0.0, True, 1.0, "Adam's second-moment decay, below 1"),
    ("eps", 0.0, False, None, "Adam's epsilon"),
    ("lattice_lr_multiplier", 0.0, False, None, "the lattice's learning-rate factor"),
)


def check_optim(optim: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first `optim.*` number that is not finite or is out of its
  range (`OPTIM_NUMBERS`); run before anything is loaded or compiled, so a bad value costs no
  compile and never reaches the weights."""
  for key, low, closed, high, meaning in OPTIM_NUMBERS:
    if key not in optim:
      continue
    v = optim[key]
    integral = key == "warmup_steps"
    kind = isinstance(v, int) if integral else isinstance(v, (int, float))
    ok = (kind and not isinstance(v, bool) and math.isfinite(v)
          and (v >= low if closed else v > low)
          and (high is None or v < high or (key == "min_lr_ratio" and v <= high)))
    if not ok:
      lo = f"{'>=' if closed else '>'} {low:g}"
      hi = "" if high is None else f" and {'<=' if key == 'min_lr_ratio' else '<'} {high:g}"
      raise ConfigError(f"optim.{key}={v!r}; expected a finite "
                        f"{'int' if integral else 'number'} {lo}{hi} ({meaning})")


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int, labels: Params,
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (decay on matrices only) with linear warmup + cosine decay and global-norm
  clipping; frozen parameters get exactly zero updates and carry no optimizer state. The
  lattice's updates are scaled by `optim.lattice_lr_multiplier` (its learning rate x that;
  at 1.0, the default, the transformation and its state are exactly the plain AdamW's)."""
  warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
  base = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=optim.lr * optim.min_lr_ratio)
  schedule = lambda count: base(count + 1)  # the first update already moves: lr = peak / warmup
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
  check_optim(optim)
  clip = [optax.clip_by_global_norm(optim.clip_norm)] if optim.clip_norm > 0 else []
  tx = optax.chain(
      *clip,
      optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                  weight_decay=optim.weight_decay, mask=decay_mask))
  multiplier = optim.get("lattice_lr_multiplier", 1.0)
  if multiplier != 1.0:
    lattice_mask = lambda params: jax.tree_util.tree_map_with_path(
        lambda p, _: is_lattice_param(p), params)
    tx = optax.chain(tx, optax.masked(optax.scale(float(multiplier)), lattice_mask))
  tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule


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

  def step_fn(self, loss: LossFn) -> Callable:
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
                 # 1.0 while every updated weight is finite: the loop saves nothing otherwise
                 "params_finite": jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in
                                                     jax.tree.leaves(new_params)])
                                          ).astype(jnp.float32),
                 **{k: v / denom for k, v in a_sum.items()}}
      return {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}, metrics

    return sharding.with_rules(train_step, self.rules)  # activations constrained by the rules

  def jit_step(self, batch_shapes: dict[str, jax.ShapeDtypeStruct], loss: LossFn):
    """(the jitted step with its shardings, its abstract arguments (state, batch, rng)) for
    these [A, B, ...] batch shapes (batch axis 1 sharded): what `compile` and the plan mode
    (`lace_jax.plan`) compile, with nothing allocated."""
    rep = sharding.replicated(self.mesh)
    batch_sh = {k: sharding.batch_sharding(self.mesh, len(v.shape), leading=1, rules=self.rules)
                for k, v in batch_shapes.items()}
    jitted = jax.jit(self.step_fn(loss), in_shardings=(self.state_sharding, batch_sh, rep),
                     out_shardings=(self.state_sharding, rep), donate_argnums=(0,))
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh[k])
             for k, v in batch_shapes.items()}
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep)
    return jitted, (self.abstract_state(), batch, rng)

  def compile(self, batch_shapes: dict[str, jax.ShapeDtypeStruct], loss: LossFn):
    """AOT-compiles the step for these [A, B, ...] batch shapes (batch axis 1 sharded);
    returns (compiled, memory stats dict)."""
    jitted, args = self.jit_step(batch_shapes, loss)
    with jax.set_mesh(self.mesh):  # kernels see the mesh (`lace_jax.kernels.batch_parallel`)
      compiled = jitted.trace(*args).lower().compile()
    return compiled, memory_stats(compiled)


def memory_stats(compiled) -> dict[str, int]:
  m = compiled.memory_analysis()
  if m is None:
    return {}
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "alias_size_in_bytes", "generated_code_size_in_bytes")
  return {f: int(getattr(m, f)) for f in fields if hasattr(m, f)}


def check_batch(batch_size: int, accum: int, mesh: Mesh, *, name: str = "train.batch_size",
                rules: Sequence[tuple[str, Any]] | None = None) -> None:
  """Raises ValueError unless `batch_size` rows split into `accum` microbatches that divide
  over the batch axes of `mesh` (by `rules`) and over the processes."""
  axes = sharding.batch_axes(rules)
  data_ways = sharding.batch_ways(mesh, rules)
  if batch_size % accum:
    raise ConfigError(f"{name}={batch_size} is not divisible by train.grad_accum={accum}")
  if (batch_size // accum) % data_ways:
    raise ConfigError(f"microbatch {batch_size // accum} ({name} / grad_accum) is not "
                     f"divisible by the {data_ways} ways of the batch axes {axes}")
  if batch_size % jax.process_count():
    raise ConfigError(f"{name}={batch_size} is not divisible by the "
                     f"{jax.process_count()} processes")
