"""Ablation sweeps declared in experiment files and run by `python -m lace_jax.main`.

An experiment file declares a sweep as a function `sweep_<name>()` returning a list of
override dicts (config paths -> values), built with the helpers here:

  from lace_jax import sweep

  def sweep_norm():      # --sweep=norm
    return sweep.product({"lattice.qk_norm": [False, True], "lattice.init_std": [0.02, 0.1]})

  def sweep_seeds():     # --sweep=seeds; --sweep=norm,seeds multiplies: 4 x 3 points
    return sweep.values("seed", [0, 1, 2])

Run, resume, inspect:

  python -m lace_jax.main --config=experiments/X.py --workdir=DIR --sweep=norm,seeds [--jobs=2]
  python -m lace_jax.main ... --sweep=norm,seeds --sweep_print     # one command per point
  python -m lace_jax.main ... --sweep=norm,seeds --sweep_index=3   # run point 3 only
  python -m lace_jax.main ... --sweep=norm,seeds --sweep_table     # the table, nothing run
  python -m lace_jax.main ... --sweep=norm,seeds --retry_failed    # rerun failed points too

Every point runs as its own `python -m lace_jax.main` process (its own JAX runtime; a crash
stays in its point) with the command line's own `--config.*` overrides, then the point's, in
DIR/<point name>, a name made of its overrides. A point's state lives in that directory
(`sweep_point.json`): done points are skipped, an interrupted one is run again and continues
from its own checkpoints (every mode resumes from its workdir), a failed one is recorded with
its exit status and the tail of its log and does not stop the others (`--retry_failed` reruns
them). Final metrics are the numbers in each point's `result.json` (what its mode returned), as
columns `result.<key>`.
At the end (and with `--sweep_table`) one table of every point, swept values as columns, then
metrics and status, is written as DIR/sweep.md, sweep.csv, sweep.json, and plotted
(sweep.png, when matplotlib is installed).
"""

from __future__ import annotations

import csv
import ctypes
import dataclasses
import hashlib
import importlib.util
import itertools
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

from lace_jax import workdir as workdir_lock

Override = dict[str, Any]

STATE = "sweep_point.json"
RESULT = "result.json"
LOG = "sweep_point.log"


# ------------------------------------------------------------------ declaring sweeps


def values(key: str, options: Iterable[Any]) -> list[Override]:
  """One axis: [{key: v} for v in options]."""
  return [{key: v} for v in options]


def product(axes: dict[str, Iterable[Any]]) -> list[Override]:
  """Every combination of the axes' values (the first key varies slowest)."""
  keys = list(axes)
  return [dict(zip(keys, combo)) for combo in itertools.product(*(list(axes[k]) for k in keys))]


def zip_(axes: dict[str, Iterable[Any]]) -> list[Override]:
  """The axes' values taken together, position by position (all must have the same length)."""
  lists = {k: list(v) for k, v in axes.items()}
  lengths = {k: len(v) for k, v in lists.items()}
  if len(set(lengths.values())) > 1:
    raise ValueError(f"sweep.zip_: axes of different lengths {lengths}")
  n = next(iter(lengths.values()), 0)
  return [{k: lists[k][i] for k in lists} for i in range(n)]


def multiply(*sweeps: Sequence[Override]) -> list[Override]:
  """The product of sweeps: each point of the first merged with each of the next (a key set by
  two sweeps is an error)."""
  points: list[Override] = [{}]
  for sweep in sweeps:
    merged = []
    for a in points:
      for b in sweep:
        both = set(a) & set(b)
        if both:
          raise ValueError(f"sweeps multiplied set the same keys {sorted(both)}")
        merged.append({**a, **b})
    points = merged
  return points


# ------------------------------------------------------------------ points


