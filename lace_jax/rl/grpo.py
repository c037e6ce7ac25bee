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

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lace_jax import grading, losses
from lace_jax.errors import ConfigError
from lace_jax.model import Model, Params

# Advantage estimators and loss aggregations are small registered functions, chosen by name
# (`grpo.advantage`, `grpo.loss_agg`); a new variant is one decorated function.
ADVANTAGE_ESTIMATORS: dict[str, Callable[..., jax.Array]] = {}
LOSS_AGGREGATIONS: dict[str, Callable[..., jax.Array]] = {}


def _registrar(table: dict):
  def register_as(name: str):
    def register(fn):
      table[name] = fn
      return fn
    return register
  return register_as


register_advantage_estimator = _registrar(ADVANTAGE_ESTIMATORS)
register_loss_aggregation = _registrar(LOSS_AGGREGATIONS)


def _lookup(table: dict, name: str, key: str):
  if name not in table:
    raise ConfigError(f"{key} {name!r}; expected one of {tuple(table)}")
  return table[name]


@register_advantage_estimator("grpo")
def grpo_advantage(rewards: jax.Array, axes: tuple[int, ...], eps: float) -> jax.Array:
  """A_i = (r_i - mean_j r_j) / (std_j r_j + eps) over the group axes."""
  centred = rewards - jnp.mean(rewards, axis=axes, keepdims=True)
  return centred / (jnp.std(rewards, axis=axes, keepdims=True) + eps)


@register_advantage_estimator("dr_grpo")
def dr_grpo_advantage(rewards: jax.Array, axes: tuple[int, ...], eps: float) -> jax.Array:
  """Dr.GRPO: A_i = r_i - mean_j r_j (no division by the group's std)."""
  del eps
  return rewards - jnp.mean(rewards, axis=axes, keepdims=True)


def group_advantages(rewards: jax.Array, *, kind: str = "grpo", eps: float = 1e-6) -> jax.Array:
  """rewards [Q, G, ...] -> advantages of the same shape, normalised over every axis after Q
  (the G rollouts, and their W threads for per-thread rewards), by the registered `kind`."""
  estimator = _lookup(ADVANTAGE_ESTIMATORS, kind, "advantage kind (grpo.advantage)")
  return estimator(rewards, tuple(range(1, rewards.ndim)), eps)


@register_loss_aggregation("token_mean")
def token_mean_normaliser(mask: jax.Array, max_new_tokens: int) -> jax.Array:
  """The number of generated tokens in the batch: the loss is a token mean."""
  del max_new_tokens
  return jnp.sum(mask)


@register_loss_aggregation("dr_grpo")
def dr_grpo_normaliser(mask: jax.Array, max_new_tokens: int) -> jax.Array:
  """Dr.GRPO's constant: rollouts x W x max new tokens, whatever the lengths."""
  r, w = mask.shape[:2]
  return jnp.asarray(r * w * max_new_tokens, jnp.float32)


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


def token_logprobs(model: Model, params: Params, batch: dict, *, chunk: int = losses.DEFAULT_CHUNK,
                   over: str = "vocab"
                   ) -> tuple[jax.Array, jax.Array]:
  """(log pi(target) [B, W, T], entropy [B, W, T]) of the policy on the batch's grid; the
  vocabulary projection runs `chunk` rows of V (or positions of T, `over`) at a time
  (`lace_jax.losses`), so the float32 [B, W, T, V] logits never exist (chunk <= 0: dense)."""
  hidden = model.hidden_states(params, batch["tokens"], valid=batch["valid"])
  return losses.token_logprobs(hidden, model.unembed(params), batch["targets"], chunk=chunk,
                               over=over)


def make_loss(*, eps_low: float, eps_high: float, kl_beta: float, aggregation: str,
              max_new_tokens: int, logits_chunk: int = losses.DEFAULT_CHUNK, logits_over: str = "vocab"):
  """The GRPO LossFn for `Trainer.step_fn`. Batch (per rollout r, thread w, column t):
  tokens, valid, targets, loss_mask [R, W, T]; old_logp, ref_logp [R, W, T];
  advantages [R, W] (thread-aggregated rewards repeat A_i over w)."""
  normaliser = _lookup(LOSS_AGGREGATIONS, aggregation, "loss aggregation (grpo.loss_agg)")

  def loss(model: Model, params: Params, batch: dict):
    logp, entropy = token_logprobs(model, params, batch, chunk=logits_chunk, over=logits_over)
    mask = batch["loss_mask"].astype(jnp.float32)
    adv = batch["advantages"][..., None]  # [R, W, 1]
    per_token, clipped = clipped_surrogate(logp, batch["old_logp"], adv, eps_low=eps_low,
                                           eps_high=eps_high)
    kl = k3_kl(logp, batch["ref_logp"])
    if kl_beta:
      per_token = per_token + kl_beta * kl
    count = normaliser(mask, max_new_tokens)  # [R, W, T] mask -> the loss's denominator
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
  if mode not in REWARD_MODES:
    raise ConfigError(f"grpo.reward_mode={mode!r}; expected one of {REWARD_MODES}")
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
