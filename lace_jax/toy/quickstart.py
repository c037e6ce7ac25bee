"""The embedded default job of `python -m lace_jax.main` (no --config needed).

  python -m lace_jax.main --workdir=runs/quickstart

Two checks of the mechanism, each trained from scratch here with the lattice and without it
(`lattice=None`), on the same data and budget, in a few minutes on 2 CPU cores (measured in
docs/benchmarks.md, "The README's times"):

  selection  the selection diagnostic (`lace_jax.toy.selection`, experiments/toy_selection.py):
             each of W = 2 threads must answer the other thread's marked digit, hidden among 12
             distractor digits; the lattice run stops at 95% held-out accuracy (at most
             `selection.steps`) and the run without the lattice gets as many steps
  relay      the relay (experiments/toy_relay.py) through the whole product: data in the
             training schema -> SFT with the run loop -> the lockstep sampler -> the grader;
             every thread must answer the sum of both threads' private digits

Without cross-thread communication neither can beat chance (10%). It prints one table and
writes it to WORKDIR/quickstart.md; a rerun skips the finished parts. The full comparison
with the baselines (exploration by pair search, 3 systems x 5 seeds, about 5 hours on 2 cores) is
`--config=experiments/toy_search.py` (docs/results.md).
"""

from __future__ import annotations

import copy
import json
import os

import ml_collections

from lace_jax.toy import configs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`:runlocal`: a smoke-test size (seconds; the numbers mean nothing)."""
  cfg = configs.relay_config()
  cfg.mode = "quickstart"
  cfg.selection = configs.selection_config().selection
  cfg.selection.stop_at_target = True
  if arg == "runlocal":
    cfg.toy.update(train_problems=64, test_problems=8)
    cfg.sft.train.update(steps=4, save_every=4, log_every=1)
    cfg.eval.batch_size = 8
    cfg.selection.update(steps=20, eval_every=10, eval_problems=32, batch_size=8)
  elif arg:
    raise ValueError(f"quickstart config argument {arg!r}; expected none or 'runlocal'")
  return cfg


def _selection_config(cfg: ml_collections.ConfigDict, *, lattice: bool, steps: int):
  """The selection mode's config with the quickstart's model, lattice and seed."""
  sel = configs.selection_config()
  sel.seed = cfg.seed
  sel.model = copy.deepcopy(cfg.model)
  sel.lattice = copy.deepcopy(cfg.lattice)
  sel.lattice.enabled = lattice and cfg.lattice.enabled
  sel.selection = copy.deepcopy(cfg.selection)
  sel.selection.steps = steps
  return sel


def _once(path: str, fn) -> dict:
  """fn() unless path holds its result from an earlier run."""
  if os.path.isfile(path):
    with open(path) as f:
      return json.load(f)
  result = fn()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(result, f, indent=2)
  os.replace(path + ".tmp", path)
  return result


def table(sel_on: dict, sel_off: dict, relay: dict, num_threads: int, distract: int) -> str:
  pct = lambda x: f"{100 * x:.1f}%"
  acc = {v: relay["table"][v]["accuracy"]["mean"] for v in relay["table"]}
  return "\n".join([
      "| check (W = 2 threads, trained here from scratch) | LACE | without the lattice | "
      "chance |",
      "|---|---|---|---|",
      f"| selection: answer the other thread's marked digit among {2 * distract} distractors "
      f"({sel_on['steps']} steps each) | **{pct(sel_on['accuracy'])}** | "
      f"{pct(sel_off['accuracy'])} | 10% |",
      f"| relay: answer the sum of the threads' private digits (SFT, greedy decoding, graded; "
      f"{num_threads} threads) | **{pct(acc['lace'])}** | {pct(acc['isolated'])} | 10% |",
  ])


def run(cfg: ml_collections.ConfigDict, workdir: str | None) -> dict:
  # lazy: this file is the CLI's default --config, loaded when the CLI starts; the demo's
  # model stack (jax, orbax, ...) loads only when the quickstart runs
  from lace_jax.toy import comparison, selection  # noqa: PLC0415
  if not workdir:
    raise ValueError("the quickstart needs --workdir (its runs and table go there)")
  if not cfg.lattice.enabled:
    raise ValueError("lattice.enabled=False: the quickstart compares the lattice with its "
                     "absence and needs it on")
  os.makedirs(workdir, exist_ok=True)
  print("== 1/3 selection with the lattice", flush=True)
  on = _once(os.path.join(workdir, "selection_lattice", "result.json"), lambda: selection.run(
      _selection_config(cfg, lattice=True, steps=cfg.selection.steps),
      os.path.join(workdir, "selection_lattice")))
  print(f"== 2/3 selection without the lattice ({on['steps']} steps, as many)", flush=True)
  off_cfg = _selection_config(cfg, lattice=False, steps=on["steps"])
  off_cfg.selection.stop_at_target = False
  off = _once(os.path.join(workdir, "selection_none", "result.json"), lambda: selection.run(
      off_cfg, os.path.join(workdir, "selection_none")))
  print("== 3/3 relay: SFT and evaluation, with and without the lattice", flush=True)
  relay_cfg = copy.deepcopy(cfg)
  relay_cfg.unlock()
  relay_cfg.mode = "relay"
  relay = comparison.run_comparison(relay_cfg, os.path.join(workdir, "relay"))
  md = table(on, off, relay, cfg.toy.num_threads, cfg.selection.distract)
  note = ("Without the lattice the threads cannot see each other: chance is the best they can "
          "do.\nThe exploration comparison with the baselines (pair search, LACE vs Isolated "
          "Parallel vs\nIndependent + Voting, 5 seeds, SFT 3000 steps: about 5 hours on 2 cores): "
          "python -m lace_jax.main --config=experiments/toy_search.py --workdir=runs/toy_search"
          "\n(docs/results.md).")
  with open(os.path.join(workdir, "quickstart.md"), "w") as f:
    f.write(md + "\n\n" + note + "\n")
  print("\n" + md + "\n\n" + note, flush=True)
  return {"selection": {"lattice": on, "none": off}, "relay": relay["table"], "markdown": md}
