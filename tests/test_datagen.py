"""The synthetic-data pipeline: rejection of near-duplicates, compression, tags, HTTP retries
and budget, kill + resume, and the output loading into the SFT pipeline."""

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

import lace_jax as lj
from lace_jax import data, grading
from lace_jax.datagen import pipeline as datagen
from lace_jax import bundled as toydata
from tests.test_experiments import ROOT
from tests.test_train_cli import _env

PROBLEMS = [grading.Problem(f"p{i}", f"What is {i} + {i}?", str(2 * i), "test")
            for i in range(3)]


class Scripted(datagen.Generator):
  """A generator answering from a function of the prompt (and a call counter)."""

  def __init__(self, fn):
    self.fn, self.calls, self.tokens_used = fn, 0, 0

  def complete(self, prompts, *, max_tokens, temperature, seed):
    out = []
    for p in prompts:
      self.calls += 1
      out.append(self.fn(p, self.calls))
    return out


@pytest.fixture(scope="module")
def grader():
  with grading.Grader(num_workers=2, timeout_s=10) as g:
    yield g


def _answer_of(prompt):
  return 2 * int(prompt.split("What is ")[1].split(" ")[0])


def distinct_solver(prompt, call):
  words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
  style = " ".join(words[(call + i) % 8] for i in range(6)) + f" variant {call} reasoning"
  return f"{style} so the sum is \\boxed{{{_answer_of(prompt)}}} [[best]]"


def test_pipeline_builds_distinct_tagged_threads(tmp_path, grader):
  s = datagen.Settings(num_threads=3, samples_for_difficulty=2, min_pass_rate=-1.0,
                       max_pass_rate=1.0, max_similarity=0.7)
  rep = datagen.generate(PROBLEMS, Scripted(distinct_solver), grader, s,
                         output=str(tmp_path / "out.jsonl"), progress=False)
  records = [json.loads(l) for l in open(tmp_path / "out.jsonl")]
  assert rep["kept"] == 3 and len(records) == 3
  for r in records:
    assert len(r["threads"]) == 3 and r["tags"].count("[[best]]") == 1
    assert r["tags"] == [grading.extract_tag(t) for t in r["threads"]]  # tag appended once
    assert r["pass_rate"] == 1.0
  assert rep["pass_rate_histogram"]["0.9-1.0"] == 3
  assert 0 < rep["mean_pairwise_ngram_dissimilarity"] <= 1


def test_a_generator_that_repeats_itself_is_rejected_with_a_shortfall(tmp_path, grader):
  same = Scripted(lambda p, c: f"the same words every time \\boxed{{{_answer_of(p)}}}")
  s = datagen.Settings(num_threads=4, samples_for_difficulty=0, max_attempts=3)
  rep = datagen.generate(PROBLEMS[:1], same, grader, s, output=str(tmp_path / "o.jsonl"),
                         progress=False)
  assert rep["kept"] == 0 and rep["outcomes"] == {"rejection_budget": 1}
  assert rep["rejected_similar"] == 3 and rep["shortfall_threads"] == 3  # 1 of 4 threads built
  assert os.path.getsize(tmp_path / "o.jsonl") == 0  # never a record with duplicate threads


def test_difficulty_filter(tmp_path, grader):
  wrong = Scripted(lambda p, c: "no idea \\boxed{-1}")
  s = datagen.Settings(num_threads=2, samples_for_difficulty=2)
  rep = datagen.generate(PROBLEMS, wrong, grader, s, output=str(tmp_path / "o.jsonl"),
                         progress=False)
  assert rep["outcomes"] == {"too_hard": 3} and rep["kept"] == 0
  rep = datagen.generate(PROBLEMS, Scripted(distinct_solver), grader,
                         datagen.Settings(num_threads=2, samples_for_difficulty=2),
                         output=str(tmp_path / "o2.jsonl"), progress=False)
  assert rep["outcomes"] == {"too_easy": 3}  # pass rate 1.0 > 0.5


