"""Building blocks of experiment files (ml-collections) and their conversion to model configs.

Every experiment file under `experiments/` returns a `ConfigDict` with at least:
  mode     which job `lace_jax.main` runs (see `lace_jax.modes.MODES`)
  seed
  model    preset | checkpoint, dtype, param_dtype, remat
  lattice  enabled, layers, width, heads, gate, source, mask, rope_*, implementation
plus the sections its mode reads. `lattice.layers=()` (or `lattice.enabled=False`) is the
Isolated Parallel ablation: the same model, data and format without the side path.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

import os

from lace_jax.config import LatticeConfig, ModelConfig


def model_section(preset: str, *, dtype: str = "bfloat16", param_dtype: str = "float32",
                  remat: str = "none") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "preset": preset,  # a ModelConfig preset, used when `checkpoint` is empty
      "checkpoint": "",  # a Hugging Face Qwen3 directory to start from
      "dtype": dtype,  # compute dtype
      "param_dtype": param_dtype,
      "remat": remat,  # none | full | dots
      "attention": config_dict.placeholder(str),  # backbone: reference|xla|cudnn|pallas_tpu
  })


def lattice_section(preset: str, *, enabled: bool = True, **overrides) -> ml_collections.ConfigDict:
  """The spec's default lattice for `preset`, spelled out so every field can be overridden."""
  lat = LatticeConfig.default(ModelConfig.preset(preset), **overrides)
  return ml_collections.ConfigDict({
      "enabled": enabled,
      "layers": lat.layers,
      "width": lat.width,
      "heads": lat.heads,
      "gate": lat.gate,
      "source": lat.source,
      "mask": lat.mask,
      "rope_axes": lat.rope_axes,
      "rope_fractions": lat.rope_fractions,
      "rope_thetas": lat.rope_thetas,
      "qk_norm": lat.qk_norm,
      "implementation": config_dict.placeholder(str),
  })


def base_config(mode: str, preset: str, **model_kwargs) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict()
  cfg.mode = mode
  cfg.seed = 0
  cfg.model = model_section(preset, **model_kwargs)
  cfg.lattice = lattice_section(preset)
  cfg.sharding = ml_collections.ConfigDict({
      "mesh": {"data": 1, "fsdp": -1, "tensor": 1},  # product = device count; one may be -1
      "rules": (),  # overrides of lace_jax.sharding.DEFAULT_RULES, e.g. (("mlp", None),)
  })
  cfg.distributed = ml_collections.ConfigDict({
      "initialize": "auto",  # auto | yes | no (see lace_jax.distributed)
      "coordinator_address": "", "num_processes": -1, "process_id": -1,
      "cpu_collectives": config_dict.placeholder(str),  # "gloo" for multi-process CPU runs
  })
  return cfg


def model_configs(cfg: ml_collections.ConfigDict) -> tuple[ModelConfig, LatticeConfig | None]:
  """(ModelConfig, LatticeConfig or None) described by an experiment config."""
  m = cfg.model
  if m.checkpoint:
    model = ModelConfig.from_hf(m.checkpoint, dtype=m.dtype, param_dtype=m.param_dtype,
                                remat=m.remat, attention=m.attention)
  else:
    model = ModelConfig.preset(m.preset, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat,
                               attention=m.attention)
  return model, lattice_config(cfg.lattice, model)


def resolve_tokenizer(cfg: ml_collections.ConfigDict):
  """(Tokenizer, path): data.tokenizer, else the checkpoint's tokenizer.json."""
  from lace_jax.tokenizer import Tokenizer
  path = cfg.data.tokenizer
  if not path and cfg.model.checkpoint:
    path = os.path.join(cfg.model.checkpoint, "tokenizer.json")
  if not path:
    raise ValueError("no tokenizer: set data.tokenizer to a tokenizer.json, or model.checkpoint "
                     "to a directory that holds one")
  return Tokenizer.from_file(path), path


def load_checkpoint(cfg: ml_collections.ConfigDict, model: ModelConfig,
                    lattice: LatticeConfig | None):
  """The parameters in cfg.model.checkpoint with this run's lattice and dtypes, or None when
  no checkpoint is configured (callers then initialise from cfg.seed)."""
  if not cfg.model.checkpoint:
    return None
  from lace_jax.hf_io import load_pretrained
  return load_pretrained(cfg.model.checkpoint, lattice=lattice, dtype=model.param_dtype,
                         compute_dtype=model.dtype)[1]


