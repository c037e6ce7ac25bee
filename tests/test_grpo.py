"""Lattice GRPO math against hand-computed values, and the loss wiring."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from lace_jax.rl import grpo
from lace_jax.rl import stage as rl_stage


def test_group_advantages_by_hand():
  rewards = jnp.array([[1.0, 0.0, 0.0, 1.0], [0.2, 0.2, 0.2, 0.2]])  # [Q=2, G=4]
  a = np.asarray(grpo.group_advantages(rewards, eps=0.0 + 1e-12))
  # question 0: mean 0.5, std 0.5 -> +-1; question 1: all equal -> 0
  np.testing.assert_allclose(a[0], [1, -1, -1, 1], atol=1e-6)
  np.testing.assert_allclose(a[1], 0.0, atol=1e-6)
  dr = np.asarray(grpo.group_advantages(rewards, kind="dr_grpo"))
  np.testing.assert_allclose(dr[0], [0.5, -0.5, -0.5, 0.5], atol=1e-7)
  # per-thread rewards [Q, G, W] normalise over the G*W threads of a question
  per = jnp.array([[[1.0, 0.0], [0.0, 0.0]]])
  mean, std = 0.25, math.sqrt(0.1875)
  np.testing.assert_allclose(np.asarray(grpo.group_advantages(per, eps=0.0)),
                             [[[(1 - mean) / std, -mean / std], [-mean / std, -mean / std]]],
                             atol=1e-6)
  with pytest.raises(ValueError, match="advantage kind"):
    grpo.group_advantages(rewards, kind="ppo")


def test_clipped_surrogate_by_hand():
  old = jnp.zeros(4)
  logp = jnp.log(jnp.array([1.5, 1.5, 0.5, 1.1]))
  adv = jnp.array([1.0, -1.0, -1.0, 1.0])
  loss, clipped = grpo.clipped_surrogate(logp, old, adv, eps_low=0.2, eps_high=0.28)
  # ratio 1.5, A=+1: min(1.5, 1.28) -> -1.28 (clipped); ratio 1.5, A=-1: min(-1.5, -1.28) -> 1.5
  # ratio 0.5, A=-1: min(-0.5, -0.8) -> 0.8 (clipped); ratio 1.1, A=+1: inside -> -1.1
  np.testing.assert_allclose(np.asarray(loss), [-1.28, 1.5, 0.8, -1.1], atol=1e-6)
  np.testing.assert_array_equal(np.asarray(clipped), [1, 0, 1, 0])


def test_k3_kl_by_hand():
  kl = grpo.k3_kl(jnp.log(jnp.array([0.5, 0.3])), jnp.log(jnp.array([0.25, 0.3])))
  np.testing.assert_allclose(np.asarray(kl), [0.5 + math.log(2) - 1, 0.0], atol=1e-6)
  assert float(grpo.k3_kl(jnp.float32(-3.0), jnp.float32(-1.0))) > 0


def test_diversity_by_hand():
  h = np.array([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])  # pairs: (1-0), (1-1), (1-0) -> 2/3
  np.testing.assert_allclose(grpo.diversity(h), [2 / 3], atol=1e-7)
  assert grpo.diversity(np.ones((2, 1, 4))).tolist() == [0.0, 0.0]


def test_loss_token_mean_and_dr_grpo_by_hand():
  """A fake 'model' whose log-probs are given: checks masking, KL weighting and normalisers."""
  logp = jnp.log(jnp.array([[[1.5, 0.5, 1.0]]]))  # [R=1, W=1, T=3]; old logp = 0
  batch = {"loss_mask": jnp.array([[[True, True, False]]]), "old_logp": jnp.zeros((1, 1, 3)),
           "ref_logp": jnp.zeros((1, 1, 3)), "advantages": jnp.array([[1.0]]),
           "valid": jnp.ones((1, 1, 3), bool)}
  original = grpo.token_logprobs
  grpo.token_logprobs = lambda model, params, b, **kw: (logp, jnp.ones_like(logp))
  try:
    loss = grpo.make_loss(eps_low=0.2, eps_high=0.28, kl_beta=0.5, aggregation="token_mean",
                          max_new_tokens=3)
    total, count, aux = loss(None, None, batch)
    kl = [1 / 1.5 + math.log(1.5) - 1, 2 + math.log(0.5) - 1]
    expected = (-1.28 + 0.5 * kl[0]) + (-0.5 + 0.5 * kl[1])  # ratio 0.5, A=+1: min(0.5, 0.8)
    assert float(total) == pytest.approx(expected, abs=1e-6) and float(count) == 2
    assert float(aux["kl"]) / float(count) == pytest.approx(sum(kl) / 2, abs=1e-6)
    assert float(aux["clip_fraction"]) / float(count) == pytest.approx(0.5)
    dr = grpo.make_loss(eps_low=0.2, eps_high=0.28, kl_beta=0.5, aggregation="dr_grpo",
                        max_new_tokens=3)
    total_dr, count_dr, _ = dr(None, None, batch)
    assert float(total_dr) == pytest.approx(expected, abs=1e-6) and float(count_dr) == 3
  finally:
    grpo.token_logprobs = original


def test_question_order_is_a_pure_function_of_the_step():
  a = [rl_stage.question_order(10, s, 4, seed=1) for s in range(5)]
  b = [rl_stage.question_order(10, s, 4, seed=1) for s in range(5)]
  assert a == b
  first_epoch = sum(a, [])[:10]
  assert sorted(first_epoch) == list(range(10))  # every question once per epoch


def test_registered_variants_are_chosen_by_name():
  """A new advantage estimator is one decorated function, selectable by its config name."""
  @grpo.register_advantage_estimator("rank_for_test")
  def rank(rewards, axes, eps):
    del axes, eps
    return jnp.argsort(jnp.argsort(rewards, axis=-1), axis=-1).astype(jnp.float32)

  try:
    out = grpo.group_advantages(jnp.array([[3.0, 1.0, 2.0]]), kind="rank_for_test")
    np.testing.assert_array_equal(np.asarray(out), [[2.0, 0.0, 1.0]])
  finally:
    del grpo.ADVANTAGE_ESTIMATORS["rank_for_test"]
  assert set(grpo.LOSS_AGGREGATIONS) == {"token_mean", "dr_grpo"}
  with pytest.raises(ValueError, match=r"loss aggregation \(grpo.loss_agg\) 'sum'"):
    grpo.make_loss(eps_low=0.2, eps_high=0.2, kl_beta=0.0, aggregation="sum", max_new_tokens=4)


def test_sampler_logprobs_are_the_old_policy_logprobs():
  """With one update per batch the sampler's own log-probs stand in for a teacher-forced pass:
  placed on the grid they equal `token_logprobs` at every generated target (float32), and the
  micro-batched, sharded log-prob pass of the stage gives the same numbers."""
  import jax
  import lace_jax as lj
  from lace_jax import experiment, sharding
  from lace_jax.rl import stage as grpo_stage
  from lace_jax.sampling import full_grid, sample
  from tests.conftest import randomize
  cfg = lj.ModelConfig.preset("tiny")
  model, params = lj.build_model(cfg, lj.LatticeConfig(layers=(1, 3), width=16, heads=2))
  params = randomize(params, seed=2, scale=0.1)
  out = sample(model, params, [[5, 6, 7, 8], [3, 4, 5], [7, 7], [9, 1, 2]], num_threads=2,
               max_new_tokens=7, temperature=1.0, seed=1, prompt_width=8)
  tokens, valid = full_grid(out)
  targets = np.concatenate([tokens[:, :, 1:], np.zeros_like(tokens[:, :, :1])], -1)
  p = out.prompt_tokens.shape[-1]
  gen = np.zeros_like(valid)
  gen[:, :, p - 1:-1] = valid[:, :, p:]
  assert gen.sum() > 10 and (~gen).sum() > 10  # generated targets and masked ones
  batch = {"tokens": tokens, "valid": valid, "targets": targets}
  tf = np.asarray(grpo.token_logprobs(model, params, batch, chunk=3)[0])
  grid = grpo_stage.sampler_logprobs_grid(out)
  np.testing.assert_allclose(grid[gen], tf[gen], atol=1e-4)
  assert np.all(grid[~gen] == 0)
  # the stage's pass: 2 micro-batches of 2 rollouts on a mesh of 2 devices
  exp = experiment.base_config("grpo", "tiny")
  exp.data = experiment.questions_section(path="x", num_threads=2, prompt_len=p)
  exp.grpo = experiment.grpo_section(questions_per_step=2, rollouts_per_question=2,
                                     max_new_tokens=7)
  exp.grpo.update(inner_updates=2, logprob_batch=2)
  exp.train = experiment.train_section(steps=1)
  mesh = sharding.make_mesh({"fsdp": 2}, jax.devices()[:2])
  fn, micro = grpo_stage.jit_logprobs(exp, model, mesh, sharding.DEFAULT_RULES)
  assert micro == 2
  cut = {k: v.reshape(2, 2, *v.shape[1:]) for k, v in batch.items()}
  with jax.set_mesh(mesh):
    staged = np.asarray(fn(params, sharding.global_batch(cut, mesh, leading=1))).reshape(tf.shape)
  np.testing.assert_allclose(staged, tf, atol=1e-5)
