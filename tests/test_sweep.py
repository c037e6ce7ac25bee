"""Sweeps (`lace_jax.sweep`, `python -m lace_jax.main --sweep=...`): declared in an experiment
file, run point by point in their own processes, resumed after a kill without redoing finished
points, failures recorded without stopping the rest, one table row per point, and the
--sweep_print / --sweep_index round trip. The points are the overhead mode on the tiny model
(seconds each)."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from lace_jax import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXPERIMENT = '''
import importlib.util, os
from lace_jax import sweep

_spec = importlib.util.spec_from_file_location(
    "overhead_exp", os.path.join({root!r}, "experiments", "overhead.py"))
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)


def get_config(arg=None):
  cfg = _mod.get_config("runlocal")
  cfg.overhead.context = 32
  return cfg


def sweep_threads():
  return sweep.values("overhead.num_threads", [1, 2, 3])


def sweep_context():
  return sweep.values("overhead.context", [16, 24])


def sweep_broken():  # the second point names a preset that does not exist
  return sweep.zip_(dict([("overhead.presets", [("tiny",), ("no_such_preset",), ("tiny",)]),
                          ("overhead.num_threads", [1, 2, 3])]))
'''


@pytest.fixture
def experiment(tmp_path):
  path = tmp_path / "sweep_exp.py"
  path.write_text(EXPERIMENT.replace("{root!r}", repr(ROOT)))
  return str(path)


def _main(*args, timeout=600, **kw):
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "lace_jax.main", *args], capture_output=True,
                        text=True, cwd=ROOT, env=env, timeout=timeout, **kw)


def _states(workdir):
  out = {}
  for d in sorted(os.listdir(workdir)):
    p = os.path.join(workdir, d, sweep.STATE)
    if os.path.exists(p):
      out[d] = json.load(open(p))
  return out


def test_helpers_multiply_and_name_points():
  a = sweep.product({"x": [1, 2], "y": ["a", "b"]})
  assert a == [{"x": 1, "y": "a"}, {"x": 1, "y": "b"}, {"x": 2, "y": "a"}, {"x": 2, "y": "b"}]
  assert sweep.zip_({"x": [1, 2], "y": [3, 4]}) == [{"x": 1, "y": 3}, {"x": 2, "y": 4}]
  with pytest.raises(ValueError, match="different lengths"):
    sweep.zip_({"x": [1, 2], "y": [3]})
  m = sweep.multiply(sweep.values("seed", [0, 1]), sweep.values("lattice.qk_norm", [True, False]))
  assert len(m) == 4 and {"seed": 1, "lattice.qk_norm": False} in m
  with pytest.raises(ValueError, match="same keys"):
    sweep.multiply(sweep.values("seed", [0]), sweep.values("seed", [1]))
  names = {sweep.point_name(p) for p in m}
  assert len(names) == 4 and all("seed=" in n and "qk_norm=" in n for n in names)
  # values that print alike still get their own directories
  assert sweep.point_name({"x": 1}) != sweep.point_name({"x": "1"})


def test_over_seeds_merges_points_that_differ_only_in_seed(tmp_path):
  """mean, population std and per-seed values per setting; unfinished seeds left out of the
  statistics; the plot is written from grouped rows."""
  rows = [{"x": "1", "seed": "0", "result.acc": 0.5, "status": "done"},
          {"x": "1", "seed": "1", "result.acc": 0.7, "status": "done"},
          {"x": "1", "seed": "2", "result.acc": 0.1, "status": "failed"},
          {"x": "2", "seed": "0", "result.acc": 0.9, "status": "done"},
          {"x": "2", "seed": "1", "status": "pending"}]
  cols, out = sweep.over_seeds(["x", "seed", "result.acc", "status", "point"], rows)
  assert cols == ["x", "n", "result.acc", "result.acc.std", "result.acc.per_seed", "seeds"]
  by_x = {r["x"]: r for r in out}
  assert by_x["1"]["n"] == 2 and by_x["1"]["seeds"] == "0 1"
  assert by_x["1"]["result.acc"] == pytest.approx(0.6)
  assert by_x["1"]["result.acc.std"] == pytest.approx(0.1)
  assert by_x["1"]["result.acc.per_seed"] == "0.5 / 0.7"
  assert by_x["2"]["n"] == 1 and by_x["2"]["result.acc.std"] == 0.0
  points = [sweep.Point(i, {"x": int(r["x"]), "seed": int(r["seed"])}, str(tmp_path / str(i)))
            for i, r in enumerate(rows)]
  png = sweep._plot(["x", "seed", "result.acc", "status", "point"], rows, points,
                    str(tmp_path / "p.png"), ("acc",))
  assert png and os.path.getsize(png) > 0


def test_sweep_runs_multiplies_and_tables(experiment, tmp_path):
  wd = tmp_path / "sw"
  r = _main(f"--config={experiment}", f"--workdir={wd}", "--sweep=threads,context", "--jobs=2")
  assert r.returncode == 0, r.stderr[-3000:]
  states = _states(wd)
  assert len(states) == 6 and all(s["status"] == "done" for s in states.values())
  table = json.load(open(wd / "sweep.json"))
  assert len(table["rows"]) == 6
  assert table["columns"][:2] == ["overhead.num_threads", "overhead.context"]
  for row in table["rows"]:  # the swept values and the point's own result agree
    assert row["overhead.num_threads"] == str(int(row["result.overhead.num_threads"]))
    assert row["overhead.context"] == str(int(row["result.overhead.context"]))
    assert row["result.overhead.flop_overhead"] > 0
  assert (wd / "sweep.md").read_text().count("\n") == 2 + 6
  assert (wd / "sweep.csv").read_text().count("\n") == 1 + 6
  assert (wd / "sweep.png").stat().st_size > 0


def test_failed_point_is_recorded_and_the_rest_finish(experiment, tmp_path):
  wd = tmp_path / "sw"
  r = _main(f"--config={experiment}", f"--workdir={wd}", "--sweep=broken")
  assert r.returncode == 0, r.stderr[-3000:]
  rows = json.load(open(wd / "sweep.json"))["rows"]
  assert [row["status"] for row in rows] == ["done", "failed", "done"]
  assert "no_such_preset" in rows[1]["error"]
  failed = [s for s in _states(wd).values() if s["status"] == "failed"]
  assert failed[0]["returncode"] != 0 and "no_such_preset" in failed[0]["log_tail"]
  # a rerun skips everything (finished and failed); --retry_failed runs the failed one again
  done_mtimes = {d: os.path.getmtime(wd / d / "result.json") for d in os.listdir(wd)
                 if (wd / d / "result.json").exists()}
  again = _main(f"--config={experiment}", f"--workdir={wd}", "--sweep=broken")
  assert "0 to run" in again.stdout
  retry = _main(f"--config={experiment}", f"--workdir={wd}", "--sweep=broken", "--retry_failed")
  assert "1 to run" in retry.stdout
  assert [s["attempts"] for s in _states(wd).values() if s["status"] == "failed"] == [2]
  assert done_mtimes == {d: os.path.getmtime(wd / d / "result.json") for d in done_mtimes}


def test_killed_sweep_resumes_without_redoing_finished_points(experiment, tmp_path):
  wd = tmp_path / "sw"
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  proc = subprocess.Popen([sys.executable, "-m", "lace_jax.main", f"--config={experiment}",
                           f"--workdir={wd}", "--sweep=threads"], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)
  deadline = time.time() + 300
  while time.time() < deadline:  # kill the whole sweep once its first point has finished
    states = _states(wd) if wd.exists() else {}
    if any(s["status"] == "done" for s in states.values()):
      break
    time.sleep(0.2)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  before = _states(wd)
  finished = [d for d, s in before.items() if s["status"] == "done"]
  assert len(finished) >= 1 and len(finished) < 3, before
  mtimes = {d: os.path.getmtime(wd / d / "result.json") for d in finished}
  r = _main(f"--config={experiment}", f"--workdir={wd}", "--sweep=threads")
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"{len(finished)} done or failed before (skipped), {3 - len(finished)} to run" in r.stdout
  after = _states(wd)
  assert len(after) == 3 and all(s["status"] == "done" for s in after.values())
  assert mtimes == {d: os.path.getmtime(wd / d / "result.json") for d in finished}


def test_sweep_print_and_index_round_trip(experiment, tmp_path):
  wd = tmp_path / "sw"
  r = _main(f"--config={experiment}", f"--workdir={wd}", "--sweep=threads",
            "--config.overhead.context=20", "--sweep_print")
  assert r.returncode == 0, r.stderr[-3000:]
  commands = r.stdout.strip().splitlines()
  assert len(commands) == 3 and not wd.exists()  # printing runs nothing
  for i, line in enumerate(commands):
    args = shlex.split(line)
    assert args[1:3] == ["-m", "lace_jax.main"] and f"--sweep_index={i}" in args
    assert "--config.overhead.context=20" in args  # the command line's own overrides go along
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  run = subprocess.run(shlex.split(commands[2]), capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=600)  # as an array job would run point 2
  assert run.returncode == 0, run.stderr[-3000:]
  states = _states(wd)
  assert [s["index"] for s in states.values() if s["status"] == "done"] == [2]
  point = next(d for d, s in states.items() if s["index"] == 2)
  result = json.load(open(wd / point / "result.json"))
  assert result["overhead"][0]["num_threads"] == 3 and result["overhead"][0]["context"] == 20
  table = _main(f"--config={experiment}", f"--workdir={wd}", "--sweep=threads", "--sweep_table")
  rows = json.load(open(wd / "sweep.json"))["rows"]
  assert table.returncode == 0 and [row["status"] for row in rows] == ["pending", "pending",
                                                                       "done"]
  bad = _main(f"--config={experiment}", f"--workdir={wd}", "--sweep=threads", "--sweep_index=3")
  assert bad.returncode == 2 and "has 3 points" in bad.stderr
  unknown = _main(f"--config={experiment}", f"--workdir={wd}", "--sweep=nope")
  assert unknown.returncode == 2 and "sweep_nope" in unknown.stderr and "threads" in unknown.stderr
