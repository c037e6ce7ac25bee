"""End to end on CPU: `python -m lace_jax.serve` on 127.0.0.1 with a tiny checkpoint, datagen
through the HTTP generator against it; the output validates against the training schema and
loads into the SFT data pipeline."""

import json
import shutil
import socket
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


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  ckpt = tmp_path_factory.mktemp("ckpt")
  # vocabulary = the toy tokenizer's, so every sampled id decodes to text
  vocab = lj.Tokenizer.from_file(toydata.TOY_TOKENIZER).vocab_size
  cfg = lj.ModelConfig.preset("tiny", vocab_size=vocab)
  lj.save_pretrained(*lj.build_model(cfg, lj.LatticeConfig.default(cfg), seed=0), ckpt)
  shutil.copy(toydata.TOY_TOKENIZER, ckpt / "tokenizer.json")
  port = _free_port()
  log = open(tmp_path_factory.mktemp("log") / "server.log", "w+")
  proc = subprocess.Popen([sys.executable, "-m", "lace_jax.serve", "--checkpoint", str(ckpt),
                           "--host", "127.0.0.1", "--port", str(port), "--model-name", "tiny",
                           "--no-precompile"],  # (the warm-up has a test in test_serve.py)
                          env=_env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
  base = f"http://127.0.0.1:{port}"
  deadline = time.time() + 180
  while time.time() < deadline:
    try:
      if httpx.get(f"{base}/health", timeout=2).status_code == 200:
        break
    except httpx.TransportError:
      pass
    assert proc.poll() is None, open(log.name).read()[-3000:]
    time.sleep(0.5)
  else:
    proc.kill()
    pytest.fail("server did not become healthy in 180 s")
  yield base
  proc.terminate()
  proc.wait(timeout=30)


def test_datagen_over_http_produces_training_data(server, tmp_path):
  problems = [grading.Problem(f"q{i}", f"What is {i} plus {i}?", str(2 * i), "test")
              for i in range(3)]
  gen = datagen.HTTPGenerator(server + "/v1", "tiny", concurrency=4, timeout_s=120)
  settings = datagen.Settings(num_threads=4, samples_for_difficulty=2, min_pass_rate=-1.0,
                              max_pass_rate=1.0, max_tokens=16, max_similarity=0.9,
                              max_attempts=6, keep_unsolved=True)
  out = tmp_path / "threads.jsonl"
  with grading.Grader(num_workers=2, timeout_s=10) as grader:
    rep = datagen.generate(problems, gen, grader, settings, output=str(out), progress=False)
  assert rep["tokens_used"] > 0 and gen.requests >= 3 * (2 + 4)
  records = [json.loads(l) for l in open(out)]
  assert len(records) == rep["kept"] >= 1
  for r in records:  # the training schema
    assert set(r) >= {"id", "problem", "threads", "answer", "tags"}
    assert len(r["threads"]) == 4 and len(r["tags"]) == 4
    assert all(isinstance(t, str) for t in r["threads"])
  tok = lj.Tokenizer.from_file(toydata.TOY_TOKENIZER)
  examples, report = data.load_examples(str(out), tok, num_threads=4, max_len=4096)
  assert report.kept == len(records) and not report.bad
