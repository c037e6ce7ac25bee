"""The generation engine: greedy == `sample` for any slot count and arrival order, seeded draws
independent of slots and order, prompt grids prefilled once, streaming, continuous admission,
sharded slots, refusals."""

import random

import jax
import numpy as np
import pytest

import lace_jax as lj
from lace_jax import engine, sampling, sharding
from tests.conftest import randomize

CFG = lj.ModelConfig.preset("tiny")
LAT = lj.LatticeConfig(layers=(1, 3), width=16, heads=2)
W = 3


@pytest.fixture(scope="module")
def model():
  m, params = lj.build_model(CFG, LAT, seed=0)
  return m, randomize(params, seed=1, scale=0.1)


def _prompts(n: int, seed: int = 0) -> list:
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    if i % 3 == 2:  # per-thread prompts of different lengths
      out.append([rng.integers(1, 200, rng.integers(2, 12)).tolist() for _ in range(W)])
    else:
      out.append(rng.integers(1, 200, rng.integers(2, 20)).tolist())
  return out


def _engine(model, slots: int, **kw) -> engine.Engine:
  m, params = model
  kw = dict(dict(num_threads=W, max_prompt_len=32, max_new_tokens=10, stop_ids=(7,),
                 decode_chunk=3), **kw)
  return engine.Engine(m, params, slots=slots, **kw)


def test_greedy_equals_sample_for_any_slot_count_and_arrival_order(model):
  """Requests of different budgets and stop sequences, in two orders, through 1, 2 and 5 slots:
  each gives token for token (and logprob, mean hidden state) what `sample` gives for it with
  its own max_new_tokens and stops."""
  m, params = model
  prompts = _prompts(7)
  budgets = [10, 4, 10, 7, 1, 10, 6]
  stops = [[], [], [[40, 41]], [], [], [[9]], []]
  refs = []
  for p, n, s in zip(prompts, budgets, stops):
    out = sampling.sample(m, params, [p], num_threads=W, max_new_tokens=n, temperature=0.0,
                          stop_ids=(7,), example_stop_sequences=[s])
    refs.append(out)
  # a stop sequence that fires: the greedy thread 0 of request 5 emits its 3rd token as the
  # sequence [9]'s stand-in (replaced by the actual token)
  stops[5] = [[int(refs[5].tokens[0, 0, 2])]]
  refs[5] = sampling.sample(m, params, [prompts[5]], num_threads=W, max_new_tokens=10,
                            temperature=0.0, stop_ids=(7,), example_stop_sequences=[stops[5]])
  assert "stop" in refs[5].finish_reasons[0]
  requests = [engine.Request(p, n, temperature=0.0, stop_sequences=s)
              for p, n, s in zip(prompts, budgets, stops)]
  orders = [list(range(7)), [6, 2, 4, 0, 5, 1, 3]]
  for slots in (1, 2, 5):
    eng = _engine(model, slots)
    for order in orders:
      got = eng.generate([requests[i] for i in order])
      for j, i in enumerate(order):
        ref, r = refs[i], got[j]
        np.testing.assert_array_equal(r.tokens, ref.tokens[0], err_msg=f"{slots} slots, #{i}")
        np.testing.assert_array_equal(r.lengths, ref.lengths[0])
        assert r.finish_reasons == ref.finish_reasons[0]
        np.testing.assert_allclose(r.logprobs, ref.logprobs[0], atol=1e-5)
        np.testing.assert_allclose(r.mean_hidden, ref.mean_hidden[0], atol=1e-4)
    assert eng.stats.finished == 14 and all(o is None for o in eng._owner)