def test_compression_keeps_the_answer_or_discards(tmp_path, grader):
  long_trace = lambda p, c: ("word " * 50) + f"v{c} \\boxed{{{_answer_of(p)}}}"

  def make(compress_answer):
    def fn(p, c):
      if p.startswith("Rewrite"):
        return f"short v{c} \\boxed{{{compress_answer}}}"
      return long_trace(p, c)
    return fn

  s = datagen.Settings(num_threads=2, samples_for_difficulty=0, max_trace_tokens=20,
                       target_tokens=10, max_similarity=0.99)
  rep = datagen.generate(PROBLEMS[1:2], Scripted(make(2)), grader, s,
                         output=str(tmp_path / "a.jsonl"), progress=False)
  rec = json.loads(open(tmp_path / "a.jsonl").readline())
  assert rep["compressions"] == 2 and all(t.startswith("short") for t in rec["threads"])
  rep = datagen.generate(PROBLEMS[1:2], Scripted(make(999)), grader, s,
                         output=str(tmp_path / "b.jsonl"), progress=False)
  assert rep["kept"] == 0 and rep["compressions_discarded"] == rep["compressions"] > 0


def test_judge_tags_and_fallback(tmp_path, grader):
  def fn(p, c):
    if p.startswith("Here are"):
      return 'Sure: ["[[fail]]", "[[best]]"]'
    return distinct_solver(p, c)

  s = datagen.Settings(num_threads=2, samples_for_difficulty=0, tags="judge")
  datagen.generate(PROBLEMS[:1], Scripted(fn), grader, s, output=str(tmp_path / "j.jsonl"),
                   progress=False)
  assert json.loads(open(tmp_path / "j.jsonl").readline())["tags"] == ["[[fail]]", "[[best]]"]
  bad = Scripted(lambda p, c: "not json" if p.startswith("Here are") else distinct_solver(p, c))
  datagen.generate(PROBLEMS[:1], bad, grader, s, output=str(tmp_path / "k.jsonl"),
                   progress=False)
  tags = json.loads(open(tmp_path / "k.jsonl").readline())["tags"]
  assert sorted(tags) == ["[[best]]", "[[success]]"]  # the verifier's


def test_http_generator_retries_and_budget():
  calls = {"n": 0}

  def handler(request):
    calls["n"] += 1
    if calls["n"] <= 2:
      return httpx.Response(503, json={"error": "busy"})
    body = json.loads(request.content)
    assert body["messages"][0]["role"] == "user" and body["n"] == 1
    return httpx.Response(200, json={"choices": [{"message": {"content": "ok \\boxed{1}"}}],
                                     "usage": {"total_tokens": 7}})

  gen = datagen.HTTPGenerator("http://test/v1", "m", transport=httpx.MockTransport(handler),
                              backoff_s=0.001, concurrency=1)
  assert gen.complete(["q"], max_tokens=5, temperature=0, seed=0) == ["ok \\boxed{1}"]
  assert calls["n"] == 3 and gen.tokens_used == 7
  capped = datagen.HTTPGenerator("http://test/v1", "m", transport=httpx.MockTransport(handler),
                                 request_budget=1, concurrency=1)
  capped.complete(["q"], max_tokens=5, temperature=0, seed=0)
  with pytest.raises(datagen.BudgetExhausted):
    capped.complete(["q"], max_tokens=5, temperature=0, seed=0)
  bad = datagen.HTTPGenerator("http://test/v1", "m", transport=httpx.MockTransport(
      lambda r: httpx.Response(400, json={"error": {"message": "n too large"}})))
  with pytest.raises(ValueError, match="rejected the request \\(400\\)"):
    bad.complete(["q"], max_tokens=5, temperature=0, seed=0)


MALFORMED_200S = [
    httpx.Response(200, text="<html><body>502 Bad Gateway</body></html>",
                   headers={"content-type": "text/html"}),
    httpx.Response(200, json={"choices": []}),
    httpx.Response(200, json={"choices": [{"message": {"content": None}}], "usage": None}),
]


def _ok(text):
  return httpx.Response(200, json={"choices": [{"message": {"content": text}}]})