def _format(value: Any) -> str:
  if isinstance(value, str):
    return value
  if isinstance(value, (list, tuple)):
    return "(" + ",".join(_format(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return repr(value) if isinstance(value, float) else str(value)


def _flag_value(value: Any) -> str:
  """A value as `--config.key=...` text that ml_collections parses back to the same value."""
  if isinstance(value, bool):
    return str(value)
  if isinstance(value, (list, tuple)):
    return "(" + ",".join(_flag_value(v) if not isinstance(v, str) else repr(v) for v in value) + (
        "," if len(value) == 1 else "") + ")"
  return str(value) if not isinstance(value, float) else repr(value)


def point_name(overrides: Override) -> str:
  """A directory name made of the overrides, readable and unique (a short hash of the exact
  values guards against two points that read alike)."""
  if not overrides:
    return "base"
  text = ",".join(f"{k.split('.')[-1]}={_format(v)}" for k, v in overrides.items())
  text = re.sub(r"[^A-Za-z0-9_.=,+-]+", "_", text)[:80]
  digest = hashlib.sha1(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()
  return f"{text}-{digest[:6]}"


@dataclasses.dataclass
class Point:
  index: int
  overrides: Override
  workdir: str

  @property
  def state(self) -> dict:
    path = os.path.join(self.workdir, STATE)
    if not os.path.exists(path):
      return {"status": "pending"}
    with open(path) as f:
      return json.load(f)

  def write_state(self, **state) -> None:
    os.makedirs(self.workdir, exist_ok=True)
    tmp = os.path.join(self.workdir, STATE + ".tmp")
    with open(tmp, "w") as f:
      json.dump({"index": self.index, "overrides": self.overrides, **state}, f, indent=2,
                default=str)
    os.replace(tmp, os.path.join(self.workdir, STATE))  # never a half-written state


def _load_module(config_file: str):
  path = config_file.split(":")[0]
  spec = importlib.util.spec_from_file_location("lace_sweep_experiment", path)
  if spec is None or spec.loader is None:
    raise ValueError(f"--sweep: cannot load the experiment file {path}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return path, module


def plot_metrics_of(config_file: str) -> tuple[str, ...] | None:
  """The experiment file's `SWEEP_PLOT` (result keys to plot, e.g. ("accuracy",
  "steps_to_target")), or None: the plot then takes the first varying metrics."""
  _, module = _load_module(config_file)
  metrics = getattr(module, "SWEEP_PLOT", None)
  return tuple(metrics) if metrics else None


def load_sweep(config_file: str, names: Sequence[str]) -> list[Override]:
  """The points of `--sweep=name1,name2` (several names multiply) from the experiment file."""
  path, module = _load_module(config_file)
  available = sorted(n[len("sweep_"):] for n in dir(module)
                     if n.startswith("sweep_") and callable(getattr(module, n)))
  sweeps = []
  for name in names:
    fn = getattr(module, f"sweep_{name}", None)
    if fn is None:
      raise ValueError(f"--sweep={name}: {path} has no function sweep_{name}(); "
                       f"its sweeps: {available or 'none'}")
    points = list(fn())
    for p in points:
      if not isinstance(p, dict) or not all(isinstance(k, str) for k in p):
        raise ValueError(f"sweep_{name}() in {path} must return a list of dicts of config "
                         f"paths to values; got an element {p!r}")
    sweeps.append(points)
  return multiply(*sweeps)


def points_of(config_file: str, names: Sequence[str], workdir: str) -> list[Point]:
  overrides = load_sweep(config_file, names)
  points = [Point(i, o, os.path.join(workdir, point_name(o))) for i, o in enumerate(overrides)]
  dirs = [p.workdir for p in points]
  if len(set(dirs)) != len(dirs):
    dup = sorted({d for d in dirs if dirs.count(d) > 1})
    raise ValueError(f"the sweep has repeated points: {dup}")
  return points


def command(point: Point, config_flag: str, base_overrides: Sequence[str]) -> list[str]:
  """The `python -m lace_jax.main` command of one point."""
  return [sys.executable, "-m", "lace_jax.main", f"--config={config_flag}",
          f"--workdir={point.workdir}", *base_overrides,
          *(f"--config.{k}={_flag_value(v)}" for k, v in point.overrides.items())]


def index_command(point: Point, argv: Sequence[str]) -> str:
  """The command a launcher runs for one point: this command line with --sweep_index=i."""
  keep = [a for a in argv[1:] if not re.match(r"--(no)?(sweep_print|sweep_index|jobs|"
                                              r"retry_failed|sweep_table)\b", a)]
  return shlex.join([sys.executable, "-m", "lace_jax.main", *keep,
                     f"--sweep_index={point.index}"])


# ------------------------------------------------------------------ running


def _run_point(point: Point, config_flag: str, base: Sequence[str], log) -> subprocess.Popen:
  os.makedirs(point.workdir, exist_ok=True)
  point.write_state(status="running", started=time.time(),
                    attempts=point.state.get("attempts", 0) + 1)
  out = open(os.path.join(point.workdir, LOG), "a")
  out.write(f"\n$ {shlex.join(command(point, config_flag, base))}\n")
  out.flush()
  log(f"  [{point.index}] start {os.path.basename(point.workdir)}")
  proc = subprocess.Popen(command(point, config_flag, base), stdout=out, stderr=subprocess.STDOUT,
                          preexec_fn=_die_with_parent(os.getpid()))
  proc._lace_log = out  # closed when the point ends
  return proc


def _die_with_parent(parent: int):
  """A `preexec_fn` that has the kernel send the point SIGTERM when the runner dies, however it
  dies (SIGKILL included; Linux's PR_SET_PDEATHSIG): the point checkpoints at its next step
  and exits, so no point outlives its runner to be started again beside itself. Elsewhere, a
  no-op (the runner's own exit handler still stops its points on every other exit)."""
  try:
    prctl = ctypes.CDLL(None, use_errno=True).prctl
  except (OSError, AttributeError):
    return None

  def preexec():
    prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the runner died before the call: no signal would come
      os._exit(143)

  return preexec


def running_elsewhere(point: Point) -> str | None:
  """The holder of the point's workdir lock if a live process (or one on another host) holds
  it: the point is running, started by another runner or left by a killed one."""
  holder = workdir_lock.read_holder(workdir_lock.lock_path(point.workdir))
  if holder and workdir_lock.alive(holder) is not False:
    return workdir_lock.describe(holder)
  return None


def _finish_point(point: Point, proc: subprocess.Popen, log) -> None:
  proc._lace_log.close()
  started = point.state.get("started", time.time())
  seconds = round(time.time() - started, 1)
  if proc.returncode == 0:
    point.write_state(status="done", seconds=seconds, attempts=point.state.get("attempts", 1))
    log(f"  [{point.index}] done in {seconds:.0f}s")
    return
  with open(os.path.join(point.workdir, LOG)) as f:
    tail = f.read()[-2000:]
  lines = [l for l in tail.strip().splitlines() if l.strip()]
  point.write_state(status="failed", returncode=proc.returncode, seconds=seconds,
                    attempts=point.state.get("attempts", 1), error=lines[-1] if lines else "",
                    log_tail=tail)
  log(f"  [{point.index}] FAILED (exit {proc.returncode}): {lines[-1] if lines else ''} "
      f"(log: {os.path.join(point.workdir, LOG)})")


def run(points: Sequence[Point], config_flag: str, base_overrides: Sequence[str], *,
        jobs: int = 1, retry_failed: bool = False, log=print) -> None:
  """Runs every point not yet done (failed ones only with retry_failed), `jobs` at a time."""
  if jobs < 1:
    raise ValueError(f"--jobs={jobs}: expected >= 1")
  todo = []
  for p in points:
    status = p.state["status"]
    if status == "done" or (status == "failed" and not retry_failed):
      continue
    todo.append(p)
  skipped = len(points) - len(todo)
  log(f"sweep: {len(points)} points, {skipped} done or failed before (skipped), "
      f"{len(todo)} to run, {jobs} at a time")
  running: list[tuple[Point, subprocess.Popen]] = []
  queue = list(todo)
  t0 = time.time()
  finished, total = 0, len(todo)
  try:
    while queue or running:
      while queue and len(running) < jobs:
        p = queue.pop(0)
        holder = running_elsewhere(p)
        if holder is not None:  # never a second process on one point
          log(f"  [{p.index}] is running already ({holder}): not started again")
          total -= 1
          continue
        running.append((p, _run_point(p, config_flag, base_overrides, log)))
      time.sleep(0.2)
      for p, proc in list(running):
        if proc.poll() is not None:
          _finish_point(p, proc, log)
          running.remove((p, proc))
          finished += 1
          rate = (time.time() - t0) / finished
          log(f"sweep: {finished}/{total} run, ETA {rate * (total - finished):.0f}s")
  except BaseException:  # interrupted: stop the children; their points resume on a rerun
    for _, proc in running:
      proc.terminate()
    for _, proc in running:
      try:
        proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        proc.kill()
    raise


# ------------------------------------------------------------------ the table


def _scalars(tree: Any, prefix: str = "", max_list: int = 8) -> dict[str, float]:
  """Numbers of a result tree, flattened to dotted keys (list items by position, for lists of
  at most `max_list`; a lone item's position is left out)."""
  out: dict[str, float] = {}
  if isinstance(tree, dict):
    for k, v in tree.items():
      out.update(_scalars(v, f"{prefix}{k}.", max_list))
  elif isinstance(tree, list) and len(tree) <= max_list:
    for i, v in enumerate(tree):
      out.update(_scalars(v, prefix if len(tree) == 1 else f"{prefix}{i}.", max_list))
  elif isinstance(tree, bool):
    pass
  elif isinstance(tree, (int, float)) and math.isfinite(float(tree)):
    out[prefix[:-1]] = float(tree)
  return out


def table(points: Sequence[Point]) -> tuple[list[str], list[dict]]:
  """(columns, rows): swept keys, then the metrics of every point's result.json, then status."""
  swept = list(dict.fromkeys(k for p in points for k in p.overrides))
  rows, metrics = [], {}
  for p in points:
    row: dict[str, Any] = {k: _format(p.overrides.get(k, "")) for k in swept}
    result_path = os.path.join(p.workdir, RESULT)
    if os.path.exists(result_path):
      with open(result_path) as f:
        found = _scalars(json.load(f), "result.")
      row.update(found)
      metrics.update(dict.fromkeys(found))
    state = p.state
    row["status"] = state["status"]
    row["point"] = os.path.basename(p.workdir)
    if state["status"] == "failed":
      row["error"] = state.get("error", "")[:120]
    rows.append(row)
  columns = swept + sorted(metrics) + ["status", "point"]
  if any("error" in r for r in rows):
    columns.append("error")
  return columns, rows


def _cell(v: Any) -> str:
  if isinstance(v, float):
    return f"{v:.6g}"
  return str(v).replace("|", "\\|")


def over_seeds(columns: Sequence[str], rows: Sequence[dict], seed_key: str = "seed",
               ) -> tuple[list[str], list[dict]]:
  """The table with the points that differ only in `seed_key` merged: one row per setting of
  the other swept keys, `n` finished seeds, and for every metric its mean and (population)
  standard deviation over them (`<metric>` and `<metric>.std`) and the per-seed values
  (`<metric>.per_seed`, in seed order). Rows with no finished seed keep empty metrics."""
  swept = [c for c in columns if c not in ("status", "point", "error")
           and not c.startswith("result.")]
  metrics = [c for c in columns if c.startswith("result.")]
  keys = [c for c in swept if c != seed_key]
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault(tuple(r.get(k, "") for k in keys), []).append(r)
  out_cols = keys + ["n"]
  for m in metrics:
    out_cols += [m, m + ".std", m + ".per_seed"]
  out_cols.append("seeds")
  out = []
  for key, members in groups.items():
    members = sorted(members, key=lambda r: str(r.get(seed_key, "")))
    done = [r for r in members if r["status"] == "done"]
    row: dict[str, Any] = dict(zip(keys, key))
    row["n"] = len(done)
    row["seeds"] = " ".join(str(r.get(seed_key, "")) for r in done)
    for m in metrics:
      vals = [r.get(m) for r in done]
      nums = [float(v) for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
      row[m + ".per_seed"] = " / ".join("" if v is None or v == "" else _cell(v) for v in vals)
      if nums:
        row[m] = statistics.fmean(nums)
        row[m + ".std"] = statistics.pstdev(nums)
    out.append(row)
  return out_cols, out


def _write_tables(columns, rows, workdir: str, stem: str) -> dict[str, str]:
  md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  md += ["| " + " | ".join(_cell(r.get(c, "")) for c in columns) + " |" for r in rows]
  paths = {"md": os.path.join(workdir, f"{stem}.md"), "csv": os.path.join(workdir, f"{stem}.csv"),
           "json": os.path.join(workdir, f"{stem}.json")}
  with open(paths["md"], "w") as f:
    f.write("\n".join(md) + "\n")
  with open(paths["csv"], "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
  with open(paths["json"], "w") as f:
    json.dump({"columns": columns, "rows": rows}, f, indent=2, default=str)
  paths["markdown"] = "\n".join(md)
  return paths


def write_table(points: Sequence[Point], workdir: str, *, log=print,
                plot_metrics: Sequence[str] | None = None) -> dict[str, str]:
  """DIR/sweep.md, .csv, .json (and sweep.png): one row per point. When `seed` is swept, also
  DIR/sweep_seeds.md, .csv, .json: the points merged over seeds (mean, std, per-seed values;
  `over_seeds`), and the plot shows those means with each seed as a dot. `plot_metrics`: the
  result keys to plot (default: the first four that vary)."""
  columns, rows = table(points)
  os.makedirs(workdir, exist_ok=True)
  paths = _write_tables(columns, rows, workdir, "sweep")
  md = paths.pop("markdown")
  seeded = any("seed" in p.overrides for p in points)
  if seeded:
    s_cols, s_rows = over_seeds(columns, rows)
    seed_paths = _write_tables(s_cols, s_rows, workdir, "sweep_seeds")
    seed_md = seed_paths.pop("markdown")
    paths.update({f"seeds_{k}": v for k, v in seed_paths.items()})
  png = _plot(columns, rows, points, os.path.join(workdir, "sweep.png"), plot_metrics)
  if png:
    paths["png"] = png
  log(md)
  if seeded:
    log(seed_md)
  counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "failed", "running",
                                                              "pending")}
  log(f"sweep: {counts['done']} done, {counts['failed']} failed, "
      f"{counts['running'] + counts['pending']} not finished; table: {paths['md']}")
  return paths


def _plot(columns, rows, points, path, plot_metrics=None) -> str | None:
  """Each metric (up to 4) per point, bars labelled by the point's swept values; with seeds
  swept, one bar per setting at the mean over seeds, each seed a dot."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return None
  swept = [c for c in columns if points and any(c in p.overrides for p in points)]
  numeric = lambda m: [r.get(m) for r in rows if isinstance(r.get(m), (int, float))
                       and not isinstance(r.get(m), bool)]
  if plot_metrics:
    metrics = [m if m.startswith("result.") else f"result.{m}" for m in plot_metrics]
    metrics = [m for m in metrics if numeric(m)]
  else:
    metrics = [c for c in columns if c not in swept and c not in ("status", "point", "error")]
    metrics = [m for m in metrics if len(set(numeric(m))) > 1][:4]  # constants say nothing
  if not metrics:
    return None
  keys = [k for k in swept if k != "seed"]
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault(tuple(r.get(k, "") for k in keys), []).append(r)
  labels = [",".join(f"{k.split('.')[-1]}={v}" for k, v in zip(keys, g) if v != "")
            or "defaults" for g in groups]
  n = len(groups)
  fig, axes = plt.subplots(len(metrics), 1, figsize=(max(6, 0.45 * n + 2), 2.4 * len(metrics)),
                           squeeze=False)
  for ax, m in zip(axes[:, 0], metrics):
    for i, members in enumerate(groups.values()):
      ys = [float(r[m]) for r in members if r["status"] == "done"
            and isinstance(r.get(m), (int, float)) and not isinstance(r.get(m), bool)]
      if ys:
        ax.bar(i, sum(ys) / len(ys), color="C0", alpha=0.6)
        ax.scatter([i] * len(ys), ys, color="k", s=8, zorder=3)
      else:
        ax.bar(i, 0.0, color="C3")
    ax.set_ylabel(m.removeprefix("result."), fontsize=8)
    ax.set_xticks(range(n))
    ax.set_xticklabels(labels if ax is axes[-1, 0] else [], rotation=60, ha="right", fontsize=7)
    ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
