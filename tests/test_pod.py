"""Pod-scale generation, Lattice GRPO and eval (issue 25): the same command on every process,
one SPMD program. 2 processes x 2 CPU devices (gloo) must log the numbers of 1 process x 4
devices; the sampler reads and writes only this process's rows."""

import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from lace_jax import sampling, sharding
from tests.test_experiments import ROOT
from tests.test_train_cli import one_and_two

GRPO = "--config=experiments/grpo_1p7b.py:runlocal"
EVAL = "--config=experiments/eval_1p7b.py:runlocal"
# host-side timings and rates differ from run to run; everything else must match
VOLATILE = ("time", "tokens_per_sec")


def test_grpo_on_two_processes_logs_the_numbers_of_one(tmp_path):
  outs = one_and_two(tmp_path, GRPO, timeout=900)
  for i, (out, _) in enumerate(outs):  # each process generates and grades half of each step
    assert (f"process {i} of 2: question block {i} of 2, 1 questions x 2 rollouts = 2 of the 4 "
            "rollouts") in out, out
  one = [json.loads(x) for x in open(tmp_path / "one" / "metrics.jsonl")]
  two = [json.loads(x) for x in open(tmp_path / "two" / "metrics.jsonl")]
  assert [m["step"] for m in one] == [m["step"] for m in two] == [1, 2, 3]
  for a, b in zip(one, two):
    keys = {k for k in a if not any(v in k for v in VOLATILE)} - {"sampler_rows"}
    assert keys == {k for k in b if not any(v in k for v in VOLATILE)} - {"sampler_rows"}
    # every loss, reward, accuracy, KL, entropy, length and lattice diagnostic
    assert {"loss", "reward", "accuracy", "kl", "entropy", "response_length",
            "lattice/cross_thread", "lattice/gate"} <= keys
    for k in sorted(keys):
      np.testing.assert_allclose(b[k], a[k], atol=1e-4, err_msg=f"step {a['step']}: {k}")
    assert (a["sampler_rows"], b["sampler_rows"]) == (4, 2)  # a process's share: half
  w1 = load_file(str(tmp_path / "one" / "export" / "model.safetensors"))
  w2 = load_file(str(tmp_path / "two" / "export" / "model.safetensors"))
  assert sorted(w1) == sorted(w2)
  for k in w1:
    np.testing.assert_allclose(w2[k], w1[k], atol=1e-6, err_msg=k)


def test_eval_on_two_processes_gives_the_results_of_one(tmp_path):
  # two of the five benchmarks (the suite's time): both variants, every metric
  one_and_two(tmp_path, EVAL, "--config.eval.datasets=('aime24', 'math500')", timeout=900)
  one = json.load(open(tmp_path / "one" / "results.json"))
  two = json.load(open(tmp_path / "two" / "results.json"))
  assert one.keys() == two.keys() == {"model", "lattice_off", "budget"}  # runlocal: all three
  compared = 0
  for variant, per in one.items():
    assert per.keys() == two[variant].keys()
    for ds, metrics in per.items():
      assert metrics.keys() == two[variant][ds].keys()
      for k, v in metrics.items():
        if v is None:  # tokens_per_correct with no problem solved
          assert two[variant][ds][k] is None, (variant, ds, k)
        elif "seconds" not in k:
          np.testing.assert_allclose(two[variant][ds][k], v, atol=1e-4,
                                     err_msg=f"{variant}/{ds}: {k}")
          compared += 1
      # every problem once, in order, with the same threads (process 1's rows gathered)
      preds = [[json.loads(x) for x in open(tmp_path / d / f"predictions_{variant}_{ds}.jsonl")]
               for d in ("one", "two")]
      assert [r["id"] for r in preds[0]] == [r["id"] for r in preds[1]]
      assert [r["threads"] for r in preds[0]] == [r["threads"] for r in preds[1]]
  assert compared >= 40  # 2 variants x 2 benchmarks x every metric (48 here)


# ----- in-process pieces (8 fake CPU devices, one process)

def test_split_rows_gives_every_part_a_slice_of_every_shard_and_merges_back():
  x = np.arange(24).reshape(12, 2)  # 12 rows in 3 shards of 4
  parts = sharding.split_rows(x, 2, 3)
  assert parts.shape == (2, 6, 2)
  np.testing.assert_array_equal(parts[0][:, 0], [0, 2, 8, 10, 16, 18])  # rows 0-1, 4-5, 8-9
  np.testing.assert_array_equal(sharding.merge_rows(parts, 3), x)
  np.testing.assert_array_equal(sharding.split_rows(x, 3, 1)[1], x[4:8])  # one shard: contiguous
  with pytest.raises(ValueError, match="12 rows do not split into 5 parts"):
    sharding.split_rows(x, 5, 1)