def test_malformed_200s_are_retried_then_fail_the_problem_naming_the_endpoint(tmp_path, grader):
  calls = {"n": 0}

  def flaky(request):  # each kind of malformed 200 once, then a good answer
    calls["n"] += 1
    return MALFORMED_200S[calls["n"] - 1] if calls["n"] <= 3 else _ok("fine \\boxed{1}")

  gen = datagen.HTTPGenerator("http://flaky/v1", "m", transport=httpx.MockTransport(flaky),
                              backoff_s=0.001, concurrency=1)
  assert gen.complete(["q"], max_tokens=5, temperature=0, seed=0) == ["fine \\boxed{1}"]
  assert calls["n"] == 4

  for bad in MALFORMED_200S:
    gen = datagen.HTTPGenerator("http://broken/v1", "m", retries=2, backoff_s=0.001,
                                transport=httpx.MockTransport(lambda r, bad=bad: bad))
    with pytest.raises(datagen.GenerationFailed,
                       match=r"http://broken/v1/chat/completions: failed after 3 attempts: "
                             r"MalformedResponse: 200 response"):
      gen.complete(["q"], max_tokens=5, temperature=0, seed=0)

  def one_problem_broken(request):  # problem p1's prompts always get HTML; the others answer
    prompt = json.loads(request.content)["messages"][0]["content"]
    if "What is 1 + 1?" in prompt:
      return MALFORMED_200S[0]
    return _ok(distinct_solver(prompt, calls["n"]))

  gen = datagen.HTTPGenerator("http://half/v1", "m", retries=1, backoff_s=0.001, concurrency=1,
                              transport=httpx.MockTransport(one_problem_broken))
  s = datagen.Settings(num_threads=1, samples_for_difficulty=0)
  out = tmp_path / "o.jsonl"
  rep = datagen.generate(PROBLEMS, gen, grader, s, output=str(out), progress=False)
  assert rep["kept"] == 2 and rep["generation_failed"] == 1
  assert rep["first_generation_failure"].startswith(
      "problem p1: http://half/v1/chat/completions: failed after 2 attempts: MalformedResponse")
  assert "p1" not in open(str(out) + ".decisions.jsonl").read()  # a rerun tries it again


def test_a_hung_endpoint_fails_the_problem_at_its_deadline(tmp_path, grader, capsys):
  def hung(request):  # answers nothing until the request's own timeout, as a hung server does
    time.sleep(min(request.extensions["timeout"]["read"], 5.0))
    raise httpx.ReadTimeout("timed out", request=request)

  gen = datagen.HTTPGenerator("http://hung/v1", "m", retries=100, timeout_s=300.0,
                              backoff_s=0.001, transport=httpx.MockTransport(hung))
  s = datagen.Settings(num_threads=1, samples_for_difficulty=0, problem_deadline_s=0.3)
  t0 = time.monotonic()
  rep = datagen.generate(PROBLEMS[:2], gen, grader, s, output=str(tmp_path / "o.jsonl"))
  assert time.monotonic() - t0 < 3.0  # 0.3 s per problem, not 101 x 300 s
  assert rep["generation_failed"] == 2 and rep["kept"] == 0
  assert rep["first_generation_failure"].startswith(
      "problem p0: http://hung/v1/chat/completions: the problem's deadline of 0.3s "
      "(datagen.problem_deadline_s) passed after")
  assert rep["first_generation_failure"].endswith("; last error: ReadTimeout: timed out")
  assert "datagen (deadline 0.3s/problem)" in capsys.readouterr().err  # the progress line


def test_killed_run_resumes_without_duplicates_or_losses(tmp_path):
  cmd = [sys.executable, "-m", "lace_jax.main", "--config=experiments/datagen_gsm8k.py:runlocal",
         "--config.datagen.limit=6", f"--workdir={tmp_path}"]
  out = tmp_path / "threads.jsonl"
  proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if out.exists() and sum(1 for _ in open(out)) >= 2:
      break
    time.sleep(0.1)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  before = [json.loads(l)["id"] for l in open(out)]
  assert 2 <= len(before) < 6
  r = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  ids = [json.loads(l)["id"] for l in open(out)]
  assert len(ids) == len(set(ids)) == 6 and ids[:len(before)] == before
  # the output is the training schema: it loads into the SFT data pipeline
  tok = lj.Tokenizer.from_file(toydata.TOY_TOKENIZER)
  examples, report = data.load_examples(str(out), tok, num_threads=4, max_len=4096)
  assert report.kept == 6 and len(examples) == 6
  rep = json.load(open(tmp_path / "report.json"))
  assert rep["kept"] == 6 and "tokens_used" in rep
