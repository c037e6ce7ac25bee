"""The selection diagnostic as a mode: can the lattice learn to *select* what another thread
found? (`python -m lace_jax.main --config=experiments/toy_selection.py`, sweepable.)

Each of W threads reads raw tokens [BOS, k random digits, MARK, d_w, k random digits, EQ] and
must answer at EQ with a digit it can only know from the other threads:

  copy   the next thread's marked digit d_{(w+1) mod W} (W = 2: the other thread's)
  sum    (d_1 + ... + d_W) mod 10, the same answer in every thread

With k = 0 distractors uniform attention over the other threads already carries d (it only
checks that information flows); with k > 0 the marked digit is one of 2k + 1 digits per thread
and the lattice has to pick its key: the thing the paper's method needs (a thread using what
another one found) and what the side path as first built learnt slowly. Chance is 10%.

The tiny backbone is trained from scratch with Adam, the lattice's parameters at
`selection.lattice_lr_multiplier` x the learning rate. Every `eval_every` steps the held-out
accuracy is measured on `eval_problems` fresh problems (a fixed seed); the result holds the
final and best accuracy, the first step at `target` accuracy, and the lattice diagnostics
(`lace_jax.diagnostics`: cross-thread attention share, entropy, gate) on the held-out set.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from lace_jax.diagnostics import lattice_diagnostics
from lace_jax.model import Model, is_lattice_param
from lace_jax.training.setup import model_configs

BOS, MARK, EQ = 10, 11, 12
VOCAB = 16
TASKS = ("copy", "sum")


def problems(rng: np.random.Generator, n: int, *, task: str, num_threads: int,
             distract: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [n, W, 2k + 4] int32, answers [n, W] int32)."""
  w, k = num_threads, distract
  d = rng.integers(0, 10, (n, w))
  if task == "copy":
    ans = np.roll(d, -1, axis=1)  # thread w answers thread w + 1's digit
  elif task == "sum":
    ans = np.broadcast_to(d.sum(1, keepdims=True) % 10, (n, w))
  else:
    raise ValueError(f"selection.task={task!r}; expected one of {TASKS}")
  tok = np.zeros((n, w, 2 * k + 4), np.int32)
  tok[:, :, 0] = BOS
  tok[:, :, 1:1 + k] = rng.integers(0, 10, (n, w, k))
  tok[:, :, 1 + k] = MARK
  tok[:, :, 2 + k] = d
  tok[:, :, 3 + k:3 + 2 * k] = rng.integers(0, 10, (n, w, k))
  tok[:, :, -1] = EQ
  return tok, np.ascontiguousarray(ans).astype(np.int32)


