"""Server latency under continuous batching: short requests sent while a long one runs.

  python benchmarks/serve_latency.py                 # tiny preset, n = 4, 384 + 6 x 4 tokens
  python benchmarks/serve_latency.py --long_tokens=768 --shorts=12

The OpenAI server (`lace_jax.serve`, in-process on 127.0.0.1 under uvicorn) with a tiny model
(random weights, the toy tokenizer; the end-of-turn token never the argmax, so that every
thread runs its whole budget): one request of `long_tokens` new tokens per thread (n = 4, greedy),
then `shorts` requests of `short_tokens` sent `delay` s after it. Printed: each request's time
from sending to its answer, the median short time as a fraction of the long one (the engine
admits the shorts into free slots while the long lattice runs; the static sampler made them
wait for all of it: ratio 1.03 measured before the engine), and the time to the first streamed
chunk of a long streamed request vs its total. A warm-up round of the same requests compiles
every shape first.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import threading
import time

import httpx
import jax

import lace_jax as lj
from lace_jax import bundled
from lace_jax.serve import server as serve


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _round(url: str, args) -> dict:
  body = lambda tokens, text: {"model": "m", "n": args.n, "max_tokens": tokens,
                               "temperature": 0,
                               "messages": [{"role": "user", "content": text}]}
  times: dict = {}

  def post(name: str, b: dict) -> None:
    t0 = time.monotonic()
    r = httpx.post(url, json=b, timeout=600)
    r.raise_for_status()
    times[name] = (time.monotonic() - t0, r.json()["usage"]["completion_tokens"])

  threads = [threading.Thread(target=post, args=("long", body(args.long_tokens, "Long.")))]
  threads[0].start()
  time.sleep(args.delay)
  threads += [threading.Thread(target=post, args=(f"short{i}", body(args.short_tokens,
                                                                    f"Short {i}.")))
              for i in range(args.shorts)]
  for t in threads[1:]:
    t.start()
  for t in threads:
    t.join()
  return times


def _stream(url: str, args) -> tuple[float, float, int]:
  body = {"model": "m", "n": args.n, "max_tokens": args.long_tokens, "temperature": 0,
          "stream": True, "messages": [{"role": "user", "content": "Stream."}]}
  t0, first, chunks = time.monotonic(), None, 0
  with httpx.stream("POST", url, json=body, timeout=600) as r:
    for line in r.iter_lines():
      if line.startswith("data: {") and '"content": "' in line and '"content": ""' not in line:
        chunks += 1
        first = first or time.monotonic() - t0
  return first, time.monotonic() - t0, chunks


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="tiny")
  p.add_argument("--n", type=int, default=4)
  p.add_argument("--long_tokens", type=int, default=384)
  p.add_argument("--short_tokens", type=int, default=4)
  p.add_argument("--shorts", type=int, default=6)
  p.add_argument("--delay", type=float, default=0.2)
  p.add_argument("--slots", type=int, default=8)
  args = p.parse_args()
  import uvicorn

  tok = lj.Tokenizer.from_file(bundled.TOY_TOKENIZER)
  cfg = lj.ModelConfig.preset(args.preset)
  model, params = lj.build_model(cfg, lj.LatticeConfig.default(cfg), seed=0)
  # rows past the tokenizer's vocabulary zeroed (greedy text is not empty), and the end-of-turn
  # token's too: with the tied head it is never the argmax, every thread runs its budget
  params["embed"] = params["embed"].at[tok.vocab_size:].set(0.0).at[tok.im_end_id].set(0.0)
  if not cfg.tie_embeddings:
    params["lm_head"] = params["lm_head"].at[:, tok.im_end_id].set(-1e4)
  app = serve.create_app(model, params, tok, model_name="m", max_threads=args.n,
                         max_prompt_tokens=64, max_new_tokens=args.long_tokens,
                         max_batch=args.slots)
  port = _free_port()
  srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
  thread = threading.Thread(target=srv.run, daemon=True)
  thread.start()
  while not srv.started:
    time.sleep(0.05)
  url = f"http://127.0.0.1:{port}/v1/chat/completions"
  try:
    t0 = time.monotonic()
    _round(url, args)  # warm-up: compiles every shape of the timed round
    warm_s = time.monotonic() - t0
    times = _round(url, args)
    first, total, chunks = _stream(url, args)
  finally:
    srv.should_exit = True
    thread.join(10)
  long_s, long_tokens = times["long"]
  shorts = [v[0] for k, v in times.items() if k.startswith("short")]
  result = {
      "machine": f"{jax.default_backend()} x {jax.device_count()}", "preset": args.preset,
      "n": args.n, "slots": args.slots, "long_tokens_per_thread": long_tokens // args.n,
      "long_s": round(long_s, 3), "short_s_median": round(statistics.median(shorts), 3),
      "short_over_long": round(statistics.median(shorts) / long_s, 3),
      "stream_first_chunk_s": round(first, 3), "stream_total_s": round(total, 3),
      "stream_content_chunks": chunks, "warmup_s": round(warm_s, 1)}
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
