"""Lattice GRPO (spec section 6, stage 3): the math as small pure functions.

Symbols: a question q has G rollouts; rollout i is one W-thread lattice with reward r_i.
  group advantage (GRPO):     A_i = (r_i - mean_j r_j) / (std_j r_j + eps)
  group advantage (Dr.GRPO):  A_i = r_i - mean_j r_j
Thread-aggregated (default): every token of every thread of rollout i carries A_i.
Per-thread: thread w of rollout i has its own reward r_iw, normalised over the G*W threads of
the question.
  ratio      rho_t = exp(log pi(a_t) - log pi_old(a_t))
  surrogate  L_t = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A)
  k3 KL      KL_t = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1
  loss       token-mean of L_t + beta KL_t over generated tokens (token_mean), or their sum
             divided by (rollouts x W x max new tokens) (dr_grpo: a constant normaliser)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lace_jax.model import Model, Params

ADVANTAGES = ("grpo", "dr_grpo")
AGGREGATIONS = ("token_mean", "dr_grpo")


def group_advantages(rewards: jax.Array, *, kind: str = "grpo", eps: float = 1e-6) -> jax.Array:
  """rewards [Q, G, ...] -> advantages of the same shape, normalised over every axis after Q
  (the G rollouts, and their W threads for per-thread rewards)."""
  if kind not in ADVANTAGES:
    raise ValueError(f"advantage kind {kind!r}; expected one of {ADVANTAGES}")
  axes = tuple(range(1, rewards.ndim))
  centred = rewards - jnp.mean(rewards, axis=axes, keepdims=True)
  if kind == "dr_grpo":
    return centred
  return centred / (jnp.std(rewards, axis=axes, keepdims=True) + eps)


def clipped_surrogate(logp: jax.Array, old_logp: jax.Array, adv: jax.Array, *, eps_low: float,
                      eps_high: float) -> tuple[jax.Array, jax.Array]:
  """Per-token (loss L_t, clipped indicator); all arrays broadcast to the token shape."""
  ratio = jnp.exp(logp - old_logp)
  unclipped = ratio * adv
  clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
  return -jnp.minimum(unclipped, clipped), (clipped < unclipped).astype(jnp.float32)


def k3_kl(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
  """Schulman's k3 estimator of KL(pi || pi_ref) per token: non-negative, unbiased."""
  d = ref_logp - logp
  return jnp.exp(d) - d - 1.0


def diversity(mean_hidden: np.ndarray) -> np.ndarray:
  """[..., W, D] thread embeddings -> [...] mean over thread pairs of (1 - cosine); 0 at W=1."""
  h = mean_hidden / np.maximum(np.linalg.norm(mean_hidden, axis=-1, keepdims=True), 1e-12)
  w = h.shape[-2]
  if w < 2:
    return np.zeros(h.shape[:-2])
  cos = np.einsum("...wd,...vd->...wv", h, h)
  iu = np.triu_indices(w, 1)
  return np.mean(1.0 - cos[..., iu[0], iu[1]], axis=-1)


def token_logprobs(model: Model, params: Params, batch: dict) -> tuple[jax.Array, jax.Array]:
  """(log pi(target) [B, W, T], entropy [B, W, T]) of the policy on the batch's grid."""
  logits = model.apply(params, batch["tokens"], valid=batch["valid"])
  logp_all = jax.nn.log_softmax(logits)
  logp = jnp.take_along_axis(logp_all, batch["targets"][..., None], -1)[..., 0]
  entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
  return logp, entropy


def make_loss(*, eps_low: float, eps_high: float, kl_beta: float, aggregation: str,
              max_new_tokens: int):
  """The GRPO LossFn for `Trainer.step_fn`. Batch (per rollout r, thread w, column t):
  tokens, valid, targets, loss_mask [R, W, T]; old_logp, ref_logp [R, W, T];
  advantages [R, W] (thread-aggregated rewards repeat A_i over w)."""
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"grpo.loss_agg={aggregation!r}; expected one of {AGGREGATIONS}")

  def loss(model: Model, params: Params, batch: dict):
    logp, entropy = token_logprobs(model, params, batch)
    mask = batch["loss_mask"].astype(jnp.float32)
    adv = batch["advantages"][..., None]  # [R, W, 1]
    per_token, clipped = clipped_surrogate(logp, batch["old_logp"], adv, eps_low=eps_low,
                                           eps_high=eps_high)
    kl = k3_kl(logp, batch["ref_logp"])
    if kl_beta:
      per_token = per_token + kl_beta * kl
    if aggregation == "token_mean":
      count = jnp.sum(mask)
    else:
      r, w = mask.shape[:2]
      count = jnp.asarray(r * w * max_new_tokens, jnp.float32)
    tokens = jnp.maximum(jnp.sum(mask), 1.0)
    # metrics are divided by `count` by the step; rescale so they are per-token means
    per_tok = lambda x: jnp.sum(x * mask) * count / tokens
    aux = {"kl": per_tok(kl), "clip_fraction": per_tok(clipped), "entropy": per_tok(entropy)}
    return jnp.sum(per_token * mask), count, aux

  return loss


