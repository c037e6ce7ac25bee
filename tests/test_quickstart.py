"""The README's first command (`python -m lace_jax.main --workdir=DIR`, the embedded
quickstart) at a smoke-test size: it runs every part, prints and writes the table, and a
rerun reuses what finished."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_runlocal_prints_the_table_and_resumes(tmp_path):
  config = os.path.join(ROOT, "lace_jax", "toy", "quickstart.py") + ":runlocal"
  cmd = [sys.executable, "-m", "lace_jax.main", f"--config={config}", f"--workdir={tmp_path}"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  for row in ("| selection: answer the other thread's marked digit", "| relay: answer the sum"):
    assert row in out.stdout
  table = open(tmp_path / "quickstart.md").read()
  assert table.count("\n|") == 3  # header rule + two checks
  for part in ("selection_lattice/result.json", "selection_none/result.json",
               "relay/results.json", "result.json"):
    assert (tmp_path / part).is_file(), part
  mtime = os.path.getmtime(tmp_path / "selection_lattice" / "result.json")
  again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert os.path.getmtime(tmp_path / "selection_lattice" / "result.json") == mtime
  assert "== 1/3 selection" in again.stdout and "| relay" in again.stdout