def test_seeded_draws_do_not_depend_on_slots_or_order(model):
  """Sampling (temperature 1, top-k and top-p on some requests): each request's lattice is a
  function of its seed alone; threads of one lattice draw differently; another seed differs."""
  prompts = _prompts(6, seed=1)
  requests = [engine.Request(p, 8, temperature=1.0, top_k=[0, 20][i % 2],
                             top_p=[1.0, 0.9, 1.0][i % 3], seed=100 + i)
              for i, p in enumerate(prompts)]
  base = _engine(model, 6).generate(requests)
  order = list(range(6))
  random.Random(0).shuffle(order)
  for slots in (1, 4):
    got = _engine(model, slots).generate([requests[i] for i in order])
    for j, i in enumerate(order):
      np.testing.assert_array_equal(got[j].tokens, base[i].tokens)
      np.testing.assert_allclose(got[j].logprobs, base[i].logprobs, atol=1e-5)
  # the logprobs are the model's own (GRPO's old policy): a teacher-forced pass over the grid
  m, params = model
  out = engine.as_sample_output(base)
  tf = sampling.teacher_forced_logprobs(m, params, out)
  assert np.abs(tf - out.logprobs).max() <= 1e-4
  same_prompt = [engine.Request(prompts[0], 8, seed=s) for s in (1, 2)]
  a, b = _engine(model, 2).generate(same_prompt)
  assert (a.tokens != b.tokens).any()
  assert any((a.tokens[0] != a.tokens[w]).any() for w in range(1, W))


def test_identical_prompt_grids_are_prefilled_once(model):
  """G = 4 rollouts of each of 2 questions: 2 grids prefilled, 8 lattices, whether admitted
  together or a few at a time; greedy ones equal `sample` on the repeated prompts, sampled ones
  differ by seed."""
  m, params = model
  questions = _prompts(2, seed=2)
  prompts = [q for q in questions for _ in range(4)]
  eng = _engine(model, 8)
  greedy = eng.generate([engine.Request(p, 6, temperature=0.0) for p in prompts])
  assert eng.stats.prefill_rows == 2 and eng.stats.admitted == 8
  ref = sampling.sample(m, params, prompts, num_threads=W, max_new_tokens=6, temperature=0.0,
                        stop_ids=(7,))
  for i, r in enumerate(greedy):
    np.testing.assert_array_equal(r.tokens, ref.tokens[i])
  drawn = eng.generate([engine.Request(p, 6, seed=i) for i, p in enumerate(prompts)])
  assert eng.stats.prefill_rows == 2  # both grids still in the store
  # through 2 slots the rollouts are admitted a few at a time: each grid is still computed once
  few = _engine(model, 2)
  again = few.generate([engine.Request(p, 6, seed=i) for i, p in enumerate(prompts)])
  assert few.stats.prefill_rows == 2 and few.stats.admissions >= 4
  for a, b in zip(again, drawn):
    np.testing.assert_array_equal(a.tokens, b.tokens)
  assert len({r.tokens.tobytes() for r in drawn[:4]}) > 1
  # a request's result does not depend on sharing: alone it draws the same
  alone = _engine(model, 1).generate([engine.Request(prompts[2], 6, seed=2)])[0]
  np.testing.assert_array_equal(alone.tokens, drawn[2].tokens)


def test_short_requests_are_admitted_while_a_long_one_runs(model):
  """One long lattice and 4 short ones through 2 slots: the short ones go through the second
  slot while the first is still generating (finish order), and fewer columns are decoded than
  one static batch per pair would take."""
  finished = []
  long = engine.Request(_prompts(1)[0], 40, temperature=0.0,
                        on_tokens=lambda new: finished.append(("long", len(new[0]))))
  short = [engine.Request(p, 3, temperature=0.0) for p in _prompts(4, seed=3)]
  eng = _engine(model, 2, max_new_tokens=40, stop_ids=())
  got = eng.generate([long] + short)
  assert [len(r.tokens[0]) for r in got] == [40, 3, 3, 3, 3]
  assert eng.stats.columns == 40  # the short ones rode along the long one's columns
  assert eng.stats.admissions >= 3


def test_streaming_sends_every_token_once_in_order(model):
  chunks = []
  prompt = _prompts(1, seed=4)[0]
  eng = _engine(model, 2, decode_chunk=2, stop_ids=())
  r = eng.generate([engine.Request(prompt, 9, seed=5, on_tokens=chunks.append)])[0]
  assert len(chunks) >= 3  # incremental: one chunk per decode call with news
  for w in range(W):
    streamed = [t for c in chunks for t in c[w]]
    assert streamed == r.tokens[w, :r.lengths[w]].tolist()