# ----------------------------------------------------------------------------------------------
# Rewards and the loop: `python -m lace_jax.main --config=experiments/grpo_*.py --workdir=DIR`

REWARD_MODES = ("thread_aggregated", "per_thread")


def lattice_rewards(texts: list[list[str]], golds: list[str], mean_hidden: np.ndarray, grader, *,
                    lambda_div: float, mode: str) -> dict[str, np.ndarray]:
  """Rewards of R rollouts (W thread texts each). thread_aggregated: r_i = accuracy of the
  [[best]] answer (0 on a format failure) + lambda_div * diversity_i, shape [R]; per_thread:
  r_iw = correctness of thread w's own answer + lambda_div * diversity_i, shape [R, W]."""
  from lace_jax import grading
  if mode not in REWARD_MODES:
    raise ValueError(f"grpo.reward_mode={mode!r}; expected one of {REWARD_MODES}")
  parsed = [grading.parse_lattice(t) for t in texts]
  system = grader.grade_many([(p.answer if p.format_ok else None, g)
                              for p, g in zip(parsed, golds)])
  div = diversity(mean_hidden)
  out = {"accuracy": np.asarray(system, np.float32),
         "format": np.asarray([p.format_ok for p in parsed], np.float32), "diversity": div}
  if mode == "thread_aggregated":
    out["reward"] = out["accuracy"] + lambda_div * div
  else:
    threads = grader.grade_many([(a, g) for p, g in zip(parsed, golds) for a in p.answers])
    per = np.asarray(threads, np.float32).reshape(len(texts), -1)
    out["thread_accuracy"] = per
    out["reward"] = per + lambda_div * div[:, None]
  return out


def question_order(num: int, step: int, per_step: int, seed: int) -> list[int]:
  """Indices of the questions of `step`: epochs of seeded permutations, a pure function of the
  step, so a resumed run draws the same questions."""
  out = []
  for j in range(step * per_step, (step + 1) * per_step):
    epoch, pos = divmod(j, num)
    out.append(int(np.random.default_rng([seed, epoch]).permutation(num)[pos]))
  return out


