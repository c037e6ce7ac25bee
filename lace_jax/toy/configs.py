"""The toy demo's configs, apart from the code that runs them: experiment files
(experiments/toy_*.py) and the quickstart build theirs here without importing jax.

  toy_lattice        the lattice of the toy runs trained from scratch (the selection study's)
  toy_config         the comparison's config (task, data, budget, variants, seeds, stages)
  relay_config       the relay check (experiments/toy_relay.py, part of the quickstart)
  selection_config   the selection diagnostic (experiments/toy_selection.py)
"""

from __future__ import annotations

import ml_collections

from lace_jax import experiment


def toy_lattice() -> ml_collections.ConfigDict:
  """The lattice of the toy-scale runs trained from scratch (docs/results.md, section 1):

  - wider than the tiny preset's spec default (R = 32, C = 2 heads of E = 16, in layers 1 and
    3, instead of R = 16, C = 4 heads of E = 4 in layer 2): with E = 4 every head dim is
    rotary and a model trained from scratch did not learn to select the other thread's key;
  - `source="hidden"` (the residual stream) instead of the paper's per-thread attention output:
    in the selection study, the attention output of a backbone trained from scratch made
    selection slow and seed-dependent, the residual stream made it fast on every seed. The
    real presets keep the paper's `attn_out` (a pretrained backbone's attention output is a
    different input; see the study).
  """
  return experiment.lattice_section("tiny", layers=(1, 3), width=32, heads=2, source="hidden")


def toy_config(task: str, *, num_threads: int, seeds: tuple[int, ...], variants: tuple[str, ...],
               stages: tuple[str, ...]) -> ml_collections.ConfigDict:
  """The toy-scale comparison's config: the shared sections, `toy` (task, data sizes, budget,
  variants, seeds), and for each training stage its sections in the schema of the real stage's
  experiment files (`pretrain.{train,optim}`, `sft.{train,optim}`, `grpo.{train,optim,grpo}`),
  so `--config.sft.train.steps=3000` reads like `--config.train.steps=3000` of sft_4b.py.

  The lattice is `toy_lattice()`: the toy defaults chosen by the selection study.
  """
  mode = {"relay": "relay", "pair_search": "toy_search"}[task]
  cfg = experiment.base_config(mode, "tiny", dtype="float32")
  cfg.lattice = toy_lattice()
  cfg.toy = ml_collections.ConfigDict({
      "task": task,  # relay | pair_search (see lace_jax.toy.tasks)
      "num_threads": num_threads,  # W
      "num_items": 12, "trials": 3,  # pair_search: N items, per-thread budget in trials
      "train_problems": 4000, "test_problems": 200,
      "max_len": 80,  # pretrain / sft grid width T (prompt + completion)
      "prompt_width": 56,  # GRPO's sampler prompt width (data.prompt_len)
      "max_new_tokens": 26,  # the per-thread token budget (3 trials of 7 tokens + the answer)
      "seeds": seeds, "variants": variants, "stages": stages,
      "headline": (),  # ((variant, metric), ...) overriding lace_acc / lace_acc / maj_acc
      "pass_lattice": 0.9,  # relay: the accuracy the lattice must reach
  })
  no_decay = dict(weight_decay=0.0)
  cfg.pretrain = ml_collections.ConfigDict({
      "train": experiment.train_section(steps=100, batch_size=16, save_every=100),
      "optim": experiment.optim_section(lr=1e-3, warmup_steps=30, **no_decay)})
  cfg.sft = ml_collections.ConfigDict({
      "train": experiment.train_section(steps=700, batch_size=16, save_every=100),
      "optim": experiment.optim_section(lr=1e-3, warmup_steps=50, **no_decay)})
  # max_new_tokens is the task's budget, toy.max_new_tokens, for GRPO and eval alike
  rl = experiment.grpo_section(questions_per_step=8, rollouts_per_question=4, max_new_tokens=0)
  del rl.max_new_tokens
  rl.grader_workers = 2
  cfg.grpo = ml_collections.ConfigDict({
      "train": experiment.train_section(steps=15, save_every=5, log_every=1),
      "optim": experiment.optim_section(lr=1e-4, warmup_steps=5, **no_decay), "grpo": rl})
  # budget_samples: the `budget` stage's independent samples per problem (Independent +
  # Voting's accuracy against its token budget)
  cfg.eval = ml_collections.ConfigDict({"temperature": 1.0, "batch_size": 50,
                                        "grader_workers": 2, "grader_timeout_s": 10.0,
                                        "budget_samples": 4 * num_threads})
  return cfg


def relay_config() -> ml_collections.ConfigDict:
  """The relay check (experiments/toy_relay.py, and part of the quickstart): W = 2 threads,
  2,000 problems, SFT 500 steps at batch 32, greedy evaluation, accuracy per thread."""
  cfg = toy_config("relay", num_threads=2, seeds=(0,), variants=("lace", "isolated"),
                   stages=("sft", "eval"))
  cfg.toy.update(train_problems=2000, max_len=20, prompt_width=17, max_new_tokens=2,
                 headline=(("lace", "mean_acc"), ("isolated", "mean_acc")))
  cfg.sft.train.update(steps=500, batch_size=32, save_every=500)
  cfg.sft.optim.warmup_steps = 20
  cfg.eval.update(temperature=0.0, batch_size=100)
  return cfg


def selection_config() -> ml_collections.ConfigDict:
  """The diagnostic's defaults: the toy lattice (layers 1 and 3, R = 32, C = 2 heads of E = 16),
  W = 2 threads, copy with 6 distractors on each side, 1000 steps."""
  cfg = experiment.base_config("selection", "tiny", dtype="float32")
  cfg.lattice = experiment.lattice_section("tiny", layers=(1, 3), width=32, heads=2)
  cfg.selection = ml_collections.ConfigDict({
      "task": "copy",  # copy | sum
      "num_threads": 2,  # W
      "distract": 6,  # k random digits before and after the marked one
      "steps": 1000,
      "batch_size": 64,
      "lr": 1e-3,
      "lattice_lr_multiplier": 1.0,  # the lattice's parameters learn at this x lr
      "eval_every": 100,
      "eval_problems": 512,
      "target": 0.95,  # steps_to_target: the first evaluation at this accuracy
      "stop_at_target": False,  # end the run at that evaluation (the quickstart does)
  })
  return cfg
