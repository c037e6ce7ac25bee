"""GRPO and eval as users run them (`:runlocal`, subprocesses)."""

import json
import struct
import math
import os
import subprocess
import sys

import pytest

from lace_jax.training.metrics import read_metrics
from tests.test_experiments import ROOT
from tests.test_train_cli import _env

GRPO_FIELDS = ("reward", "accuracy", "format_rate", "diversity", "kl", "clip_fraction",
               "entropy", "response_length", "rollout_time", "update_time", "loss")
# the thread-level lattice diagnostics (`lace_jax.diagnostics`); the tiny preset's lattice band
# is layer 2
DIAGNOSTICS = ("lattice/cross_thread", "lattice/entropy", "lattice/gate",
               "lattice/cross_thread/layer_2", "lattice/entropy/layer_2", "lattice/gate/layer_2")


def _check_diagnostics(m, w):
  missing = [f for f in DIAGNOSTICS if f not in m]
  assert not missing, missing
  assert all(isinstance(m[f], float) and math.isfinite(m[f]) for f in DIAGNOSTICS), m
  assert 0.0 < m["lattice/cross_thread"] < 1.0 and 0.0 < m["lattice/gate"] < 1.0
  assert 0.0 < m["lattice/entropy"] < math.log(w * 1024)  # spread over some keys, not all


def _run(config, workdir, *overrides):
  r = subprocess.run([sys.executable, "-m", "lace_jax.main", f"--config={config}",
                      f"--workdir={workdir}", *overrides], env=_env(), cwd=ROOT,
                     capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  return r


def test_grpo_runlocal_logs_every_field(tmp_path):
  _run("experiments/grpo_4b.py:runlocal", tmp_path)
  rows = read_metrics(str(tmp_path))
  assert [r["step"] for r in rows] == [1, 2, 3]
  for row in rows:
    missing = [f for f in GRPO_FIELDS if f not in row]
    assert not missing, missing
    assert 0 <= row["accuracy"] <= 1 and 0 <= row["format_rate"] <= 1
    assert row["kl"] == 0.0  # first inner update: the policy is the old policy
    _check_diagnostics(row, 4)
  assert os.path.exists(tmp_path / "export" / "model.safetensors")
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]


def _scalars(logdir) -> dict[str, list[tuple[int, float]]]:
  """The scalars of every TensorBoard event file under `logdir` (TFRecords of Event protos)."""
  from tensorboardX.proto import event_pb2
  out = {}
  for path in sorted(logdir.glob("events.out.tfevents*")):
    data = path.read_bytes()
    at = 0
    while at < len(data):
      (length,) = struct.unpack("<Q", data[at:at + 8])
      event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
      at += 12 + length + 4  # length, its crc, the record, its crc
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


