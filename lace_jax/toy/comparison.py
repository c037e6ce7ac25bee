"""The toy-scale comparison (modes `relay` and `toy_search`): small models trained from scratch
through the same code paths as the real runs (datagen-format JSONL -> the run loop's CPT, SFT
and Lattice GRPO stages -> sampler + grader), so the claim "threads that read each other beat threads that
do not" is tested where it can be run: on a CPU.

Variants (spec section 8's baselines), all trained on the same problems and token budget:
  lace         the lattice model, W threads (the method)
  isolated     the same model, data and format with `lattice=None` (Isolated Parallel)
  independent  a single-thread model trained on single-thread traces; W samples, majority vote
               (Independent + Voting)

Every stage writes into WORKDIR/seed<k>/<variant>/<stage>/ and a `done.json` when it finishes;
a rerun of the same command skips finished stages and resumes an interrupted one from its
checkpoint, so nothing is lost on interruption. Each seed and variant can run as its own
process into the same workdir (`--config.toy.seeds='(3,)' --config.toy.variants='("lace",)'`):
the run lock (`lace_jax.workdir`) is taken on WORKDIR/seed<k>/<variant>, not on the workdir.
"""

from __future__ import annotations

import copy
import json
import os
import random
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lace_jax import diagnostics, experiment, grading
from lace_jax import workdir as workdir_lock
from lace_jax import evaluate as eval_lib
from lace_jax.hf_io import load_pretrained
from lace_jax.rl import stage as rl_stage
from lace_jax.sampling import full_grid
from lace_jax.tokenizer import Tokenizer
from lace_jax.toy import tasks as toydata
from lace_jax.training import lm

VARIANTS = ("lace", "isolated", "independent")


# ----------------------------------------------------------------------------------- data


