"""Plots of a toy comparison run, drawn from its logged metrics (never by hand).

  python -m lace_jax.toy.plots --workdir=runs/toy_search --out=docs/figures

Reads WORKDIR/seed*/<variant>/<stage>/metrics.jsonl (training curves), the eval stages'
done.json (the attention picture), the budget stage's curves and WORKDIR/results.json (the
accuracy table); writes training_curves.png, attention_to_other_threads.png, accuracy.png and
accuracy_vs_tokens.png to --out.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

try:
  import matplotlib
except ImportError as e:  # an optional dependency: say which extra brings it
  raise ImportError("lace_jax.toy.plots needs matplotlib: pip install 'lace_jax[plots]'") from e

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lace_jax.toy.comparison import NAMES  # noqa: E402

COLORS = {"lace": "tab:red", "isolated": "tab:blue", "independent": "tab:gray"}


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _runs(workdir: str) -> dict[str, dict[str, dict[int, str]]]:
  """variant -> stage -> seed -> stage directory."""
  out: dict = {}
  for d in sorted(glob.glob(os.path.join(workdir, "seed*", "*", "*"))):
    seed = int(os.path.basename(os.path.dirname(os.path.dirname(d)))[4:])
    variant, stage = os.path.basename(os.path.dirname(d)), os.path.basename(d)
    out.setdefault(variant, {}).setdefault(stage, {})[seed] = d
  return out


def _curve(dirs: dict[int, str], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
  """(steps, mean over seeds, std over seeds) of a logged metric, on the steps all seeds have."""
  series = []
  for d in dirs.values():
    path = os.path.join(d, "metrics.jsonl")
    if not os.path.isfile(path):
      continue
    rows = {r["step"]: r[key] for r in read_jsonl(path) if key in r}
    if rows:
      series.append(rows)
  if not series:
    return None
  steps = sorted(set.intersection(*(set(s) for s in series)))
  vals = np.array([[s[t] for t in steps] for s in series])
  return np.array(steps), vals.mean(0), vals.std(0)


def _band(ax, curve, color, label, offset=0):
  steps, mean, std = curve
  ax.plot(steps + offset, mean, color=color, label=label, lw=1.4)
  ax.fill_between(steps + offset, mean - std, mean + std, color=color, alpha=0.2, lw=0)


def training_curves(runs, out: str) -> str:
  fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
  panels = [("loss (CPT then SFT)", ("pretrain", "sft"), "loss"),
            ("GRPO reward", ("grpo",), "reward"), ("GRPO accuracy", ("grpo",), "accuracy"),
            ("GRPO diversity", ("grpo",), "diversity")]
  for ax, (title, stages, key) in zip(axes, panels):
    for variant, per_stage in runs.items():
      offset = 0
      for i, stage in enumerate(stages):
        curve = _curve(per_stage.get(stage, {}), key)
        if curve is None:
          continue
        _band(ax, curve, COLORS.get(variant, "k"), NAMES.get(variant, variant) if i == 0
              else None, offset)
        if len(stages) > 1:
          ax.axvline(offset + curve[0][-1], color="k", lw=0.5, ls=":")
        offset += curve[0][-1]
    ax.set_title(title)
    ax.set_xlabel("step")
    if key == "loss":
      ax.set_yscale("log")
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  path = os.path.join(out, "training_curves.png")
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def attention_picture(runs, out: str) -> str | None:
  profiles = []
  for d in runs.get("lace", {}).get("eval", {}).values():
    with open(os.path.join(d, "done.json")) as f:
      prof = json.load(f).get("attention_to_other_threads")
    if prof:
      profiles.append(prof)
  if not profiles:
    return None
  fig, ax = plt.subplots(figsize=(7, 3.8))
  for layer in sorted(profiles[0]):
    vals = np.array([p[layer] for p in profiles])
    steps = np.arange(vals.shape[1])
    ax.plot(steps, vals.mean(0), label=layer.replace("layers_", "lattice layer "))
    ax.fill_between(steps, vals.mean(0) - vals.std(0), vals.mean(0) + vals.std(0), alpha=0.2)
  ax.set_xlabel("generation step")
  ax.set_ylabel("attention mass on other threads")
  ax.set_ylim(0, 1)
  ax.set_title("LACE: attention to other threads\n(mean over threads, heads, test problems, seeds)",
               fontsize=10)
  ax.legend(fontsize=8)
  fig.tight_layout()
  path = os.path.join(out, "attention_to_other_threads.png")
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def accuracy_chart(workdir: str, out: str) -> str | None:
  path = os.path.join(workdir, "results.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    result = json.load(f)
  table = result["table"]
  fig, ax = plt.subplots(figsize=(6, 3.6))
  names = list(table)
  means = [100 * table[v]["accuracy"]["mean"] for v in names]
  stds = [100 * table[v]["accuracy"]["std"] for v in names]
  ax.bar(range(len(names)), means, yerr=stds, capsize=4,
         color=[COLORS.get(v, "k") for v in names])
  for i, v in enumerate(names):  # every seed as a dot
    pts = [100 * x for x in table[v]["accuracy"]["per_seed"]]
    ax.scatter([i] * len(pts), pts, color="k", s=10, zorder=3)
  ax.set_xticks(range(len(names)), [NAMES.get(v, v).replace(" (", "\n(") for v in names],
                fontsize=8)
  ax.set_ylabel("accuracy (%)")
  ax.set_title(f"{result.get('task', 'toy task')}: accuracy (mean ± std over seeds)")
  fig.tight_layout()
  path = os.path.join(out, "accuracy.png")
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def budget_chart(runs, workdir: str, out: str) -> str | None:
  """Accuracy against total generated tokens per problem: Independent + Voting's curve (maj@k of
  k independent samples, k = 1..n; mean over seeds, band: std) and each system's evaluated
  point (mean ± std over seeds)."""
  dirs = runs.get("independent", {}).get("budget", {})
  curves = []
  for d in dirs.values():
    path = os.path.join(d, "done.json")
    if os.path.isfile(path):
      with open(path) as f:
        curves.append(np.array(json.load(f)["budget_curve"]))  # [n, 2]: tokens, accuracy
  results = os.path.join(workdir, "results.json")
  if not curves or not os.path.isfile(results):
    return None
  with open(results) as f:
    table = json.load(f)["table"]
  c = np.stack([x[:min(len(y) for y in curves)] for x in curves])  # [seeds, n, 2]
  tokens, acc, std = c[..., 0].mean(0), 100 * c[..., 1].mean(0), 100 * c[..., 1].std(0)
  fig, ax = plt.subplots(figsize=(6, 3.8))
  ax.plot(tokens, acc, "-o", ms=3, color=COLORS["independent"],
          label=f"Independent + Voting, k = 1..{len(tokens)} samples")
  ax.fill_between(tokens, acc - std, acc + std, color=COLORS["independent"], alpha=0.2)
  for v, m in table.items():
    ax.errorbar(m["tokens_per_query"]["mean"], 100 * m["accuracy"]["mean"],
                yerr=100 * m["accuracy"]["std"], fmt="s", ms=7, capsize=4,
                color=COLORS.get(v, "k"), label=f"{NAMES.get(v, v)} (W threads)")
  ax.set_xlabel("total generated tokens per problem")
  ax.set_ylabel("accuracy (%)")
  ax.set_title(f"accuracy against tokens ({len(curves)} seeds)")
  ax.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  path = os.path.join(out, "accuracy_vs_tokens.png")
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def main(argv: list[str] | None = None) -> list[str]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  if not os.path.isdir(args.workdir):
    raise SystemExit(f"error: --workdir {args.workdir} is not a directory")
  runs = _runs(args.workdir)
  if not runs:
    raise SystemExit(f"error: no seed*/<variant>/<stage> runs under {args.workdir}")
  os.makedirs(args.out, exist_ok=True)
  written = [p for p in (training_curves(runs, args.out), attention_picture(runs, args.out),
                         accuracy_chart(args.workdir, args.out),
                         budget_chart(runs, args.workdir, args.out)) if p]
  for p in written:
    print(f"wrote {p}")
  return written


if __name__ == "__main__":
  main()
