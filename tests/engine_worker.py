"""One process of the engine's multi-process test (`tests/test_engine.py`): the tiny lattice
model on a mesh of every process's CPU devices, the requests of this process's block of the
slots generated through `lace_jax.engine`, the tokens written as JSON.

  python -m tests.engine_worker OUT [COORDINATOR NUM_PROCESSES PROCESS_ID]
"""

import json
import sys

import jax
import numpy as np

import lace_jax as lj
from lace_jax import engine, sharding

SLOTS, W, REQUESTS = 4, 3, 10


def requests() -> list[engine.Request]:
  """The global list: greedy and sampled requests, 3 prompts x several rollouts, budgets and
  lengths that differ."""
  rng = np.random.default_rng(0)
  prompts = [rng.integers(1, 200, rng.integers(3, 20)).tolist() for _ in range(3)]
  return [engine.Request(prompts[i % 3], [9, 3, 6, 9, 2][i % 5], seed=i,
                         temperature=[0.0, 1.0][i % 2], top_k=[0, 30][i % 3 == 0])
          for i in range(REQUESTS)]


def main(out: str, coordinator: str | None = None, processes: int = 1, pid: int = 0) -> None:
  if coordinator:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, processes, pid)
  cfg = lj.ModelConfig.preset("tiny")
  model = lj.Model(cfg, lj.LatticeConfig(layers=(1, 3), width=16, heads=2))
  params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape,
                                                               x.dtype), model.init(seed=0))
  mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  rules = sharding.DEFAULT_RULES
  params = sharding.place(params, sharding.logical_to_sharding(model.logical_axes(), mesh, rules))
  eng = engine.Engine(model, params, slots=SLOTS, num_threads=W, max_prompt_len=32,
                      max_new_tokens=9, stop_ids=(7,), decode_chunk=2, mesh=mesh)
  share = sharding.process_share(mesh, rules)
  # each process its contiguous block of the requests (as GRPO's questions)
  mine = share.rows(REQUESTS) if REQUESTS % share.blocks == 0 else None
  assert mine is not None
  results = eng.generate(requests()[mine])
  with open(out, "w") as f:
    json.dump({"first": mine.start, "tokens": [r.tokens.tolist() for r in results],
               "prefill_rows": eng.stats.prefill_rows}, f)


if __name__ == "__main__":
  args = sys.argv[1:]
  main(args[0], *(args[1:2]), *(int(a) for a in args[2:]))