def _write_jsonl(path: str, records) -> None:
  tmp = f"{path}.{os.getpid()}.tmp"  # processes writing the same data do not share a file
  with open(tmp, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  os.replace(tmp, path)  # a killed run never leaves a half-written file behind


def _problems(path: str) -> list[grading.Problem]:
  return grading.read_problems(path, name=os.path.basename(path))  # per-thread problems too


def make_data(cfg: ml_collections.ConfigDict, data_dir: str) -> dict[str, str]:
  """Writes the task's train / test JSONL (multi-thread and single-thread traces) and the
  word-level tokenizer, deterministically from cfg.seed; returns their paths."""
  t = cfg.toy
  os.makedirs(data_dir, exist_ok=True)
  paths = {k: os.path.join(data_dir, f"{k}.jsonl") for k in ("train", "train_single", "test")}
  paths["tokenizer"] = os.path.join(data_dir, "tokenizer.json")
  if all(os.path.isfile(p) for p in paths.values()):
    return paths
  rng = random.Random(cfg.seed)
  if t.task == "relay":
    train = [toydata.relay_record(rng, i, t.num_threads) for i in range(t.train_problems)]
    test = [toydata.relay_record(rng, i, t.num_threads) for i in range(t.test_problems)]
    single = train  # unused: the relay compares lattice vs isolated only
  elif t.task == "pair_search":
    train, single = [], []
    for i in range(t.train_problems):
      prob = toydata.pair_search_problem(rng, t.num_items)
      train.append(toydata.pair_search_record(rng, i, t.num_threads, t.num_items, t.trials,
                                               problem=prob))
      # the single-thread baseline: the same problems, W independent traces each (the same
      # number of thread tokens as the multi-thread data)
      for w in range(t.num_threads):
        rec = toydata.pair_search_record(rng, i, 1, t.num_items, t.trials, problem=prob)
        single.append(dict(rec, id=f"{rec['id']}-{w}"))
    test = [toydata.pair_search_record(rng, t.train_problems + i, t.num_threads, t.num_items,
                                       t.trials) for i in range(t.test_problems)]
  else:
    raise ValueError(f"toy.task={t.task!r}; expected 'relay' or 'pair_search'")
  _write_jsonl(paths["train"], train)
  _write_jsonl(paths["train_single"], single)
  _write_jsonl(paths["test"], test)
  toydata.word_tokenizer().save(paths["tokenizer"])
  return paths


# ------------------------------------------------------------------------------ analysis


def attention_profile(model, params, tokens: np.ndarray, valid: np.ndarray,
                      prompt_width: int) -> dict[str, list[float]]:
  """How much of each lattice head's attention goes to *other* threads, per generation step.

  tokens, valid: [B, W, T] full grids (prompt columns first, then generated columns). For each
  lattice layer: the attention mass on keys of other threads, averaged over batch, threads and
  heads and over valid queries, at every generated column (prompt_width ... T-1). Computed from
  the queries and keys the lattice layers `sow`, with the reference mask and softmax.
  """
  lat = model.lattice
  tokens, valid = jnp.asarray(tokens), jnp.asarray(valid)

  @jax.jit
  def profile(params):
    b, w, t = tokens.shape
    cols = jnp.arange(t, dtype=jnp.int32)
    qv = valid.astype(jnp.float32)
    out = {}
    for i, x in diagnostics.lattice_intermediates(model, params, tokens, valid).items():
      probs, _ = diagnostics.attention_probs(x["q"], x["k"], valid, lat.mask, cols)
      mass = diagnostics.other_thread_mass(probs, w)  # [B, C, W*T]
      mass = mass.mean(axis=1).reshape(b, w, t)
      out[f"layers_{i}"] = (mass * qv).sum(axis=(0, 1)) / jnp.maximum(qv.sum(axis=(0, 1)), 1.0)
    return out

  res = jax.device_get(profile(params))
  return {name: [float(x) for x in v[prompt_width:]] for name, v in sorted(res.items())}


# -------------------------------------------------------------------------------- stages


def _copy(section: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c = copy.deepcopy(section)
  c.unlock()
  return c


def _stage_config(cfg, mode: str, variant: str, paths: dict, checkpoint: str, seed: int):
  """The config of one training stage (pretrain | sft | grpo) of one variant, in the schema of
  the real experiment files, run by the same code as they are."""
  t = cfg.toy
  single = variant == "independent"
  w = 1 if single else t.num_threads
  c = experiment.base_config(mode, "tiny")
  c.seed = seed
  c.model = _copy(cfg.model)
  c.model.update(checkpoint=checkpoint, tokenizer=paths["tokenizer"])
  c.lattice = _copy(cfg.lattice)
  c.lattice.enabled = variant == "lace"
  c.sharding = _copy(cfg.sharding)
  c.distributed = _copy(cfg.distributed)
  c.train, c.optim = _copy(cfg[mode].train), _copy(cfg[mode].optim)
  if mode == "grpo":
    c.data = experiment.questions_section(path=paths["train"], num_threads=w,
                                          prompt_len=t.prompt_width)
    c.grpo = _copy(cfg.grpo.grpo)
    c.grpo.max_new_tokens = t.max_new_tokens
  else:
    c.data = experiment.data_section(
        path=paths["train_single" if single else "train"], num_threads=w, max_len=t.max_len,
        loss_on="all" if mode == "pretrain" else "generated", shuffle_threads=not single)
  c.data.instruction = ""
  return c


def _stage(workdir: str, name: str, fn) -> dict:
  """Runs fn(stage_dir) unless the stage finished before; returns its summary."""
  stage_dir = os.path.join(workdir, name)
  done = os.path.join(stage_dir, "done.json")
  if os.path.isfile(done):
    with open(done) as f:
      return json.load(f)
  os.makedirs(stage_dir, exist_ok=True)
  t0 = time.perf_counter()
  summary = fn(stage_dir)
  summary["seconds"] = time.perf_counter() - t0
  if jax.process_index() == 0:
    with open(done, "w") as f:
      json.dump(summary, f, indent=2, default=str)
  return summary


def _sample_and_grade(cfg, paths: dict, checkpoint: str, seed: int, stage_dir: str,
                      desc: str, num_threads: int, **evaluate_kwargs):
  """Loads `checkpoint`, samples every test problem with `num_threads` threads and grades it;
  writes stage_dir/predictions.jsonl. Returns (model, params, metrics)."""
  e, t = cfg.eval, cfg.toy
  model, params = load_pretrained(checkpoint, dtype=cfg.model.param_dtype,
                                  compute_dtype=cfg.model.dtype)
  tokenizer = Tokenizer.from_file(paths["tokenizer"])
  with grading.Grader(num_workers=e.grader_workers, timeout_s=e.grader_timeout_s) as grader:
    metrics, records = eval_lib.evaluate(
        model, params, tokenizer, _problems(paths["test"]), grader, num_threads=num_threads,
        max_new_tokens=t.max_new_tokens, temperature=e.temperature, top_p=1.0, top_k=0,
        batch_size=e.batch_size, seed=seed, instruction="", desc=desc, **evaluate_kwargs)
  with open(os.path.join(stage_dir, "predictions.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  return model, params, metrics


def _evaluate_stage(cfg, paths: dict, checkpoint: str, seed: int,
                    stage_dir: str, desc: str) -> dict:
  """The variant's own accuracy: W = toy.num_threads threads per problem, plus (with the
  lattice) how much the first batch's tokens attend to the other threads."""
  first = []  # the first batch's samples, kept for the attention picture

  def keep_first(out):
    if not first:
      first.append(out)

  model, params, metrics = _sample_and_grade(cfg, paths, checkpoint, seed, stage_dir, desc,
                                             cfg.toy.num_threads, on_batch=keep_first)
  summary = {"metrics": metrics, "checkpoint": checkpoint}
  if model.lattice is not None:  # the attention picture, on the first batch of these samples
    out = first[0]
    tokens, valid = full_grid(out)
    summary["attention_to_other_threads"] = attention_profile(
        model, params, tokens, valid, prompt_width=out.prompt_tokens.shape[-1])
  return summary


def _run_variant(cfg, workdir: str, variant: str, seed: int, paths: dict, stages) -> dict:
  vdir = os.path.join(workdir, f"seed{seed}", variant)
  os.makedirs(vdir, exist_ok=True)
  with workdir_lock.lock(vdir, jax.process_index()):  # one process per seed and variant
    return _run_stages(cfg, vdir, variant, seed, paths, stages)


def _budget_stage(cfg, paths: dict, checkpoint: str, seed: int, stage_dir: str,
                  desc: str) -> dict:
  """Independent + Voting against its budget: `eval.budget_samples` = n independent samples per
  test problem from the single-thread model (one grid of n threads, no lattice), maj@k for
  every k = 1..n and k's expected total tokens (`evaluate.budget_curve`)."""
  n = cfg.eval.budget_samples
  _, _, metrics = _sample_and_grade(cfg, paths, checkpoint, seed, stage_dir, desc, n,
                                    diagnostics_rollouts=0)
  return {"metrics": metrics, "budget_curve": eval_lib.budget_curve(metrics, n),
          "checkpoint": checkpoint}


def _run_stages(cfg, vdir: str, variant: str, seed: int, paths: dict, stages) -> dict:
  checkpoint = ""
  out = {}
  for stage in stages:
    if stage == "budget" and variant != "independent":
      continue  # the budget curve is Independent + Voting's
    label = f"seed {seed} {variant} {stage}"
    print(f"== {label}", flush=True)
    if stage in ("pretrain", "sft", "grpo"):
      c = _stage_config(cfg, stage, variant, paths, checkpoint, seed)
      run = rl_stage.run if stage == "grpo" else lm.run
      s = _stage(vdir, stage, lambda d, c=c, run=run: run(c, d))
    elif stage == "eval":
      s = _stage(vdir, stage, lambda d, ck=checkpoint: _evaluate_stage(
          cfg, paths, ck, seed, d, desc=label))
    elif stage == "budget":
      s = _stage(vdir, stage, lambda d, ck=checkpoint: _budget_stage(
          cfg, paths, ck, seed, d, desc=label))
    else:
      raise ValueError(f"unknown toy stage {stage!r}; expected pretrain, sft, grpo, eval or "
                       "budget")
    if "export" in s:
      checkpoint = s["export"]
    out[stage] = s
  return out


# ----------------------------------------------------------------------------- the modes


def _summarise(per_seed: dict[int, dict[str, dict]], headline: dict[str, str]) -> dict:
  """mean and std over seeds of every metric of every variant, plus the headline accuracy of
  each variant (`headline[variant]` names the metric that is that system's answer)."""
  variants = list(next(iter(per_seed.values())))
  table = {}
  for v in variants:
    ms = [per_seed[s][v] for s in per_seed]
    number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)
    table[v] = {k: {"mean": float(np.mean([m[k] for m in ms])),
                    "std": float(np.std([m[k] for m in ms])),
                    "per_seed": [float(m[k]) for m in ms]}
                for k in ms[0] if all(number(m.get(k)) for m in ms)}
    table[v]["accuracy"] = dict(table[v][headline[v]], metric=headline[v])
  return table


NAMES = {"lace": "LACE (lattice)", "isolated": "Isolated Parallel (lattice=None)",
         "independent": "Independent + Voting (maj@W)"}


def markdown(table: dict, seeds: list[int], *, tagged: bool = True) -> str:
  """The comparison table. `tagged`: the task's answers carry the [[best]] tag, so the format
  rate is a column (the relay's threads each answer: no tag, no column). "At LACE's tokens"
  appears when a budget stage ran."""
  matched = any("matched_acc" in m for m in table.values())
  cols = (["system", "accuracy (metric)"] + (["at LACE's tokens"] if matched else [])
          + ["mean@W"] + (["format"] if tagged else [])
          + ["diversity", "tokens/query", "critical path"])
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for v, m in table.items():
    pct = lambda k: (f"{100 * m[k]['mean']:.1f} ± {100 * m[k]['std']:.1f}" if k in m else "-")
    cells = ([NAMES.get(v, v), f"{pct('accuracy')} ({m['accuracy']['metric']})"]
             + ([pct("matched_acc")] if matched else []) + [pct("mean_acc")]
             + ([pct("format_rate")] if tagged else [])
             + [f"{m['diversity']['mean']:.3f} ± {m['diversity']['std']:.3f}",
                f"{m['tokens_per_query']['mean']:.1f}", f"{m['critical_path_tokens']['mean']:.1f}"])
    lines.append("| " + " | ".join(cells) + " |")
  lines.append(f"\nmean ± std over seeds {list(seeds)}.")
  if matched:
    lines.append("At LACE's tokens: Independent + Voting's majority vote over as many independent "
                 "samples as LACE's total generated tokens per problem buy, on the same seed (the "
                 "budget stage's curve, interpolated).")
  return "\n".join(lines)


def matched_budget(per_seed: dict[int, dict[str, dict]], runs: dict) -> None:
  """Adds `matched_acc` and `matched_samples` to Independent + Voting's metrics of every seed
  whose budget curve and LACE evaluation are both there: its curve read at LACE's tokens."""
  for seed, per in per_seed.items():
    budget = runs.get((seed, "independent"), {}).get("budget")
    if budget is None or "lace" not in per:
      continue
    hit = eval_lib.at_budget(budget["budget_curve"], per["lace"]["tokens_per_query"])
    per["independent"] = dict(per["independent"], matched_acc=hit["acc"],
                              matched_samples=hit["samples"])


def _write(workdir: str, name: str, text: str) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, name), "w") as f:
      f.write(text)


def run_comparison(cfg: ml_collections.ConfigDict, workdir: str | None) -> dict:
  """Modes `relay` and `toy_search`: data, then every stage of every variant and seed, then
  the table (results.json, results.md in the workdir)."""
  if not workdir:
    raise ValueError(f"mode {cfg.mode!r} needs --workdir (data, checkpoints, logs and the table "
                     "go there)")
  t = cfg.toy
  for v in t.variants:
    if v not in VARIANTS:
      raise ValueError(f"toy.variants entry {v!r}; expected one of {VARIANTS}")
  os.makedirs(workdir, exist_ok=True)
  paths = make_data(cfg, os.path.join(workdir, "data"))
  headline = {"lace": "lace_acc", "isolated": "lace_acc", "independent": "maj_acc"}
  headline.update(dict(t.headline))
  per_seed, runs = {}, {}
  t0 = time.perf_counter()
  for seed in t.seeds:
    per_seed[seed] = {}
    for variant in t.variants:
      runs[(seed, variant)] = _run_variant(cfg, workdir, variant, seed, paths, t.stages)
      if "eval" in runs[(seed, variant)]:
        per_seed[seed][variant] = runs[(seed, variant)]["eval"]["metrics"]
  if "eval" not in t.stages:
    print(f"toy.stages={tuple(t.stages)} has no eval: no table", flush=True)
    return {"task": t.task, "seconds": time.perf_counter() - t0}
  matched_budget(per_seed, runs)
  table = _summarise(per_seed, headline)
  md = markdown(table, list(t.seeds), tagged=t.task != "relay")
  result = {"task": t.task, "table": table, "markdown": md,
            "seconds": time.perf_counter() - t0}
  if cfg.mode == "relay":
    chance = 0.1
    acc = {v: table[v]["accuracy"]["mean"] for v in table}
    result["check"] = {
        "lattice_at_least": t.pass_lattice, "isolated_at_most": chance + 0.1, "accuracy": acc,
        "passed": bool(acc.get("lace", 0.0) >= t.pass_lattice
                       and acc.get("isolated", 0.0) <= chance + 0.1)}
  _write(workdir, "results.json", json.dumps(result, indent=2))
  _write(workdir, "results.md", md + "\n")
  print(md, flush=True)
  if "check" in result:
    c = result["check"]
    print(f"relay check {'PASSED' if c['passed'] else 'FAILED'}: accuracy {c['accuracy']} "
          f"(need lace >= {c['lattice_at_least']}, isolated <= {c['isolated_at_most']:.2f})",
          flush=True)
  return result