def load_or_init(cfg: ml_collections.ConfigDict, model_cfg: ModelConfig,
                 lattice: LatticeConfig | None):
  """(Model, params): cfg.model.checkpoint's weights if set, else fresh ones from cfg.seed."""
  from lace_jax.model import Model
  model = Model(model_cfg, lattice)
  params = load_checkpoint(cfg, model_cfg, lattice)
  return model, (model.init(cfg.seed) if params is None else params)


def lattice_config(section: ml_collections.ConfigDict,
                   model: ModelConfig) -> LatticeConfig | None:
  if not section.enabled or not tuple(section.layers):
    return None
  lat = LatticeConfig(
      layers=tuple(section.layers), width=section.width, heads=section.heads, gate=section.gate,
      source=section.source, mask=section.mask, rope_axes=tuple(section.rope_axes),
      rope_fractions=tuple(section.rope_fractions), rope_thetas=tuple(section.rope_thetas),
      qk_norm=section.qk_norm, implementation=section.implementation)
  lat.validate_for(model)
  return lat


def optim_section(*, lr: float, warmup_steps: int, weight_decay: float = 0.1,
                  clip_norm: float = 1.0) -> ml_collections.ConfigDict:
  """AdamW with linear warmup then cosine decay to `min_lr_ratio * lr`."""
  return ml_collections.ConfigDict({
      "lr": lr, "warmup_steps": warmup_steps, "min_lr_ratio": 0.1, "weight_decay": weight_decay,
      "b1": 0.9, "b2": 0.95, "eps": 1e-8, "clip_norm": clip_norm})


def train_section(*, steps: int, batch_size: int, trainable: str = "all", grad_accum: int = 1,
                  save_every: int = 500, log_every: int = 10) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "steps": steps, "batch_size": batch_size,  # examples (each W threads) per optimizer step
      "grad_accum": grad_accum, "trainable": trainable,  # all | lattice
      "save_every": save_every, "keep_checkpoints": 3, "async_checkpointing": True,
      "log_every": log_every})


def data_section(*, path: str, num_threads: int, max_len: int, loss_on: str,
                 shuffle_threads: bool) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "path": path,  # JSONL of multi-thread records (see README: data format)
      "tokenizer": "",  # tokenizer.json; default: the one in model.checkpoint
      "num_threads": num_threads,  # W
      "max_len": max_len,  # T: tokens per thread, prompt included
      "loss_on": loss_on,  # generated (SFT) | all (continued pre-training)
      "shuffle_threads": shuffle_threads,  # permute each example's threads on every draw
      "format": "threads",  # threads (multi-thread JSONL) | text ({"text": ...}, W = 1)
      "instruction": "default",  # format note appended to each prompt; "" for none
      "truncate": False,  # truncate over-long threads instead of counting them as bad records
      "bad_records": "skip",  # skip | fail
      "thinking": True})


