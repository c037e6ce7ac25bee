"""Lattice GRPO as a stage of the run loop (`lace_jax.training.loop`).

  python -m lace_jax.main --config=experiments/grpo_*.py --workdir=DIR

Each step: `grpo.questions_per_step` questions (a seeded permutation per epoch, a pure function
of the step, so a resumed run draws the same ones), G = `grpo.rollouts_per_question` rollouts
of each with the lockstep sampler on the current parameters (one rollout = one W-thread
lattice), verified rewards (`lace_jax.rl.grpo.lattice_rewards`), group advantages, the old and
reference log-probabilities; then `grpo.inner_updates` optimizer updates on that batch.
Rollout statistics (reward, accuracy, format rate, diversity, response length, rollout time)
are logged beside the update's metrics.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lace_jax import experiment, grading, sharding
from lace_jax.model import Model
from lace_jax.rl import grpo
from lace_jax.sampling import full_grid, sample
from lace_jax.tokenizer import Tokenizer, instruction_template, thread_prompts
from lace_jax.training import loop


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
  ref_params: Any  # None unless grpo.kl_beta > 0
  iterator = None
  rows_key = "grpo.questions_per_step x grpo.rollouts_per_question"
  pipelined = False  # rollouts need the updated parameters anyway
  # derived from cfg in __post_init__
  loss: Any = dataclasses.field(init=False)
  rows: int = dataclasses.field(init=False)
  batch_shapes: dict = dataclasses.field(init=False)
  updates_per_batch: int = dataclasses.field(init=False)

  def __post_init__(self):
    g, d, tr = self.cfg.grpo, self.cfg.data, self.cfg.train
    self.rows = g.questions_per_step * g.rollouts_per_question
    self.updates_per_batch = g.inner_updates
    self.loss = grpo.make_loss(eps_low=g.eps_low, eps_high=g.eps_high, kl_beta=g.kl_beta,
                               aggregation=g.loss_agg, max_new_tokens=g.max_new_tokens)
    a, w, t = tr.grad_accum, d.num_threads, d.prompt_len + g.max_new_tokens
    self.batch_shapes = {k: jax.ShapeDtypeStruct((a, self.rows // a, w, t), dt) for k, dt in (
        ("tokens", jnp.int32), ("valid", jnp.bool_), ("targets", jnp.int32),
        ("loss_mask", jnp.bool_), ("old_logp", jnp.float32), ("ref_logp", jnp.float32))}
    self.batch_shapes["advantages"] = jax.ShapeDtypeStruct((a, self.rows // a, w), jnp.float32)
    model = self.model
    self._logp = jax.jit(lambda p, b: grpo.token_logprobs(model, p, b)[0])

  def next_batch(self, state: dict, step: int) -> tuple[dict[str, np.ndarray], dict]:
    cfg, g, d = self.cfg, self.cfg.grpo, self.cfg.data
    t0 = time.perf_counter()
    gsize, nq, w, p = g.rollouts_per_question, g.questions_per_step, d.num_threads, d.prompt_len
    picked = question_order(len(self.questions), step, nq, cfg.seed)
    qs = [self.questions[i] for i in picked]
    prompt_ids = [self.prompts[i] for i in picked for _ in range(gsize)]
    out = sample(self.model, state["params"], prompt_ids, num_threads=w,
                 max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                 top_k=g.top_k, seed=cfg.seed * 100_003 + step,
                 stop_ids=(self.tokenizer.im_end_id,), pad_id=self.tokenizer.pad_id,
                 prompt_width=p)
    rollout_s = time.perf_counter() - t0
    r = grpo.lattice_rewards(out.texts(self.tokenizer),
                             [q.answer for q in qs for _ in range(gsize)], out.mean_hidden,
                             self.grader, lambda_div=g.lambda_div, mode=g.reward_mode)
    rewards = r["reward"].reshape(nq, gsize, *r["reward"].shape[1:])
    adv = np.asarray(grpo.group_advantages(jnp.asarray(rewards), kind=g.advantage))
    adv = adv.reshape(self.rows, -1)
    adv = np.broadcast_to(adv, (self.rows, w)) if adv.shape[1] == 1 else adv
    tokens, valid = full_grid(out)
    targets = np.concatenate([tokens[:, :, 1:], np.zeros_like(tokens[:, :, :1])], -1)
    gen = np.zeros_like(valid)
    gen[:, :, p - 1:-1] = valid[:, :, p:]  # targets that are generated
    batch = {"tokens": tokens, "valid": valid, "targets": targets, "loss_mask": gen}
    batch["old_logp"] = np.asarray(self._logp(state["params"], batch))
    batch["ref_logp"] = (np.asarray(self._logp(self.ref_params, batch))
                         if self.ref_params is not None else batch["old_logp"])
    batch["advantages"] = adv.astype(np.float32)
    a = cfg.train.grad_accum
    local = {k: np.asarray(v).reshape(a, self.rows // a, *np.shape(v)[1:])
             for k, v in batch.items()}
    host = {"reward": float(r["reward"].mean()), "accuracy": float(r["accuracy"].mean()),
            "format_rate": float(r["format"].mean()), "diversity": float(r["diversity"].mean()),
            "response_length": float(out.lengths.mean()), "rollout_time": rollout_s,
            "grader_timeouts": float(self.grader.stats.get("timeouts", 0))}
    return local, host

  def summary(self) -> dict:
    return {}

  def close(self) -> None:
    self.grader.close()


def make_stage(setup: loop.Setup) -> GRPOStage:
  cfg, tok = setup.cfg, setup.tokenizer
  g, d = cfg.grpo, cfg.data
  if jax.process_count() > 1:
    raise NotImplementedError("grpo rollouts are sampled on one process; multi-host GRPO needs "
                              "the sampler's batch split over processes")
  questions = grading.read_problems(d.path)
  template = instruction_template(d.instruction)
  prompts = [tok.encode_batch(thread_prompts(q.problem, d.num_threads, thinking=d.thinking,
                                             instruction=template)) for q in questions]
  longest = max(len(x) for p in prompts for x in p)
  if longest > d.prompt_len:
    raise ValueError(f"a prompt of {d.path} has {longest} tokens, more than data.prompt_len="
                     f"{d.prompt_len}; raise it")
  ref = None
  if g.kl_beta:  # the frozen reference: the weights the run started from (also on a resume)
    ref = experiment.load_or_init(cfg, setup.model.config, setup.model.lattice)[1]
    rules = sharding.rules_with_overrides(cfg.sharding.rules)
    ref = jax.device_put(ref, sharding.logical_to_sharding(setup.model.logical_axes(),
                                                           setup.mesh, rules))
  grader = grading.Grader(num_workers=g.grader_workers, timeout_s=g.grader_timeout_s)
  return GRPOStage(cfg, setup.model, tok, questions, prompts, grader, ref)


def run(cfg: ml_collections.ConfigDict, workdir: str | None) -> dict:
  """Mode `grpo`."""
  return loop.run(cfg, workdir, make_stage)
