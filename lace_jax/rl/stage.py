"""Lattice GRPO as a stage of the run loop (`lace_jax.training.loop`).

  python -m lace_jax.main --config=experiments/grpo_*.py --workdir=DIR

Each step: `grpo.questions_per_step` questions (a seeded permutation per epoch, a pure function
of the step, so a resumed run draws the same ones), G = `grpo.rollouts_per_question` rollouts
of each through the generation engine (`lace_jax.engine`: a slot per rollout, refilled as
lattices finish, a question's prompt prefilled once) on the current parameters (one rollout =
one W-thread lattice), verified rewards (`lace_jax.rl.grpo.lattice_rewards`), group advantages, the old and
reference log-probabilities; then `grpo.inner_updates` optimizer updates on that batch.

On several processes (hosts) the step is one SPMD program: each process takes its block of the
step's questions (`questions_per_step / blocks` whole question groups, all G rollouts x W
threads of a question on one host; `sharding.process_share`), generates them with every other
process in the same engine calls, grades its own rollouts in its own grader pool and computes
their group advantages; the log-probabilities stay on the devices and the rollout statistics
are reduced across processes (process 0 writes them). The numbers do not depend on the process
count: the same global arrays, the same draws.
Rollout statistics (reward, accuracy, format rate, diversity, response length, rollout time)
are logged beside the update's metrics; at each logged step also the thread-level lattice
diagnostics (`lace_jax.diagnostics`: lattice/cross_thread, lattice/entropy, lattice/gate, each
per lattice layer too) of the step's first `grpo.diagnostics_rollouts` rollouts (0: the first
group of G; < 0: none), under the parameters that generated them.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from lace_jax import engine, grading, sharding
from lace_jax.diagnostics import lattice_diagnostics
from lace_jax.errors import ConfigError
from lace_jax.model import Model, init_params
from lace_jax.rl import grpo
from lace_jax.sampling import SampleOutput, full_grid
from lace_jax.tokenizer import Tokenizer, instruction_template, thread_prompts
from lace_jax.training import loop
from lace_jax.training.setup import Setup, load_checkpoint


def question_order(num: int, step: int, per_step: int, seed: int) -> list[int]:
  """Indices of the questions of `step`: epochs of seeded permutations, a pure function of the
  step, so a resumed run draws the same questions."""
  out = []
  for j in range(step * per_step, (step + 1) * per_step):
    epoch, pos = divmod(j, num)
    out.append(int(np.random.default_rng([seed, epoch]).permutation(num)[pos]))
  return out


@dataclasses.dataclass
class GRPOStage:
  """A `loop.Stage`: batches are rollouts of the current policy."""

  cfg: ml_collections.ConfigDict
  model: Model
  tokenizer: Tokenizer
  questions: list[grading.Problem]
  prompts: list[list[list[int]]]  # per question, W token-id lists
  grader: grading.Grader
  ref_params: Any  # None unless grpo.kl_beta > 0; sharded on the mesh like the state's
  mesh: jax.sharding.Mesh
  share: sharding.ProcessShare  # this process's block of each step's batch
  iterator = None
  rows_key = "grpo.questions_per_step x grpo.rollouts_per_question"
  pipelined = False  # rollouts need the updated parameters anyway
  # derived from cfg in __post_init__
  loss: Any = dataclasses.field(init=False)
  rows: int = dataclasses.field(init=False)
  batch_shapes: dict = dataclasses.field(init=False)
  updates_per_batch: int = dataclasses.field(init=False)

  def __post_init__(self):
    g = self.cfg.grpo
    self.rows = g.questions_per_step * g.rollouts_per_question
    self.updates_per_batch = g.inner_updates
    self.loss = make_loss(self.cfg)
    self.batch_shapes = batch_shapes(self.cfg)
    self.rules = sharding.rules_with_overrides(self.cfg.sharding.rules)
    self._logp = None
    self._engine = None  # made at the first step (`rollouts`)
    if logprob_passes(self.cfg):
      self._logp, self._logp_micro = jit_logprobs(self.cfg, self.model, self.mesh, self.rules)

  def logprobs(self, params, batch: dict[str, np.ndarray]) -> np.ndarray:
    """Teacher-forced log pi(target) [r, W, T] of this process's r rollouts under `params`
    (sharded on the mesh), in micro-batches of `grpo.logprob_batch` rollouts of the global
    batch (micro-batch i: the i-th slice of every batch shard, `sharding.split_rows`)."""
    m, shards = self._logp_micro, self.share.shards
    local = {k: sharding.split_rows(batch[k], m, shards) for k in ("tokens", "valid", "targets")}
    with jax.set_mesh(self.mesh):  # kernels see the mesh (`lace_jax.kernels.batch_parallel`)
      out = self._logp(params, sharding.global_batch(local, self.mesh, leading=1,
                                                     rules=self.rules))
    return sharding.merge_rows(sharding.process_rows(out, leading=1), shards)

  def rollouts(self, params, picked: list[int], step: int) -> SampleOutput:
    """G rollouts of each of this process's questions `picked` (the step's questions from
    global index `share.rows(questions_per_step).start`), through the generation engine:
    `grpo.rollout_batch` slots (0: every rollout of the step at once), a question's prompt
    prefilled once for its G rollouts, each rollout's draws keyed by (seed, step, its index in
    the step's global batch), so they do not depend on the process count or on the slots."""
    cfg, g, d = self.cfg, self.cfg.grpo, self.cfg.data
    gsize = g.rollouts_per_question
    if self._engine is None:
      self._engine = engine.Engine(
          self.model, params, slots=g.rollout_batch or self.rows, num_threads=d.num_threads,
          max_prompt_len=d.prompt_len, max_new_tokens=g.max_new_tokens,
          stop_ids=(self.tokenizer.im_end_id,), pad_id=self.tokenizer.pad_id,
          decode_chunk=g.decode_chunk, prompt_store=g.questions_per_step, mesh=self.mesh,
          rules=self.rules)
    self._engine.params = params
    first = self.share.rows(g.questions_per_step).start * gsize
    seed = lambda i: int(np.random.SeedSequence([cfg.seed, step, first + i]).generate_state(1)[0])
    requests = [engine.Request(self.prompts[q], g.max_new_tokens, temperature=g.temperature,
                               top_p=g.top_p, top_k=g.top_k, seed=seed(i))
                for i, q in enumerate(q for q in picked for _ in range(gsize))]
    return engine.as_sample_output(self._engine.generate(requests), width=d.prompt_len,
                                   max_new_tokens=g.max_new_tokens,
                                   pad_id=self.tokenizer.pad_id)

  def next_batch(self, state: dict, step: int) -> tuple[dict[str, np.ndarray], dict]:
    cfg, g, d = self.cfg, self.cfg.grpo, self.cfg.data
    t0 = time.perf_counter()
    gsize, w, p = g.rollouts_per_question, d.num_threads, d.prompt_len
    # this process's block of the step's questions: whole groups of G rollouts
    picked = question_order(len(self.questions), step, g.questions_per_step,
                            cfg.seed)[self.share.rows(g.questions_per_step)]
    nq, rows = len(picked), len(picked) * gsize
    qs = [self.questions[i] for i in picked]
    out = self.rollouts(state["params"], picked, step)
    rollout_s = time.perf_counter() - t0
    r = grpo.lattice_rewards(out.texts(self.tokenizer),
                             [q.answer for q in qs for _ in range(gsize)], out.mean_hidden,
                             self.grader, lambda_div=g.lambda_div, mode=g.reward_mode)
    rewards = r["reward"].reshape(nq, gsize, *r["reward"].shape[1:])
    adv = np.asarray(grpo.group_advantages(jnp.asarray(rewards), kind=g.advantage))
    adv = adv.reshape(rows, -1)
    adv = np.broadcast_to(adv, (rows, w)) if adv.shape[1] == 1 else adv
    tokens, valid = full_grid(out)
    targets = np.concatenate([tokens[:, :, 1:], np.zeros_like(tokens[:, :, :1])], -1)
    gen = np.zeros_like(valid)
    gen[:, :, p - 1:-1] = valid[:, :, p:]  # targets that are generated
    batch = {"tokens": tokens, "valid": valid, "targets": targets, "loss_mask": gen}
    if g.inner_updates > 1:  # the policy moves between updates: score it once, teacher-forced
      batch["old_logp"] = self.logprobs(state["params"], batch)
    else:  # one update: the sampler's own log-probs are the old policy's
      batch["old_logp"] = sampler_logprobs_grid(out)
    batch["ref_logp"] = (self.logprobs(self.ref_params, batch) if self.ref_params is not None
                         else batch["old_logp"])
    batch["advantages"] = adv.astype(np.float32)
    # micro-batch i of the update: the i-th slice of every batch shard (`sharding.split_rows`)
    local = {k: sharding.split_rows(np.asarray(v), cfg.train.grad_accum, self.share.shards)
             for k, v in batch.items()}
    host = reduce_across_processes(
        {"reward": float(r["reward"].mean()), "accuracy": float(r["accuracy"].mean()),
         "format_rate": float(r["format"].mean()), "diversity": float(r["diversity"].mean()),
         "response_length": float(out.lengths.mean())},
        maximum={"rollout_time": rollout_s,
                 "grader_timeouts": float(self.grader.stats.get("timeouts", 0))})
    host["sampler_rows"] = float(rows)  # this process's share of the sampler batch
    n = diagnostics_rollouts(cfg)
    logged = (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps
    # a fixed slice of every logged step: one compilation, a bounded cost. The first n rollouts
    # of the global batch, scored on every process (replicated)
    if n and logged and self.model.lattice is not None:
      t1 = time.perf_counter()
      first = [sharding.first_rows(x, n, self.share) for x in (tokens, valid)]
      host.update(lattice_diagnostics(self.model, state["params"], *first, mesh=self.mesh,
                                      rules=self.rules))
      host["diagnostics_time"] = time.perf_counter() - t1
    return local, host

  def summary(self) -> dict:
    return {}

  def close(self) -> None:
    self.grader.close()


def reduce_across_processes(mean: dict[str, float],
                            maximum: dict[str, float]) -> dict[str, float]:
  """Host statistics of this process's block -> the step's: `mean` entries averaged over the
  processes (their blocks are equal), `maximum` entries the largest (a time: the slowest host;
  a count: the worst host's). Every process gets the same values; one process: unchanged."""
  if jax.process_count() == 1:
    return {**mean, **maximum}
  keys = list(mean) + list(maximum)
  table = np.asarray(multihost_utils.process_allgather(
      np.asarray([mean[k] for k in mean] + [maximum[k] for k in maximum], np.float64)))
  out = {k: float(table[:, i].mean()) for i, k in enumerate(mean)}
  out.update({k: float(table[:, len(mean) + i].max()) for i, k in enumerate(maximum)})
  return {k: out[k] for k in keys}


def diagnostics_rollouts(cfg: ml_collections.ConfigDict) -> int:
  """Rollouts scored for the lattice diagnostics at a logged step (0 if none)."""
  g = cfg.grpo
  n = g.get("diagnostics_rollouts", 0)
  if n < 0:
    return 0
  return min(n or g.rollouts_per_question, g.questions_per_step * g.rollouts_per_question)


def batch_shapes(cfg: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
  """A step's global batch, [A, R/A, W, T] per array (R = questions x rollouts, T = prompt +
  new tokens); advantages [A, R/A, W]."""
  g, d, tr = cfg.grpo, cfg.data, cfg.train
  rows = g.questions_per_step * g.rollouts_per_question
  a, w, t = tr.grad_accum, d.num_threads, d.prompt_len + g.max_new_tokens
  shapes = {k: jax.ShapeDtypeStruct((a, rows // a, w, t), dt) for k, dt in (
      ("tokens", jnp.int32), ("valid", jnp.bool_), ("targets", jnp.int32),
      ("loss_mask", jnp.bool_), ("old_logp", jnp.float32), ("ref_logp", jnp.float32))}
  shapes["advantages"] = jax.ShapeDtypeStruct((a, rows // a, w), jnp.float32)
  return shapes


def make_loss(cfg: ml_collections.ConfigDict):
  g = cfg.grpo
  return grpo.make_loss(eps_low=g.eps_low, eps_high=g.eps_high, kl_beta=g.kl_beta,
                        aggregation=g.loss_agg, max_new_tokens=g.max_new_tokens,
                        logits_chunk=cfg.train.logits_chunk,
                        logits_over=cfg.train.logits_chunk_over)


def logprob_passes(cfg: ml_collections.ConfigDict) -> int:
  """Teacher-forced log-prob passes per step: the old policy's when inner_updates > 1, the
  reference's when kl_beta > 0."""
  return int(cfg.grpo.inner_updates > 1) + int(bool(cfg.grpo.kl_beta))


def _logprob_micro(cfg: ml_collections.ConfigDict) -> int:
  """Micro-batches of one log-prob pass."""
  g = cfg.grpo
  rows = g.questions_per_step * g.rollouts_per_question
  per = g.logprob_batch or rows // cfg.train.grad_accum
  if per <= 0 or rows % per:
    raise ConfigError(f"grpo.logprob_batch={g.logprob_batch}: {rows} rollouts per step do not "
                     f"split into passes of {per}")
  return rows // per


def jit_logprobs(cfg: ml_collections.ConfigDict, model: Model, mesh, rules):
  """(jitted f(params, batch [M, R/M, W, T]) -> log pi(target) [M, R/M, W, T], M): the
  teacher-forced pass, one micro-batch after another (`lax.map`), batch axis 1 sharded over
  data/fsdp, the params as the train state's."""
  chunk, over, m = cfg.train.logits_chunk, cfg.train.logits_chunk_over, _logprob_micro(cfg)

  def logprobs(params, batch):
    one = lambda b: grpo.token_logprobs(model, params, b, chunk=chunk, over=over)[0]
    return jax.lax.map(one, batch)

  params_sh = sharding.logical_to_sharding(model.logical_axes(), mesh, rules)
  batch_sh = sharding.batch_sharding(mesh, 4, leading=1, rules=rules)
  jitted = jax.jit(sharding.with_rules(logprobs, rules), in_shardings=(params_sh, batch_sh),
                   out_shardings=batch_sh)
  return jitted, m


def abstract_logprob_call(cfg: ml_collections.ConfigDict, model: Model, mesh, rules, params):
  """(jitted, abstract args, arg groups, micro-batches) of the log-prob pass, for the plan."""
  jitted, m = jit_logprobs(cfg, model, mesh, rules)
  g, d = cfg.grpo, cfg.data
  rows = g.questions_per_step * g.rollouts_per_question
  shape = (m, rows // m, d.num_threads, d.prompt_len + g.max_new_tokens)
  sh = sharding.batch_sharding(mesh, 4, leading=1, rules=rules)
  batch = {"tokens": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sh),
           "valid": jax.ShapeDtypeStruct(shape, jnp.bool_, sharding=sh),
           "targets": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sh)}
  return jitted, (params, batch), {"params": params, "batch": batch}, m


def sampler_logprobs_grid(out) -> np.ndarray:
  """The sampler's log-probs of its tokens (temperature 1, unfiltered), placed where the
  teacher-forced pass puts them: [R, W, P + N], column p - 1 + i scoring generated token i."""
  r, w, p = out.prompt_tokens.shape
  grid = np.zeros((r, w, p + out.tokens.shape[-1]), np.float32)
  gen_valid = np.arange(out.tokens.shape[-1])[None, None] < out.lengths[..., None]
  grid[:, :, p - 1:-1] = np.where(gen_valid, out.logprobs, 0.0)
  return grid


def make_stage(setup: Setup) -> GRPOStage:
  cfg, tok = setup.cfg, setup.tokenizer
  g, d = cfg.grpo, cfg.data
  rules = sharding.rules_with_overrides(cfg.sharding.rules)
  share = sharding.process_share(setup.mesh, rules)
  if g.questions_per_step % share.blocks:
    raise ConfigError(f"grpo.questions_per_step={g.questions_per_step} does not split into "
                     f"{share.blocks} equal blocks, one per process (each process generates "
                     "and grades whole question groups); make it a multiple of "
                     f"{share.blocks}")
  per = g.questions_per_step // share.blocks
  print(f"process {jax.process_index()} of {jax.process_count()}: question block {share.index} "
        f"of {share.blocks}, {per} questions x {g.rollouts_per_question} rollouts = "
        f"{per * g.rollouts_per_question} of the {g.questions_per_step * g.rollouts_per_question}"
        " rollouts (sampler rows) of each step", flush=True)
  questions = grading.read_problems(d.path)
  template = instruction_template(d.instruction)
  prompts = [tok.encode_batch(thread_prompts(q.problem, d.num_threads, thinking=d.thinking,
                                             instruction=template)) for q in questions]
  longest = max(len(x) for p in prompts for x in p)
  if longest > d.prompt_len:
    raise ConfigError(f"a prompt of {d.path} has {longest} tokens, more than data.prompt_len="
                     f"{d.prompt_len}; raise it")
  ref = None
  if g.kl_beta:  # the frozen reference: the weights the run started from (also on a resume),
    # placed once on the mesh with the state's shardings and kept there
    shardings = sharding.logical_to_sharding(setup.model.logical_axes(), setup.mesh, rules)
    ref = load_checkpoint(cfg, setup.model.config, setup.model.lattice)
    if ref is None:  # fresh weights: made sharded on the devices, as the train state's are
      m = setup.model
      ref = jax.jit(lambda: init_params(m.config, m.lattice, cfg.seed), out_shardings=shardings)()
    else:
      ref = sharding.place(ref, shardings)
  grader = grading.Grader(num_workers=g.grader_workers, timeout_s=g.grader_timeout_s)
  return GRPOStage(cfg, setup.model, tok, questions, prompts, grader, ref, setup.mesh, share)


def run(cfg: ml_collections.ConfigDict, workdir: str | None) -> dict:
  """Mode `grpo`."""
  loop.check_counts(cfg, {"grpo.questions_per_step": "questions per optimizer step",
                          "grpo.rollouts_per_question": "rollouts G of each question",
                          "grpo.max_new_tokens": "tokens each thread may generate",
                          "grpo.inner_updates": "optimizer updates per batch of rollouts",
                          "data.num_threads": "threads W of each rollout",
                          "data.prompt_len": "prompt width P"})
  return loop.run(cfg, workdir, make_stage)