def runlocal(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks an experiment to the tiny model in float32, for a CPU run in minutes; training
  stages read the bundled toy multi-thread dataset with its tokenizer."""
  from lace_jax import bundled
  cfg.model = model_section("tiny", dtype="float32")
  cfg.lattice = lattice_section("tiny")
  if "data" in cfg:
    cfg.data.update(path=bundled.TOY_DATA, tokenizer=bundled.TOY_TOKENIZER,
                    instruction=bundled.TOY_INSTRUCTION, max_len=160)
  return cfg


def pretrain_config(preset: str, *, lr: float, steps: int, batch_size: int, max_len: int,
                    trainable: str = "lattice", runlocal_: bool = False) -> ml_collections.ConfigDict:
  """Stage 1: continued pre-training on multi-thread traces (loss on every thread token)."""
  cfg = base_config("pretrain", preset, remat="full")
  cfg.data = data_section(path="data/cpt/train.jsonl", num_threads=4, max_len=max_len,
                          loss_on="all", shuffle_threads=True)
  cfg.train = train_section(steps=steps, batch_size=batch_size, trainable=trainable)
  cfg.optim = optim_section(lr=lr, warmup_steps=max(1, steps // 20), weight_decay=0.01)
  if runlocal_:
    runlocal(cfg)
    cfg.train.update(steps=20, batch_size=4, save_every=10, log_every=1)
    cfg.optim.update(lr=3e-3, warmup_steps=2)
  return cfg


def sft_config(preset: str, *, lr: float, steps: int, batch_size: int, max_len: int,
               runlocal_: bool = False) -> ml_collections.ConfigDict:
  """Stage 2: full-parameter SFT, loss on generated tokens, threads shuffled on every draw."""
  cfg = base_config("sft", preset, remat="full")
  cfg.data = data_section(path="data/sft/train.jsonl", num_threads=4, max_len=max_len,
                          loss_on="generated", shuffle_threads=True)
  cfg.train = train_section(steps=steps, batch_size=batch_size, trainable="all")
  cfg.optim = optim_section(lr=lr, warmup_steps=max(1, steps // 15), weight_decay=0.0)
  if runlocal_:
    runlocal(cfg)
    cfg.train.update(steps=20, batch_size=4, save_every=10, log_every=1)
    cfg.optim.update(lr=1e-3, warmup_steps=2)
  return cfg


def grpo_config(preset: str, *, lr: float, steps: int, questions_per_step: int,
                rollouts_per_question: int, max_new_tokens: int,
                runlocal_: bool = False) -> ml_collections.ConfigDict:
  """Stage 3: Lattice GRPO (spec section 6)."""
  cfg = base_config("grpo", preset, remat="full")
  cfg.data = data_section(path="gsm8k_train", num_threads=4, max_len=512,  # max_len: prompt width
                          loss_on="generated", shuffle_threads=False)
  cfg.train = train_section(steps=steps, batch_size=questions_per_step, trainable="all",
                            save_every=50, log_every=1)
  cfg.optim = optim_section(lr=lr, warmup_steps=10, weight_decay=0.0)
  cfg.grpo = ml_collections.ConfigDict({
      "rollouts_per_question": rollouts_per_question,  # G
      "max_new_tokens": max_new_tokens,
      "temperature": 1.0, "top_p": 1.0, "top_k": 0,
      "eps_low": 0.2, "eps_high": 0.28,
      "kl_beta": 0.0,  # k3 KL to the frozen reference
      "lambda_div": 0.1,
      "reward_mode": "thread_aggregated",  # thread_aggregated | per_thread
      "loss_agg": "token_mean",  # token_mean | dr_grpo
      "advantage": "grpo",  # grpo (mean/std over the group) | dr_grpo (mean only)
      "inner_updates": 1,  # mu
      "grader_workers": 4, "grader_timeout_s": 10.0,
  })
  if runlocal_:
    runlocal(cfg)
    cfg.data.max_len = 96  # prompt width
    cfg.train.update(steps=3, batch_size=2, save_every=3)
    cfg.grpo.update(rollouts_per_question=2, max_new_tokens=32, grader_workers=2)
    cfg.optim.update(lr=1e-4, warmup_steps=1)
  return cfg


def eval_config(preset: str, *, num_threads: int, max_new_tokens: int,
                runlocal_: bool = False) -> ml_collections.ConfigDict:
  """Evaluation on the bundled benchmarks; variants are compared side by side."""
  cfg = base_config("eval", preset)
  cfg.data = data_section(path="", num_threads=num_threads, max_len=0, loss_on="generated",
                          shuffle_threads=False)
  cfg.eval = ml_collections.ConfigDict({
      "datasets": ("aime24", "aime25", "amc2023", "math500", "gsm8k_test"),
      "num_threads": num_threads,  # W
      "max_new_tokens": max_new_tokens,
      "temperature": 0.6, "top_p": 0.95, "top_k": 20,  # Qwen3's thinking-mode sampling
      "batch_size": 8,  # problems per lockstep batch (each W threads)
      "limit": 0,  # problems per dataset; 0 = all
      "variants": ("model", "lattice_off"),  # lattice_off: same weights, no side path
      "checkpoints": (),  # more HF directories to compare side by side
      "grader_workers": 4, "grader_timeout_s": 10.0,
  })
  if runlocal_:
    runlocal(cfg)
    cfg.eval.update(max_new_tokens=32, limit=4, batch_size=4, grader_workers=2)
  return cfg


def datagen_config(source: str, *, generator: str, num_threads: int = 4,
                   runlocal_: bool = False) -> ml_collections.ConfigDict:
  """Synthetic multi-thread data (lace_jax.datagen.pipeline); output: WORKDIR/threads.jsonl."""
  cfg = base_config("datagen", "qwen3-4b")
  cfg.data = data_section(path="", num_threads=num_threads, max_len=0, loss_on="generated",
                          shuffle_threads=False)
  cfg.datagen = ml_collections.ConfigDict({
      "source": source,  # a bundled benchmark name or a JSONL of problems with answers
      "limit": 0,  # problems to process; 0 = all
      "generator": generator,  # http | in_process (the model of cfg.model)
      "endpoint": "http://127.0.0.1:8000/v1", "endpoint_model": "default",
      "api_key_env": "",  # name of an environment variable holding the API key
      "concurrency": 8, "retries": 4, "timeout_s": 300.0, "request_budget": 0,
      "batch_size": 8,  # in_process: prompts per sampler call
      "num_threads": num_threads,
      "samples_for_difficulty": 8, "min_pass_rate": 0.0, "max_pass_rate": 0.5,
      "similarity": "jaccard",  # jaccard | embedding (in_process only)
      "max_similarity": 0.7, "max_attempts": 4,
      "max_tokens": 8192, "temperature": 1.0,
      "max_trace_tokens": 8000, "target_tokens": 3000,
      "tags": "verifier",  # verifier | judge
      "keep_unsolved": False,  # smoke tests only
      "grader_workers": 4, "grader_timeout_s": 10.0,
  })
  if runlocal_:
    runlocal(cfg)
    cfg.datagen.update(generator="in_process", limit=4, samples_for_difficulty=2,
                       min_pass_rate=-1.0, max_pass_rate=1.0, max_tokens=24, batch_size=4,
                       keep_unsolved=True, grader_workers=2, max_trace_tokens=20,
                       target_tokens=16)
  return cfg


def toy_config(task: str, *, num_threads: int, seeds: tuple[int, ...], variants: tuple[str, ...],
               stages: tuple[str, ...]) -> ml_collections.ConfigDict:
  """The toy-scale comparison (`lace_jax.toy.comparison`): the tiny model trained from scratch on CPU.

  The lattice is wider than the tiny preset's spec default (R = 32, C = 2 heads of E = 16, in
  layers 1 and 3 instead of R = 16, C = 4 of E = 4 in layer 2): with E = 4 every head dim is
  rotary and a model trained from scratch did not learn to select the other thread's key.
  """
  mode = {"relay": "relay", "pair_search": "toy_search"}[task]
  cfg = base_config(mode, "tiny", dtype="float32")
  cfg.lattice = lattice_section("tiny", layers=(1, 3), width=32, heads=2)
  cfg.toy = ml_collections.ConfigDict({
      "task": task,  # relay | pair_search (see lace_jax.toy.tasks)
      "num_threads": num_threads,  # W
      "num_items": 12, "trials": 3,  # pair_search: N items, per-thread budget in trials
      "train_problems": 4000, "test_problems": 200,
      "max_len": 80,  # training grid width T (prompt + completion)
      "prompt_width": 56,  # GRPO's sampler prompt width
      "max_new_tokens": 26,  # the per-thread token budget (3 trials of 7 tokens + the answer)
      "seeds": seeds, "variants": variants, "stages": stages,
      "headline": (),  # ((variant, metric), ...) overriding lace_acc / lace_acc / maj_acc
      "pass_lattice": 0.9,  # relay: the accuracy the lattice must reach
  })
  cfg.cpt = ml_collections.ConfigDict({"steps": 100, "batch_size": 16, "lr": 1e-3,
                                       "warmup_steps": 30, "save_every": 100, "log_every": 10})
  cfg.sft = ml_collections.ConfigDict({"steps": 700, "batch_size": 16, "lr": 1e-3,
                                       "warmup_steps": 50, "save_every": 100, "log_every": 10})
  cfg.grpo = ml_collections.ConfigDict({"steps": 15, "questions": 8, "rollouts": 4, "lr": 1e-4,
                                        "warmup_steps": 5, "temperature": 1.0,
                                        "lambda_div": 0.1, "save_every": 5})
  cfg.eval = ml_collections.ConfigDict({"temperature": 1.0, "batch_size": 50,
                                        "grader_workers": 2, "grader_timeout_s": 10.0})
  return cfg
