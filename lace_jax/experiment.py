"""The shared sections of experiment files (ml-collections).

Every experiment file under `experiments/` spells out its own hyperparameters and builds the
sections every mode shares from the helpers here:
  mode         which job `lace_jax.main` runs (see `lace_jax.modes.MODES`)
  seed
  model        preset | checkpoint, tokenizer, dtype, param_dtype, remat, attention, num_layers
  lattice      enabled + one key per `LatticeConfig` field (derived from the dataclass)
  sharding     mesh axis sizes and rule overrides
  distributed  multi-process initialisation
plus the sections its mode reads (data, train, optim, grpo, eval, datagen, overhead, toy), each
key with one meaning. `lattice.layers=()` (or `lattice.enabled=False`) is the Isolated
Parallel ablation: the same model, data and format without the side path.

This module imports no jax (an experiment file loads in milliseconds, and a tool can read a
config without the model stack); `lace_jax.training.setup` turns a config into the run's
objects (model, tokenizer, parameters, mesh).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import ml_collections
from ml_collections import config_dict

from lace_jax import bundled, runtime
from lace_jax.config import DEFAULT_LOGITS_CHUNK, LatticeConfig, ModelConfig


def model_section(preset: str, *, dtype: str = "bfloat16", param_dtype: str = "float32",
                  remat: str = "none") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "preset": preset,  # a ModelConfig preset, used when `checkpoint` is empty
      "checkpoint": "",  # a Hugging Face Qwen3 directory to start from
      "tokenizer": "",  # a tokenizer.json; "" = the one in `checkpoint`
      "dtype": dtype,  # compute dtype
      "param_dtype": param_dtype,
      "remat": remat,  # none | full | dots
      "attention": config_dict.placeholder(str),  # backbone: reference|xla|cudnn|pallas_tpu
      # the preset cut to its first n layers (None = all): quick compiles and scaling studies
      "num_layers": config_dict.placeholder(int),
  })


def lattice_section(preset: str, *, enabled: bool = True, **overrides) -> ml_collections.ConfigDict:
  """Every `LatticeConfig` field as a key (the spec's defaults for `preset`, then `overrides`),
  so each can be overridden from the command line; `enabled` switches the side path off."""
  lat = LatticeConfig.default(ModelConfig.preset(preset), **overrides)
  section = {"enabled": enabled}
  for f in dataclasses.fields(LatticeConfig):
    value = getattr(lat, f.name)
    # a field that may be None needs a typed placeholder, or an override could not set it
    section[f.name] = config_dict.placeholder(str) if value is None else value
  return ml_collections.ConfigDict(section)


def base_config(mode: str, preset: str, **model_kwargs) -> ml_collections.ConfigDict:
  """mode, seed and the sections every mode shares."""
  cfg = ml_collections.ConfigDict()
  cfg.mode = mode
  cfg.seed = 0
  cfg.model = model_section(preset, **model_kwargs)
  cfg.lattice = lattice_section(preset)
  cfg.sharding = ml_collections.ConfigDict({
      "mesh": {"data": 1, "fsdp": -1, "tensor": 1},  # product = device count; one may be -1
      "rules": (),  # overrides of lace_jax.sharding.DEFAULT_RULES, e.g. (("mlp", None),)
  })
  cfg.plan = plan_section()
  cfg.runtime = ml_collections.ConfigDict({
      # XLA:TPU options set before libtpu starts (lace_jax.runtime; the environment's
      # LIBTPU_INIT_ARGS wins); the default keeps activation memory lean on fsdp meshes
      "libtpu_init_args": runtime.DEFAULT_LIBTPU_INIT_ARGS,
  })
  cfg.distributed = ml_collections.ConfigDict({
      "initialize": "auto",  # auto | yes | no (see lace_jax.distributed)
      "coordinator_address": "", "num_processes": -1, "process_id": -1,
      "cpu_collectives": config_dict.placeholder(str),  # "gloo" for multi-process CPU runs
      # a process silent this long (0 < s <= 300) is reported lost: one error line, exit 1
      "heartbeat_timeout_s": 120.0,
  })
  return cfg


def plan_section(*targets: str, prompt_len: int = 512) -> ml_collections.ConfigDict:
  """The plan mode (`lace_jax.plan`): `--config.plan.target=tpu:v5p:2x2x2` (or cuda:h100x8,
  local, several comma-separated, `default` = `targets`) compiles the stage's functions for that
  target instead of running them."""
  return ml_collections.ConfigDict({
      "target": "",  # "" = run the experiment; else plan it for these targets
      "targets": tuple(targets),  # the accelerators this experiment is made to fit
      "prompt_len": prompt_len,  # eval: the prompt width planned for (prompts vary)
      "device_memory": 0.0,  # bytes per device to plan against (0 = the device's own), e.g.
      # 0.9 x the device's to keep 10% headroom
      "functions": "",  # comma-separated function names to plan ("" = every one), e.g.
      # rollout_prefill,rollout_decode: a quick look without the train step's long compile
  })


def optim_section(*, lr: float, warmup_steps: int, weight_decay: float = 0.1,
                  clip_norm: float = 1.0) -> ml_collections.ConfigDict:
  """AdamW with linear warmup then cosine decay to `min_lr_ratio * lr`; the lattice's
  parameters learn at `lattice_lr_multiplier` x that (the selection study, docs/results.md)."""
  return ml_collections.ConfigDict({
      "lr": lr, "warmup_steps": warmup_steps, "min_lr_ratio": 0.1, "weight_decay": weight_decay,
      "b1": 0.9, "b2": 0.95, "eps": 1e-8, "clip_norm": clip_norm, "lattice_lr_multiplier": 1.0})


def train_section(*, steps: int, trainable: str = "all", grad_accum: int = 1,
                  save_every: int = 500, log_every: int = 10,
                  **extra) -> ml_collections.ConfigDict:
  """The run loop's keys; `extra` adds a stage's own (e.g. batch_size for pretrain / sft)."""
  return ml_collections.ConfigDict({
      "steps": steps, **extra,
      "grad_accum": grad_accum,  # microbatches per optimizer step (a lax.scan)
      # the loss's logits formed this many rows of the vocabulary (or positions, "tokens") at a
      # time, so [B, W, T, V] float32 logits never exist (0 = dense; lace_jax.losses)
      "logits_chunk": DEFAULT_LOGITS_CHUNK, "logits_chunk_over": "vocab",
      "trainable": trainable,  # all | lattice
      "save_every": save_every, "keep_checkpoints": 3, "async_checkpointing": True,
      "log_every": log_every})


def data_section(*, path: str, num_threads: int, max_len: int, loss_on: str,
                 shuffle_threads: bool) -> ml_collections.ConfigDict:
  """The multi-thread training data of pretrain / sft."""
  return ml_collections.ConfigDict({
      "path": path,  # JSONL of multi-thread records (see docs/training.md: data format)
      "num_threads": num_threads,  # W
      "max_len": max_len,  # T: the grid width, tokens per thread, prompt included
      "loss_on": loss_on,  # generated (SFT) | all (continued pre-training)
      "shuffle_threads": shuffle_threads,  # permute each example's threads on every draw
      "format": "threads",  # threads (multi-thread JSONL) | text ({"text": ...}, W = 1)
      "instruction": "default",  # format note appended to each prompt; "" for none
      "truncate": False,  # truncate over-long threads instead of counting them as bad records
      "bad_records": "skip",  # skip | fail
      "thinking": True})


def grpo_section(*, questions_per_step: int, rollouts_per_question: int,
                 max_new_tokens: int) -> ml_collections.ConfigDict:
  """Lattice GRPO (spec section 6): rollouts, rewards and the clipped surrogate."""
  return ml_collections.ConfigDict({
      "questions_per_step": questions_per_step,
      "rollouts_per_question": rollouts_per_question,  # G
      "max_new_tokens": max_new_tokens,
      "temperature": 1.0, "top_p": 1.0, "top_k": 0,
      "eps_low": 0.2, "eps_high": 0.28,
      "kl_beta": 0.0,  # k3 KL to the frozen reference (the weights the run started from)
      "lambda_div": 0.1,
      "reward_mode": "thread_aggregated",  # thread_aggregated | per_thread
      "loss_agg": "token_mean",  # token_mean | dr_grpo
      "advantage": "grpo",  # grpo (mean/std over the group) | dr_grpo (mean only)
      "inner_updates": 1,  # mu: optimizer updates per batch of rollouts (mu = 1: the
      # sampler's own log-probs are the old policy's; mu > 1: a teacher-forced pass)
      # the generation engine's slots: rollouts generated at once, a slot refilled as soon
      # as its lattice finishes (0 = all of a step's at once)
      "rollout_batch": 0,
      "decode_chunk": 32,  # columns per engine decode call (admission between calls)
      "logprob_batch": 0,  # rollouts per log-prob pass (0 = the train step's microbatch)
      # rollouts of each logged step measured for the thread-level lattice diagnostics
      # (lace_jax.diagnostics): 0 = the step's first group (G rollouts), < 0 = none
      "diagnostics_rollouts": 0,
      "grader_workers": 4, "grader_timeout_s": 10.0,
  })


def questions_section(*, path: str, num_threads: int, prompt_len: int) -> ml_collections.ConfigDict:
  """The questions of GRPO: prompts only, answers graded."""
  return ml_collections.ConfigDict({
      "path": path,  # a bundled benchmark name or a JSONL of {"id", "problem", "answer"}
      "num_threads": num_threads,  # W
      "prompt_len": prompt_len,  # P: every prompt is left-padded to this width
      "instruction": "default",  # format note appended to each prompt; "" for none
      "thinking": True})


def runlocal(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks an experiment to the tiny model in float32, for a CPU run in minutes; training
  stages read the bundled multi-thread dataset with its tokenizer."""
  cfg.model = model_section("tiny", dtype="float32")
  cfg.model.tokenizer = bundled.TOY_TOKENIZER
  cfg.lattice = lattice_section("tiny")
  if "data" in cfg:  # pretrain / sft examples, or GRPO's questions
    cfg.data.path = bundled.TOY_DATA
    if "max_len" in cfg.data:
      cfg.data.max_len = 160
  for name in ("data", "eval"):
    if name in cfg:
      cfg[name].instruction = bundled.TOY_INSTRUCTION
  return cfg


def with_preset(cfg: ml_collections.ConfigDict, preset: str) -> ml_collections.ConfigDict:
  """The same recipe on another model preset: model.preset and the lattice's spec defaults
  for that preset (its layer band and width)."""
  cfg.model.preset = preset
  cfg.lattice = lattice_section(preset)
  return cfg


def sibling(experiment_file: str, name: str):
  """The experiment file `name`.py in the same folder as `experiment_file` (pass `__file__`),
  as a module: a variant of a recipe (e.g. the 4B run of the 1.7B recipe) starts from it."""
  path = os.path.join(os.path.dirname(os.path.abspath(experiment_file)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"lace_experiment_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