def test_eval_runlocal_produces_the_full_table(tmp_path):
  r = _run("experiments/eval_4b.py:runlocal", tmp_path)
  results = json.load(open(tmp_path / "results.json"))
  datasets = ["aime24", "aime25", "amc2023", "math500", "gsm8k_test"]
  assert sorted(results) == ["budget", "lattice_off", "model"]
  budget = results.pop("budget")  # Independent + Voting at the model's tokens: 8 samples
  for ds in datasets:
    b, m = budget[ds], results["model"][ds]
    assert b["samples"] == 8 and len(b["budget_curve"]) == 8
    assert b["budget_tokens"] == m["tokens_per_query"]
    assert b["tokens_per_sample"] == pytest.approx(b["tokens_per_query"] / 8)
    assert b["matched_samples"] == pytest.approx(m["tokens_per_query"] / b["tokens_per_sample"])
    assert [a for _, a in b["budget_curve"]] == [b[f"maj@{k}"] for k in range(1, 9)]
    assert min(b[f"maj@{k}"] for k in range(1, 9)) <= b["matched_acc"] <= max(
        b[f"maj@{k}"] for k in range(1, 9))
  for variant in results.values():
    assert sorted(variant) == sorted(datasets)
    for m in variant.values():
      assert m["problems"] == 4
      assert set(m) >= {"lace_acc", "maj_acc", "mean_acc", "pass@1", "pass@W", "format_rate",
                        "diversity", "tokens_per_query", "seconds_per_query",
                        "critical_path_tokens", "tokens_per_correct"}
      w = 4  # the runlocal lattice's threads: pass@k and maj@k for every k
      assert {f"{n}@{k}" for n in ("pass", "maj") for k in range(1, w + 1)} <= set(m)
      assert m["pass@4"] == m["pass@W"] and m["pass@1"] == pytest.approx(m["mean_acc"])
      assert m["maj@1"] == pytest.approx(m["mean_acc"])
      assert all(m[f"pass@{k}"] <= m[f"pass@{k + 1}"] for k in range(1, w))
      assert m["tokens_per_query"] / w <= m["critical_path_tokens"] <= m["tokens_per_query"]
  for m in results["model"].values():
    _check_diagnostics(m, 4)
  assert not any(k.startswith("lattice/") for m in results["lattice_off"].values() for k in m)
  table = open(tmp_path / "results.md").read()
  table, matched = table.split("\n\nIndependent + Voting at the token budget")
  assert table.count("\n") == 1 + 15 and "| model | math500 | 4 |" in table
  assert matched.count("\n| budget | ") == 5
  assert "| cross_thread | lattice_entropy | gate |" in table
  assert table.splitlines()[-1].endswith("| - | - | - |")  # budget has no lattice
  assert all(line.endswith("| - | - | - |") for line in table.splitlines()
             if line.startswith("| lattice_off |"))
  assert "| lattice_off | gsm8k_test | 4 |" in r.stdout
  scalars = _scalars(tmp_path / "tensorboard")  # tag -> [(step, value)]
  assert "eval/model/math500/lace_acc" in scalars
  assert "eval/lattice_off/aime24/maj_at_k" in scalars
  assert [s for s, _ in scalars["eval/budget/aime24/maj_at_k"]] == list(range(1, 9))
  assert len(scalars["eval/budget/aime24/maj_at_tokens"]) == 8
  curve = scalars["eval/model/math500/pass_at_k"]
  assert [step for step, _ in curve] == [1, 2, 3, 4]
  assert [v for _, v in curve] == pytest.approx(
      [results["model"]["math500"][f"pass@{k}"] for k in range(1, 5)])
  preds = [json.loads(l) for l in open(tmp_path / "predictions_model_aime24.jsonl")]
  assert len(preds) == 4 and all(len(p["threads"]) == 4 for p in preds)


def test_grpo_with_kl_to_the_starting_weights(tmp_path):
  """kl_beta > 0: the reference is the weights the run started from, on the parameter mesh;
  at the first step the policy is those weights (KL 0), after an update it has moved."""
  _run("experiments/grpo_4b.py:runlocal", tmp_path, "--config.grpo.kl_beta=0.1",
       "--config.train.steps=2", "--config.train.save_every=2")
  rows = read_metrics(str(tmp_path))
  assert [r["step"] for r in rows] == [1, 2]
  assert rows[0]["kl"] == 0.0 and rows[1]["kl"] > 0.0
  assert all(r["update_time"] > 0 and r["batch_time"] >= r["rollout_time"] for r in rows)


def test_eval_reads_a_jsonl_file_of_problems_and_names_bad_entries(tmp_path):
  from lace_jax import evaluate
  path = tmp_path / "my_set.jsonl"
  path.write_text('{"problem": "1 + 1 ?", "answer": "2"}\n{"problem": "2 + 2 ?", "answer": "4"}\n')
  label, problems = evaluate.dataset(str(path))
  assert label == "my_set" and [p.answer for p in problems] == ["2", "4"]
  label, problems = evaluate.dataset("aime24")
  assert label == "aime24" and len(problems) == 30
  with pytest.raises(ValueError, match="neither a bundled benchmark"):
    evaluate.dataset(str(tmp_path / "missing.jsonl"))