def test_one_process_holds_the_whole_batch():
  mesh = sharding.make_mesh({"data": 2, "fsdp": -1, "tensor": 1})
  share = sharding.process_share(mesh)
  assert (share.index, share.blocks, share.shards, share.ways) == (0, 1, 8, 8)
  assert share.rows(16) == slice(0, 16)
  x = jax.device_put(np.arange(32).reshape(16, 2), sharding.batch_sharding(mesh, 2))
  np.testing.assert_array_equal(sharding.process_rows(x), np.arange(32).reshape(16, 2))
  tensor = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})  # rows repeated over tensor
  y = jax.device_put(np.arange(8), sharding.batch_sharding(tensor, 1))
  np.testing.assert_array_equal(sharding.process_rows(y), np.arange(8))
  np.testing.assert_array_equal(sharding.first_rows(np.arange(8), 3, share), [0, 1, 2])


def _tiny_model():
  from tests.test_sampling import _model
  return _model(True)  # random lattice weights, noise on every parameter


def test_chunked_generation_on_a_mesh_puts_every_row_back_in_place():
  """With batch_chunk on a mesh, chunk i is the i-th slice of every device's rows; greedy
  decoding (no draws) must give each prompt the tokens it gets unchunked and off the mesh."""
  m, params = _tiny_model()
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 1}, jax.devices()[:4])
  placed = sharding.place(params, sharding.logical_to_sharding(m.logical_axes(), mesh,
                                                               sharding.DEFAULT_RULES))
  rng = np.random.default_rng(0)
  prompts = [rng.integers(1, 64, rng.integers(2, 9)).tolist() for _ in range(16)]
  kw = dict(num_threads=2, max_new_tokens=5, temperature=0.0)
  ref = sampling.sample(m, params, prompts, **kw)
  got = sampling.sample(m, placed, prompts, mesh=mesh, batch_chunk=8, **kw)
  np.testing.assert_array_equal(got.tokens, ref.tokens)
  np.testing.assert_array_equal(got.lengths, ref.lengths)
  np.testing.assert_allclose(got.mean_hidden, ref.mean_hidden, atol=1e-5)
  # draws: chunk 0 (key(seed) itself) is rows 0-1, 4-5, 8-9, 12-13 sampled as one batch
  drawn = dict(kw, temperature=1.0, seed=5)
  chunked = sampling.sample(m, placed, prompts, mesh=mesh, batch_chunk=8, **drawn)
  first = sharding.split_rows(np.arange(16), 2, 4)[0]
  np.testing.assert_array_equal(first, [0, 1, 4, 5, 8, 9, 12, 13])
  alone = sampling.sample(m, placed, [prompts[i] for i in first], mesh=mesh, **drawn)
  np.testing.assert_array_equal(chunked.tokens[first], alone.tokens)
  assert not np.array_equal(chunked.tokens[first], chunked.tokens[first + 2])
  with pytest.raises(ValueError, match="not divisible by the data-parallel ways"):
    sampling.sample(m, placed, prompts, mesh=mesh, batch_chunk=2, **kw)


def test_the_plan_names_the_rows_each_host_generates():
  """A v5p:2x2x2 slice is 2 hosts x 4 chips (compile-only devices, nothing compiled here): each
  host generates half of every GRPO step's questions and of every eval batch."""
  from jax.experimental import topologies

  from lace_jax import plan
  from tests.test_experiments import _load
  devices = topologies.get_topology_desc(topology_name="v5p:2x2x2", platform="tpu").devices
  assert sorted({d.process_index for d in devices}) == [0, 1]
  mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices)
  cfg = _load(os.path.join(ROOT, "experiments", "grpo_1p7b.py"))
  hosts = plan.host_split(cfg, mesh)
  assert (hosts["processes"], hosts["devices_per_process"], hosts["blocks"]) == (2, 4, 2)
  assert (hosts["questions_per_process"], hosts["rollouts_per_process"]) == (8, 64)
  assert "each host generates 8 of 16 questions x 8 rollouts = 64 of 128" in hosts["summary"]
  second = sharding.process_share(mesh, process=1)
  assert (second.index, second.blocks, second.shards) == (1, 2, 4)
  evaluation = plan.host_split(_load(os.path.join(ROOT, "experiments", "eval_4b.py")), mesh)
  assert evaluation["sampler_rows_per_process"] == 4  # of eval.batch_size 8