def run(cfg, workdir: str | None) -> dict:
  """Lattice GRPO: rollouts with the lockstep sampler, verified rewards, sharded updates."""
  import os
  import time

  from tqdm import tqdm

  from lace_jax import experiment, grading, sharding
  from lace_jax.training import trainer as train
  from lace_jax.training.checkpointer import Checkpointer
  from lace_jax.training.metrics import MetricsLogger
  from lace_jax.sampling import full_grid, sample
  from lace_jax.tokenizer import instruction_template, thread_prompts

  if not workdir:
    raise ValueError("mode 'grpo' needs --workdir")
  g, tr, d = cfg.grpo, cfg.train, cfg.data
  model_cfg, lattice = experiment.model_configs(cfg)
  tokenizer, _ = experiment.resolve_tokenizer(cfg)
  questions = grading.read_problems(d.path)
  w, gsize, nq = d.num_threads, g.rollouts_per_question, tr.batch_size
  template = instruction_template(d.instruction)

  def prompts_of(q):
    return tokenizer.encode_batch(thread_prompts(q.problem, w, thinking=d.thinking,
                                                 instruction=template))

  mesh = sharding.make_mesh(dict(cfg.sharding.mesh))
  rules = sharding.rules_with_overrides(cfg.sharding.rules)
  rollouts = nq * gsize
  train._check_batch(rollouts, tr.grad_accum, mesh)
  trainer = train.Trainer.create(model_cfg, lattice, cfg.optim,
                                 total_steps=tr.steps * g.inner_updates, trainable=tr.trainable,
                                 mesh=mesh, rules=rules)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tr.keep_checkpoints,
                      async_save=tr.async_checkpointing)
  start = ckpt.latest_step()
  if start is not None:
    state = ckpt.restore(start, trainer.abstract_state(), None)
    print(f"resumed from step {start} ({ckpt.directory})", flush=True)
  else:
    start = 0
    loaded = experiment.load_checkpoint(cfg, model_cfg, lattice)
    state = trainer.init_state(cfg.seed, loaded.params if loaded else None)
  ref_params = jax.device_get(state["params"]) if g.kl_beta else None
  model = trainer.model
  prompt_len = d.max_len  # fixed prompt width: one compiled sampler and step for the whole run
  total_len = prompt_len + g.max_new_tokens
  accum = tr.grad_accum
  shapes = {k: jax.ShapeDtypeStruct((accum, rollouts // accum, w, total_len), dt) for k, dt in (
      ("tokens", jnp.int32), ("valid", jnp.bool_), ("targets", jnp.int32),
      ("loss_mask", jnp.bool_), ("old_logp", jnp.float32), ("ref_logp", jnp.float32))}
  shapes["advantages"] = jax.ShapeDtypeStruct((accum, rollouts // accum, w), jnp.float32)
  loss = make_loss(eps_low=g.eps_low, eps_high=g.eps_high, kl_beta=g.kl_beta,
                   aggregation=g.loss_agg, max_new_tokens=g.max_new_tokens)
  step_fn, mem = trainer.compile(shapes, loss)
  print(f"mesh {sharding.describe(mesh)}; compiled GRPO step memory: "
        + ", ".join(f"{k}={v / 2**20:.1f}MiB" for k, v in mem.items() if "code" not in k),
        flush=True)
  logp_fn = jax.jit(lambda p, b: token_logprobs(model, p, b)[0])

  logger = MetricsLogger(workdir, resume_from_step=start)
  bar = tqdm(total=tr.steps, initial=start, desc="grpo", dynamic_ncols=True,
             disable=jax.process_index() != 0)
  summary = {}
  try:
    with train.stop_requests() as stop, grading.Grader(num_workers=g.grader_workers,
                                                       timeout_s=g.grader_timeout_s) as grader:
      for step in range(start, tr.steps):
        t0 = time.perf_counter()
        qs = [questions[i] for i in question_order(len(questions), step, nq, cfg.seed)]
        prompt_ids = [ids for ids in map(prompts_of, qs) for _ in range(gsize)]
        if max(len(x) for p in prompt_ids for x in p) > prompt_len:
          raise ValueError(f"a prompt is longer than data.max_len={prompt_len} tokens; raise it")
        out = sample(model, state["params"], prompt_ids, num_threads=w,
                     max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                     top_k=g.top_k, seed=cfg.seed * 100_003 + step,
                     stop_ids=(tokenizer.im_end_id,), pad_id=tokenizer.pad_id,
                     prompt_width=prompt_len)
        texts = out.texts(tokenizer)
        rollout_s = time.perf_counter() - t0
        r = lattice_rewards(texts, [q.answer for q in qs for _ in range(gsize)],
                            out.mean_hidden, grader, lambda_div=g.lambda_div, mode=g.reward_mode)
        rewards = r["reward"].reshape(nq, gsize, *r["reward"].shape[1:])
        adv = np.asarray(group_advantages(jnp.asarray(rewards), kind=g.advantage))
        adv = adv.reshape(rollouts, -1)
        adv = np.broadcast_to(adv, (rollouts, w)) if adv.shape[1] == 1 else adv
        tokens, valid = full_grid(out)
        targets = np.concatenate([tokens[:, :, 1:], np.zeros_like(tokens[:, :, :1])], -1)
        gen = np.zeros_like(valid)
        gen[:, :, prompt_len - 1:-1] = valid[:, :, prompt_len:]  # targets that are generated
        batch = {"tokens": tokens, "valid": valid, "targets": targets, "loss_mask": gen}
        old_logp = np.asarray(logp_fn(state["params"], batch))
        batch["old_logp"] = old_logp
        batch["ref_logp"] = np.asarray(logp_fn(ref_params, batch)) if g.kl_beta else old_logp
        batch["advantages"] = adv.astype(np.float32)
        local = {k: np.asarray(v).reshape(accum, rollouts // accum, *np.shape(v)[1:])
                 for k, v in batch.items()}
        t1 = time.perf_counter()
        for mu in range(g.inner_updates):
          state, metrics = step_fn(state, sharding.global_batch(local, mesh, leading=1),
                                   jax.random.key(step * 1000 + mu))
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not np.isfinite(metrics["loss"]):
          ckpt.wait()
          raise FloatingPointError(f"GRPO loss is {metrics['loss']} at step {step + 1}; the last "
                                   f"good checkpoint is step {ckpt.latest_step()}")
        row = {"reward": float(r["reward"].mean()), "accuracy": float(r["accuracy"].mean()),
               "format_rate": float(r["format"].mean()),
               "diversity": float(r["diversity"].mean()), "kl": metrics["kl"],
               "clip_fraction": metrics["clip_fraction"], "entropy": metrics["entropy"],
               "response_length": float(out.lengths.mean()), "loss": metrics["loss"],
               "grad_norm": metrics["grad_norm"], "lr": metrics["lr"],
               "rollout_time": rollout_s, "update_time": time.perf_counter() - t1,
               "grader_timeouts": float(grader.stats.get("timeouts", 0))}
        logger.write(step + 1, row)
        summary = row
        bar.set_postfix(reward=f"{row['reward']:.3f}", acc=f"{row['accuracy']:.2f}",
                        fmt=f"{row['format_rate']:.2f}")
        bar.update(1)
        if (step + 1) % tr.save_every == 0 or step + 1 == tr.steps or stop["flag"]:
          ckpt.save(step + 1, state, None)
        if stop["flag"]:
          ckpt.close()
          print(f"stopped at step {step + 1} on request; rerun the same command to resume",
                flush=True)
          raise SystemExit(143)
  except BaseException:
    ckpt.close()  # never leave a half-written checkpoint behind an error
    logger.close()
    raise
  finally:
    bar.close()
  ckpt.close()
  logger.close()
  export_dir = train.export_model(model_cfg, lattice, state["params"], tokenizer, workdir)
  return {"steps": tr.steps, "last": summary, "export": export_dir}
