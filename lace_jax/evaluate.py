"""Evaluation: LACE accuracy and the baselines' metrics on the bundled benchmarks.

For every problem, W threads are generated together and graded:
  lace_acc      the [[best]] thread's answer is correct (a format failure counts as wrong)
  maj_acc       majority vote over the W threads' answers (Independent + Voting, maj@W)
  mean_acc      mean over threads of per-thread correctness (mean@W)
  pass@1, pass@W  unbiased pass@k from the W threads (Chen et al. 2021)
  format_rate   exactly one valid [[best]] thread (spec section 5)
  diversity     mean over thread pairs of (1 - cosine) of mean final hidden states
  pass@k, maj@k  for every k = 1..W (results.json: "pass@<k>", "maj@<k>"): the unbiased pass@k,
                and the exact expectation of a majority vote over k of the W threads
  tokens_per_query     all generated tokens of a problem's W threads (the total budget)
  critical_path_tokens its longest thread: a lockstep lattice's latency in decode steps
  tokens_per_correct   all generated tokens over the problems LACE got right
  seconds_per_query    wall time of a batch over its problems
  lattice/cross_thread, lattice/entropy, lattice/gate (and per lattice layer: .../layer_<i>)
                the thread-level diagnostics (`lace_jax.diagnostics`) of the first batch's
                lattices (at most `diagnostics_rollouts` of them); absent without a lattice
Variants compare configurations side by side on the same problems: "model" (as configured),
"lattice_off" (the same weights without the side path: the Isolated Parallel ablation), and
any extra checkpoints in `eval.checkpoints`. "budget" is Independent + Voting at equal compute:
`eval.budget.samples` = n independent samples per problem (from `eval.budget.checkpoint`, or
the evaluated weights without the lattice), maj@k for every k = 1..n against k's expected
total tokens (`budget_curve`), and that curve read at the token budget of the variant
`eval.budget.match` (`matched_acc`, at `matched_samples` samples).

The `eval` mode runs on the mesh of `sharding.mesh`, and on several processes (hosts) as one
SPMD program: each batch of `eval.batch_size` problems (the last one padded with copies of
its last problem, whose records are dropped) is cut into the processes' blocks
(`sharding.process_share`); each process generates its block together with the others, grades
it in its own grader pool, and the records are gathered so that every process holds all of
them; process 0 writes the files. The numbers do not depend on the process count.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import jax
import numpy as np
from tqdm import tqdm

from lace_jax import grading, sharding
from lace_jax.diagnostics import lattice_diagnostics
from lace_jax.errors import ConfigError
from lace_jax.hf_io import load_pretrained
from lace_jax.model import Model, Params, without_lattice
from lace_jax.rl import grpo
from lace_jax.engine import Engine, Request, as_sample_output
from lace_jax.sampling import SampleOutput, full_grid
from lace_jax.training.setup import load_or_init, model_configs, resolve_tokenizer
from lace_jax.tokenizer import (THREAD_INSTRUCTION, Tokenizer, instruction_template,
                                thread_prompts)

METRICS = ("lace_acc", "maj_acc", "mean_acc", "pass@1", "pass@W", "format_rate", "diversity",
           "tokens_per_query", "critical_path_tokens", "seconds_per_query")
# the diagnostics' means over layers shown in the table (when a variant has a lattice)
DIAGNOSTICS = (("lattice/cross_thread", "cross_thread"), ("lattice/entropy", "lattice_entropy"),
               ("lattice/gate", "gate"))


def _norm(a: str | None) -> str | None:
  return None if a is None else "".join(a.split())


def evaluate(model: Model, params: Params, tokenizer: Tokenizer, problems: list[grading.Problem], grader, *,
             num_threads: int, max_new_tokens: int, temperature: float, top_p: float, top_k: int,
             batch_size: int, seed: int = 0, instruction: str = THREAD_INSTRUCTION,
             thinking: bool = True, desc: str = "eval",
             on_batch: Callable[[SampleOutput], None] | None = None,
             diagnostics_rollouts: int = 8, mesh: jax.sharding.Mesh | None = None,
             rules=None, prompt_threads: int | None = None) -> tuple[dict, list[dict]]:
  """Returns (metrics averaged over problems, one record per problem). `on_batch`, if given,
  sees every batch's SampleOutput (this process's rows; e.g. to analyse the samples without
  drawing them again). The lattice diagnostics are measured on the first batch's first
  `diagnostics_rollouts` lattices (0: not measured). With a `mesh` (the params sharded on it;
  `rules`: the sharding rules, default `sharding.DEFAULT_RULES`) every batch is padded to
  `batch_size` problems, which must divide over the mesh's data-parallel ways, and every
  process calls `evaluate` together (module docstring); each gets every record.
  `prompt_threads`: the prompts of that many threads, repeated over the `num_threads` (n
  independent samples of a W-thread prompt: the matched-budget baseline)."""
  w = num_threads
  pw = prompt_threads or w
  records = []
  diagnostics = {}
  share = None
  if mesh is not None:
    rules = tuple(sharding.DEFAULT_RULES if rules is None else rules)
    share = sharding.process_share(mesh, rules)
    if batch_size % share.ways:
      raise ConfigError(f"eval.batch_size={batch_size} does not divide over the "
                       f"{share.ways} data-parallel ways of mesh {dict(mesh.shape)}; make it "
                       f"a multiple of {share.ways}")
  def prompt_of(p: grading.Problem) -> list[list[int]]:
    prompts = thread_prompts(p.problem, pw, thinking=thinking, instruction=instruction)
    return tokenizer.encode_batch([prompts[i % pw] for i in range(w)])

  # one engine for every batch (its compiled shapes reused), batch_size slots, as wide as the
  # longest prompt
  lengths = [max(map(len, prompt_of(p))) for p in problems]  # each problem's longest prompt
  longest = max(lengths, default=1)
  engine = Engine(model, params, slots=batch_size, num_threads=w, max_prompt_len=longest,
                  max_new_tokens=max_new_tokens, stop_ids=(tokenizer.im_end_id,),
                  pad_id=tokenizer.pad_id, mesh=mesh, rules=rules)
  for start in tqdm(range(0, len(problems), batch_size), desc=desc, dynamic_ncols=True,
                    disable=jax.process_index() != 0):
    chunk = problems[start:start + batch_size]
    rows = range(len(chunk))  # this process's rows of the batch
    if share is not None:  # a fixed global batch; this process's block of it
      rows = range(batch_size)[share.rows(batch_size)]
      chunk = [chunk[min(i, len(chunk) - 1)] for i in rows]
    t0 = time.perf_counter()
    # each problem's draws keyed by (seed, its index): the same whatever the batching
    results = engine.generate([
        Request(prompt_of(p), max_new_tokens=max_new_tokens, temperature=temperature,
                top_p=top_p, top_k=top_k,
                seed=int(np.random.SeedSequence([seed, start + i]).generate_state(1)[0]))
        for i, p in zip(rows, chunk)])
    # prompts left-padded to the global batch's longest one rounded up to 16, as `sample` pads
    # a batch (the grid the lattice diagnostics read; the engine keeps power-of-two widths).
    # Every process computes it from the whole batch: the diagnostics run on all together
    width = -(-max(lengths[start:start + batch_size]) // 16) * 16
    out = as_sample_output(results, width=width, max_new_tokens=max_new_tokens,
                           pad_id=tokenizer.pad_id)
    seconds = time.perf_counter() - t0
    if on_batch is not None:
      on_batch(out)
    if start == 0 and diagnostics_rollouts > 0:
      tokens, valid = full_grid(out)
      n = min(diagnostics_rollouts, len(problems), batch_size)
      first = (tokens[:n], valid[:n])
      if share is not None:  # the global batch's first lattices, on every process
        first = tuple(sharding.first_rows(x, n, share) for x in first)
      diagnostics = lattice_diagnostics(model, params, *first, mesh=mesh, rules=rules)
    texts = out.texts(tokenizer)
    parsed = [grading.parse_lattice(t) for t in texts]
    votes = [grading.majority_vote([_norm(a) for a in p.answers]) for p in parsed]
    pairs = []
    for p, vote, prob in zip(parsed, votes, chunk):
      pairs += [(p.answer if p.format_ok else None, prob.answer), (vote, prob.answer)]
      pairs += [(a, prob.answer) for a in p.answers]
    verdicts = grader.grade_many(pairs)
    div = grpo.diversity(out.mean_hidden)
    batch_records = []
    for i, (p, prob) in enumerate(zip(parsed, chunk)):
      if start + rows[i] >= len(problems):  # a copy padding the last batch
        continue
      v = verdicts[i * (2 + w):(i + 1) * (2 + w)]
      batch_records.append({
          "id": prob.id, "gold": prob.answer, "best": p.best, "answer": p.answer,
          "answers": p.answers, "tags": p.tags, "format_error": p.format_error,
          **problem_metrics(p, v, out.lengths[i]),
          "diversity": float(div[i]), "seconds_per_query": seconds / len(chunk),
          "threads": texts[i]})
    records += (batch_records if share is None
                else sharding.gather_blocks(batch_records, share.index))
  metrics = aggregate(records, w)
  metrics.update(diagnostics)
  return metrics, records


def problem_metrics(p: grading.LatticeAnswer, verdicts, lengths) -> dict:
  """One problem's numbers from its parsed lattice `p`, its `verdicts` (the [[best]] answer's,
  the W-thread vote's, then each thread's: 2 + W bools) and its threads' generated `lengths`
  [W]: accuracies, pass@k and maj@k for k = 1..W (lists), and the token budget: total
  generated tokens and the critical path (the longest thread: a lockstep lattice's latency in
  decode steps)."""
  w = len(lengths)
  correct = int(sum(verdicts[2:]))
  norm = [_norm(a) for a in p.answers]
  right = {}  # each distinct answer's verdict (its first thread's)
  for a, ok in zip(norm, verdicts[2:]):
    if a is not None:
      right.setdefault(a, bool(ok))
  pass_k = [grading.pass_at_k(w, correct, k) for k in range(1, w + 1)]
  return {
      "lace_acc": float(verdicts[0]), "maj_acc": float(verdicts[1]), "mean_acc": correct / w,
      "pass@1": pass_k[0], "pass@W": pass_k[-1], "pass@k": pass_k,
      "maj@k": grading.maj_curve(norm, right.__getitem__),
      "format_rate": float(p.format_ok),
      "tokens_per_query": int(np.sum(lengths)), "critical_path_tokens": int(np.max(lengths))}


def aggregate(records: list[dict], w: int) -> dict:
  """Means over problems of the `METRICS` and of each pass@k / maj@k (as "pass@<k>" and
  "maj@<k>"), the critical path, and tokens per correct answer (all generated tokens over
  the problems LACE's [[best]] answer got right; None if it got none)."""
  metrics = {k: float(np.mean([r[k] for r in records])) for k in METRICS}
  for name in ("pass", "maj"):
    for k in range(1, w + 1):
      metrics[f"{name}@{k}"] = float(np.mean([r[f"{name}@k"][k - 1] for r in records]))
  solved = sum(r["lace_acc"] for r in records)
  metrics["tokens_per_correct"] = (sum(r["tokens_per_query"] for r in records) / solved
                                   if solved else None)
  metrics["problems"] = len(records)
  return metrics


def budget_curve(metrics: dict, n: int) -> list[tuple[float, float]]:
  """Independent + Voting's accuracy against its budget, from the metrics of an evaluation that
  drew n independent samples per problem: (expected total generated tokens of k samples,
  maj@k) for k = 1..n. A random k of the n samples cost k/n of the problem's tokens on
  average, so the first coordinate is k x the mean tokens per sample."""
  per_sample = metrics["tokens_per_query"] / n
  return [(k * per_sample, metrics[f"maj@{k}"]) for k in range(1, n + 1)]


def at_budget(curve: list[tuple[float, float]], tokens: float) -> dict:
  """The curve read at `tokens` total generated tokens per problem: `samples` k* = tokens / the
  mean tokens per sample (fractional), `acc` maj@k interpolated linearly between the curve's
  points at floor(k*) and ceil(k*), and `covered` False when k* lies outside 1..n (the end
  point is read then: draw more samples)."""
  per_sample = curve[0][0]
  k = tokens / per_sample if per_sample > 0 else float(len(curve))
  x = min(max(k, 1.0), float(len(curve)))
  lo = int(np.floor(x))
  hi = min(lo + 1, len(curve))
  acc = curve[lo - 1][1] + (x - lo) * (curve[hi - 1][1] - curve[lo - 1][1])
  return {"tokens": float(tokens), "samples": float(k), "acc": float(acc),
          "covered": bool(1.0 <= k <= len(curve))}


def budget_metrics(metrics: dict, n: int, tokens: float) -> dict:
  """The matched-budget numbers added to an n-sample evaluation's metrics: its curve, and its
  accuracy at `tokens` (the matched system's total generated tokens per problem)."""
  curve = budget_curve(metrics, n)
  hit = at_budget(curve, tokens)
  return {"samples": n, "tokens_per_sample": curve[0][0], "budget_curve": curve,
          "budget_tokens": hit["tokens"], "matched_samples": hit["samples"],
          "matched_acc": hit["acc"], "budget_covered": hit["covered"]}


def budget_table(results: dict[str, dict[str, dict]]) -> str:
  """The matched-budget rows (variants with a `budget_curve`): the budget matched, the samples
  it buys, maj@k there, and the curve's ends; "" when no variant has one."""
  lines = []
  for variant, per in results.items():
    for ds, m in per.items():
      if "budget_curve" not in m:
        continue
      n = m["samples"]
      lines.append(f"| {variant} | {ds} | {m['budget_tokens']:.1f} | {m['tokens_per_sample']:.1f} | "
                   f"{m['matched_samples']:.2f}{'' if m['budget_covered'] else ' (outside 1..n)'} | "
                   f"{100 * m['matched_acc']:.1f} | {100 * m['maj@1']:.1f} | {n} | "
                   f"{100 * m[f'maj@{n}']:.1f} |")
  if not lines:
    return ""
  head = ["| variant | dataset | budget (tokens/query) | tokens/sample | samples at budget | "
          "maj at budget | maj@1 | n | maj@n |", "|---|---|---|---|---|---|---|---|---|"]
  return "\n".join(head + lines)


def markdown_table(results: dict[str, dict[str, dict]]) -> str:
  """results[variant][dataset] = metrics -> one row per (variant, dataset); the lattice
  diagnostics' columns when some variant has them ("-" for one without a lattice)."""
  diag = [(k, name) for k, name in DIAGNOSTICS
          if any(k in m for per in results.values() for m in per.values())]
  head = ("| variant | dataset | n | " + " | ".join(METRICS + ("tokens_per_correct",)
                                                     + tuple(n for _, n in diag)) + " |")
  lines = [head, "|" + "---|" * (len(METRICS) + len(diag) + 4)]
  for variant, per in results.items():
    for ds, m in per.items():
      cells = [f"{100 * m[k]:.1f}" if k.endswith(("acc", "rate")) or k.startswith("pass")
               else f"{m[k]:.3f}" if k in ("diversity", "seconds_per_query")
               else f"{m[k]:.1f}" for k in METRICS]
      cells.append("-" if m.get("tokens_per_correct") is None else f"{m['tokens_per_correct']:.1f}")
      cells += [f"{m[k]:.3f}" if k in m else "-" for k, _ in diag]
      lines.append(f"| {variant} | {ds} | {m['problems']} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_tensorboard(results: dict[str, dict[str, dict]], logdir: str) -> None:
  """Every metric as a TensorBoard scalar `eval/<variant>/<dataset>/<metric>` (step 0), the
  pass@k / maj@k curves as `.../pass_at_k` and `.../maj_at_k` with k as the step, and a
  matched-budget variant's accuracy against its budget as `.../maj_at_tokens` (step: total
  generated tokens per problem, rounded)."""
  from tensorboardX import SummaryWriter  # noqa: PLC0415 (only when writing)
  with SummaryWriter(logdir) as tb:
    for variant, per in results.items():
      for ds, m in per.items():
        for k, v in m.items():
          if (isinstance(v, (int, float)) and not isinstance(v, bool)
              and not k.startswith(("pass@", "maj@"))):
            tb.add_scalar(f"eval/{variant}/{ds}/{k}", v, 0)
        for name in ("pass", "maj"):
          ks = sorted(int(k.split("@")[1]) for k in m
                      if k.startswith(name + "@") and k.split("@")[1].isdigit())
          for k in ks:
            tb.add_scalar(f"eval/{variant}/{ds}/{name}_at_k", m[f"{name}@{k}"], k)
        for tokens, acc in m.get("budget_curve", ()):
          tb.add_scalar(f"eval/{variant}/{ds}/maj_at_tokens", acc, int(round(tokens)))


def dataset(name_or_path: str) -> tuple[str, list[grading.Problem]]:
  """(label, problems) of an `eval.datasets` entry: a bundled benchmark name, or a JSONL file of
  problems (`grading.read_problems`' formats), labelled by its file name without `.jsonl`."""
  if name_or_path in grading.BENCHMARKS:
    return name_or_path, grading.load_benchmark(name_or_path)
  if os.path.isfile(name_or_path):
    label = os.path.basename(name_or_path).removesuffix(".jsonl")
    return label, grading.read_problems(name_or_path, name=label)
  raise ConfigError(f"eval.datasets entry {name_or_path!r}: neither a bundled benchmark "
                   f"({', '.join(sorted(grading.BENCHMARKS))}) nor an existing JSONL file")


def run(cfg, workdir: str | None) -> dict:
  """The `eval` mode: every variant on every dataset; JSON + markdown in the workdir."""
  e = cfg.eval
  model_cfg, lattice = model_configs(cfg)
  tokenizer, _ = resolve_tokenizer(cfg)
  mesh = sharding.make_mesh(dict(cfg.sharding.mesh))
  rules = sharding.rules_with_overrides(cfg.sharding.rules)
  # every process builds its own devices' slices of the weights (they are the same everywhere)
  on_mesh = lambda m, p: sharding.place(p, sharding.logical_to_sharding(m.logical_axes(), mesh,
                                                                       rules))
  model, params = load_or_init(cfg, model_cfg, lattice)
  params = on_mesh(model, params)
  if not cfg.model.checkpoint and jax.process_index() == 0:
    print("note: no model.checkpoint given: evaluating a randomly initialised model",
          flush=True)
  variants = {}
  for name in e.variants:
    if name == "model":
      variants[name] = model, params
    elif name == "lattice_off":
      variants[name] = model.replace(lattice=None), without_lattice(params)
    elif name != "budget":
      raise ConfigError(f"eval.variants entry {name!r}; expected 'model', 'lattice_off' or "
                        "'budget'")
  for path in e.checkpoints:
    m, p = load_pretrained(path, dtype=model_cfg.param_dtype, compute_dtype=model_cfg.dtype)
    variants[os.path.basename(os.path.normpath(path))] = m, on_mesh(m, p)
  budget = None
  if "budget" in e.variants:  # Independent + Voting at the matched variant's token budget
    b = e.get("budget")
    if b is None or b.samples < 1:
      raise ConfigError("eval.variants has 'budget' but eval.budget.samples is not set; set "
                        "--config.eval.budget.samples=N (independent samples per problem, "
                        "e.g. 4 x eval.num_threads)")
    if b.match not in variants:
      raise ConfigError(f"eval.budget.match={b.match!r} is not an evaluated variant "
                        f"({', '.join(variants)}): the budget is that variant's tokens")
    if b.checkpoint:
      m, p = load_pretrained(b.checkpoint, dtype=model_cfg.param_dtype,
                             compute_dtype=model_cfg.dtype)
      if m.lattice is not None:  # its samples must be independent
        m, p = m.replace(lattice=None), without_lattice(p)
      budget = m, on_mesh(m, p)
    else:  # the evaluated weights without the side path: W threads that do not read each other
      budget = model.replace(lattice=None), without_lattice(params)
  template = instruction_template(e.instruction)
  results: dict[str, dict[str, dict]] = {}
  os.makedirs(workdir or ".", exist_ok=True)
  with grading.Grader(num_workers=e.grader_workers, timeout_s=e.grader_timeout_s) as grader:
    for vname, (vmodel, vparams) in variants.items():
      results[vname] = {}
      for ds_arg in e.datasets:
        ds, problems = dataset(ds_arg)
        if e.limit:
          problems = problems[:e.limit]
        metrics, records = evaluate(
            vmodel, vparams, tokenizer, problems, grader, num_threads=e.num_threads,
            max_new_tokens=e.max_new_tokens, temperature=e.temperature, top_p=e.top_p,
            top_k=e.top_k, batch_size=e.batch_size, seed=cfg.seed, instruction=template,
            thinking=e.thinking, desc=f"{vname}/{ds}",
            diagnostics_rollouts=e.get("diagnostics_rollouts", 8), mesh=mesh, rules=rules)
        results[vname][ds] = metrics
        if workdir and jax.process_index() == 0:
          with open(os.path.join(workdir, f"predictions_{vname}_{ds}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    if budget is not None:
      # n independent samples per problem, drawn as one grid of n threads without a lattice;
      # the vote over k of them read for every k, and the curve read at the matched tokens
      b = e.budget
      results["budget"] = {}
      for ds_arg in e.datasets:
        ds, problems = dataset(ds_arg)
        if e.limit:
          problems = problems[:e.limit]
        metrics, records = evaluate(
            *budget, tokenizer, problems, grader, num_threads=b.samples,
            max_new_tokens=e.max_new_tokens, temperature=e.temperature, top_p=e.top_p,
            top_k=e.top_k, batch_size=e.batch_size, seed=cfg.seed, instruction=template,
            thinking=e.thinking, desc=f"budget/{ds}", diagnostics_rollouts=0, mesh=mesh,
            rules=rules, prompt_threads=e.num_threads)
        metrics.update(budget_metrics(metrics, b.samples,
                                      results[b.match][ds]["tokens_per_query"]))
        results["budget"][ds] = metrics
        if workdir and jax.process_index() == 0:
          with open(os.path.join(workdir, f"predictions_budget_{ds}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
  table = markdown_table(results)
  matched = budget_table(results)
  if matched:
    table += ("\n\nIndependent + Voting at the token budget of variant "
              f"{e.budget.match!r} (maj over k of {e.budget.samples} independent samples, "
              "read at its tokens per query):\n\n" + matched)
  if jax.process_index() == 0:
    print(table, flush=True)
  if workdir and jax.process_index() == 0:
    write_tensorboard(results, os.path.join(workdir, "tensorboard"))
  if workdir and jax.process_index() == 0:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=2)
    with open(os.path.join(workdir, "results.md"), "w") as f:
      f.write(table + "\n")
  return {"results": results, "table": table}