def run(cfg: ml_collections.ConfigDict, workdir: str | None) -> dict:
  s = cfg.selection
  if s.task not in TASKS:
    raise ValueError(f"selection.task={s.task!r}; expected one of {TASKS}")
  for key in ("num_threads", "steps", "batch_size", "eval_every", "eval_problems"):
    if not isinstance(s[key], int) or s[key] < 1:
      raise ValueError(f"selection.{key}={s[key]!r}; expected an int >= 1")
  if s.distract < 0:
    raise ValueError(f"selection.distract={s.distract}; expected >= 0")
  model_cfg, lattice = model_configs(cfg)
  model_cfg = dataclasses.replace(model_cfg, vocab_size=VOCAB)
  model = Model(model_cfg, lattice)
  params = model.init(cfg.seed)
  lr = optax.warmup_cosine_decay_schedule(0.0, s.lr, min(100, s.steps // 10 + 1), s.steps)
  labels = jax.tree_util.tree_map_with_path(
      lambda p, _: "lattice" if is_lattice_param(p) else "backbone", params)
  opt = optax.multi_transform(
      {"backbone": optax.adam(lr),
       "lattice": optax.adam(lambda i: lr(i) * s.lattice_lr_multiplier)}, labels)
  state = opt.init(params)
  kw = dict(task=s.task, num_threads=s.num_threads, distract=s.distract)

  def loss_fn(p, tok, ans):
    logits = model.apply(p, tok)[:, :, -1]  # [B, W, V] at EQ
    lp = jax.nn.log_softmax(logits.astype(jnp.float32))
    loss = -jnp.take_along_axis(lp, ans[..., None], -1).mean()
    return loss, (logits.argmax(-1) == ans).mean()

  @jax.jit
  def step(p, st, tok, ans):
    (loss, acc), g = jax.value_and_grad(loss_fn, has_aux=True)(p, tok, ans)
    updates, st = opt.update(g, st, p)
    return optax.apply_updates(p, updates), st, loss, acc

  evaluate = jax.jit(loss_fn)
  eval_tok, eval_ans = problems(np.random.default_rng(10_000 + cfg.seed), s.eval_problems, **kw)
  rng = np.random.default_rng(cfg.seed)
  history, first_at_target = [], None
  if workdir:
    os.makedirs(workdir, exist_ok=True)
  log = open(os.path.join(workdir, "metrics.jsonl"), "w") if workdir else None
  t0 = time.time()
  # with stop_at_target the run ends at the first evaluation at the target: the bar counts to
  # the most steps it may take, and shows no ETA to them
  bar = tqdm(range(1, s.steps + 1), unit="step", mininterval=2,
             desc=(f"selection (stops at {s.target:.0%} accuracy, checked every {s.eval_every} "
                   "steps)" if s.stop_at_target else "selection"),
             bar_format=("{desc}: {n_fmt} of at most {total_fmt} steps [{elapsed}, {rate_fmt}"
                         "{postfix}]" if s.stop_at_target else None))
  for i in bar:
    params, state, loss, acc = step(params, state, *problems(rng, s.batch_size, **kw))
    if i % s.eval_every == 0 or i == s.steps:
      eval_loss, eval_acc = (float(x) for x in evaluate(params, eval_tok, eval_ans))
      row = {"step": i, "loss": float(loss), "train_accuracy": float(acc),
             "eval_loss": eval_loss, "accuracy": eval_acc, "time": time.time() - t0}
      history.append(row)
      if first_at_target is None and eval_acc >= s.target:
        first_at_target = i
      bar.set_postfix(acc=f"{eval_acc:.3f}")
      if log:
        log.write(json.dumps(row) + "\n")
        log.flush()
      if first_at_target is not None and s.stop_at_target:
        bar.close()
        print(f"selection: {eval_acc:.1%} >= {s.target:.0%} at step {i}: stopped "
              "(selection.stop_at_target)", flush=True)
        break
  if log:
    log.close()
  diag = lattice_diagnostics(model, params, jnp.asarray(eval_tok[:64]),
                             jnp.ones(eval_tok[:64].shape, bool)) if lattice else {}
  result = {"accuracy": history[-1]["accuracy"], "best_accuracy": max(r["accuracy"]
                                                                      for r in history),
            "steps_to_target": first_at_target, "target": s.target, "chance": 0.1,
            "steps": history[-1]["step"],
            "seconds": time.time() - t0, **{k: float(v) for k, v in diag.items()}}
  print(f"selection ({s.task}, W={s.num_threads}, k={s.distract}, "
        f"{'lattice' if lattice else 'no lattice'}): accuracy {result['accuracy']:.3f} "
        f"(best {result['best_accuracy']:.3f}, target {s.target} at step {first_at_target})",
        flush=True)
  return result


def study_table(workdir: str) -> str:
  """The selection study's compact table (markdown) from a sweep's WORKDIR/sweep_seeds.json
  (`--sweep=...,seeds`): per setting, held-out accuracy mean ± std and per seed, the step at
  which each seed reached the target, and the lattice diagnostics' means.

    python -m lace_jax.toy.selection runs/selection_study
  """
  path = os.path.join(workdir, "sweep_seeds.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no table; run the sweep with seeds swept (and "
                            "--sweep_table) first")
  with open(path) as f:
    data = json.load(f)
  columns, rows = data["columns"], data["rows"]
  keys = columns[:columns.index("n")]
  pct = lambda x: f"{100 * x:.1f}"
  out = ["| setting (vs the paper's side path) | seeds | accuracy % (mean ± std) | per seed | "
         "95% reached at step | other-thread share | entropy (nats) | gate |",
         "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    setting = ", ".join(f"{k.split('.', 1)[-1]}={r[k]}" for k in keys
                        if r.get(k) not in ("", None))
    if r.get("lattice.enabled") == "False":
      setting = "no lattice (the control)"
    if not r["n"]:
      continue
    acc, std = r.get("result.accuracy"), r.get("result.accuracy.std")
    seeds = r["result.accuracy.per_seed"].split(" / ")
    steps = r.get("result.steps_to_target.per_seed", "").split(" / ")
    num = lambda k, f="{:.3f}": f.format(r[k]) if isinstance(r.get(k), (int, float)) else "-"
    out.append(
        f"| {setting or '**the paper** (source=attn_out)'} | {r['n']} | {pct(acc)} ± {pct(std)} | "
        + " / ".join(pct(float(s)) for s in seeds) + " | "
        + " / ".join(s or "-" for s in steps) + " | "
        + f"{num('result.lattice/cross_thread')} | {num('result.lattice/entropy', '{:.2f}')} | "
        + f"{num('result.lattice/gate')} |")
  return "\n".join(out)


if __name__ == "__main__":
  print(study_table(sys.argv[1] if len(sys.argv) > 1 else "runs/selection_study"))