def test_sharded_slots_equal_one_device(model):
  m, params = model
  mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  placed = jax.device_put(params, sharding.logical_to_sharding(m.logical_axes(), mesh,
                                                               sharding.DEFAULT_RULES))
  requests = [engine.Request(p, 6, seed=i, temperature=[0.0, 1.0][i % 2])
              for i, p in enumerate(_prompts(10, seed=5))]
  ref = _engine(model, 8).generate(requests)
  got = engine.Engine(m, placed, slots=8, num_threads=W, max_prompt_len=32, max_new_tokens=10,
                      stop_ids=(7,), decode_chunk=3, mesh=mesh).generate(requests)
  for a, b in zip(got, ref):
    np.testing.assert_array_equal(a.tokens, b.tokens)
  with pytest.raises(ValueError, match="slots=4 is not divisible by the data-parallel ways: 8"):
    engine.Engine(m, placed, slots=4, num_threads=W, max_prompt_len=32, max_new_tokens=10,
                  mesh=mesh)


def test_bad_requests_are_refused_before_any_work(model):
  eng = _engine(model, 2)
  ok = engine.Request([1, 2, 3], 4)
  with pytest.raises(ValueError, match=r"request 1: max_new_tokens=11; expected 1\.\.10"):
    eng.generate([ok, engine.Request([1, 2], 11)])
  with pytest.raises(ValueError, match="does not fit the engine's max_prompt_len=32"):
    eng.generate([ok, engine.Request(list(range(1, 40)), 4)])
  with pytest.raises(ValueError, match=r"request 0: 5 stop sequences .* at most 4"):
    eng.generate([engine.Request([1, 2], 4, stop_sequences=[[1]] * 5)])
  with pytest.raises(ValueError, match="slots=0"):
    _engine(model, 0)
  assert eng.stats.admitted == 0


def test_two_processes_generate_what_one_does(tmp_path):
  """The engine as one SPMD program: 2 processes x 2 CPU devices (gloo), each with its block of
  the requests and of the slots, give the tokens of 1 process x 4 devices."""
  import json
  import subprocess
  import sys

  from tests.test_experiments import ROOT
  from tests.test_train_cli import _env, _free_port
  cmd = lambda out, *extra: [sys.executable, "-m", "tests.engine_worker", str(out), *extra]
  one = subprocess.run(cmd(tmp_path / "one.json"), env=_env(4), cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
  assert one.returncode == 0, one.stderr[-3000:]
  port = _free_port()
  procs = [subprocess.Popen(cmd(tmp_path / f"two_{i}.json", f"127.0.0.1:{port}", "2", str(i)),
                            env=_env(2), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  ref = json.load(open(tmp_path / "one.json"))
  parts = [json.load(open(tmp_path / f"two_{i}.json")) for i in range(2)]
  assert [p["first"] for p in parts] == [0, 5]
  assert parts[0]["tokens"] + parts[1]["tokens"] == ref["tokens"]
  assert len({json.dumps(t) for t in ref["tokens"]}) > 3  # not all alike
  # 3 prompts: each prefilled once on 1 process (4 store rows); on 2 processes each keeps 2
  # rows, so one of its 3 prompts is evicted and prefilled again, still fewer than its requests
  assert ref["prefill_rows"] == 3 and all(3 <= p["prefill_rows"] < 5 for p in parts)


def test_submit_step_and_cancel(model):
  """The server's loop: requests submitted while others run are admitted into free slots;
  a cancelled request (waiting or in a slot) returns nothing and frees its slot at once."""
  eng = _engine(model, 1, decode_chunk=2, stop_ids=())
  prompts = _prompts(3, seed=6)
  long = eng.submit(engine.Request(prompts[0], 10, temperature=0.0))
  waiting = eng.submit(engine.Request(prompts[1], 10, temperature=0.0))
  assert eng.step() == []  # the long one runs: 2 columns
  eng.cancel(waiting)  # still waiting: dropped
  eng.cancel(long)  # in its slot: freed at the next step
  last = eng.submit(engine.Request(prompts[2], 4, temperature=0.0))
  done = []
  while eng.busy:
    done += eng.step()
  assert [t for t, _ in done] == [last]
  alone = _engine(model, 1).generate([engine.Request(prompts[2], 4, temperature=0.0)])[0]
  np.testing.assert_array_equal(done[0][1].tokens, alone.tokens)
  with pytest.raises(ValueError, match="request submitted: max_new_tokens=11"):
    eng.submit(engine.Request(prompts[0], 11))
