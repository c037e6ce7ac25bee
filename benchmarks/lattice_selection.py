"""Does the lattice learn to *select* another thread's token? A diagnostic, not a test.

W = 2 threads of raw tokens: [BOS, k random digits, MARK, d, k random digits, EQ]; each thread
must output the other thread's d. With k = 0 uniform attention over both threads solves it (the
mean of the two digits plus one's own digit gives the other), so it only checks that
information flows; with k > 0 distractors, averaging blurs d among 2k + 1 digits and the
lattice must select the key. Trains the tiny model from scratch with Adam and prints held-out
accuracy (chance: 10%).

  python benchmarks/lattice_selection.py --task copy --distract 6 --layers 1,3 --width 32 \
      --heads 2 --lr 1e-3 --steps 1000 [--qknorm]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lace_jax as lj
from lace_jax.config import LatticeConfig, ModelConfig

ap = argparse.ArgumentParser()
ap.add_argument("--task", default="copy", choices=("copy", "sum", "add", "max"))
ap.add_argument("--W", type=int, default=2)
ap.add_argument("--steps", type=int, default=600)
ap.add_argument("--lr", type=float, default=3e-3)
ap.add_argument("--width", type=int, default=16)
ap.add_argument("--heads", type=int, default=4)
ap.add_argument("--layers", default="2")
ap.add_argument("--mask", default="causal")
ap.add_argument("--source", default="attn_out")
ap.add_argument("--nolat", action="store_true")
ap.add_argument("--pad", type=int, default=0)
ap.add_argument("--qknorm", action="store_true")
ap.add_argument("--distract", type=int, default=0)
a = ap.parse_args()
W = a.W
cfg = ModelConfig.preset("tiny", vocab_size=32, dtype="float32")
lat = None if a.nolat else LatticeConfig(layers=tuple(int(x) for x in a.layers.split(",")), width=a.width, heads=a.heads, mask=a.mask, source=a.source, qk_norm=a.qknorm)
model, params = lj.build_model(cfg, lat, seed=0)
rng = np.random.default_rng(0)
def batch(n):
  d = rng.integers(0, 10, (n, W))
  if a.task == "sum": ans = d.sum(1) % 10; ans = np.broadcast_to(ans[:, None], (n, W))
  elif a.task == "copy": ans = d[:, ::-1]  # other (W=2)
  elif a.task == "add": ans = np.broadcast_to(d.sum(1)[:, None], (n, W)) + 13
  elif a.task == "max": ans = np.broadcast_to(d.max(1)[:, None], (n, W))
  k = a.distract
  L = 1 + k + 3 + k + 1
  tok = np.zeros((n, W, L), np.int32)
  tok[:, :, 0] = 10
  tok[:, :, 1:1+k] = rng.integers(0, 10, (n, W, k))
  tok[:, :, 1+k] = 11; tok[:, :, 2+k] = d
  tok[:, :, 3+k:3+2*k] = rng.integers(0, 10, (n, W, k))
  tok[:, :, -1] = 12
  return jnp.asarray(tok), jnp.asarray(ans)
opt = optax.adam(a.lr)
st = opt.init(params)
def loss_fn(p, tok, ans):
  logits = model.apply(p, tok)[:, :, -1]
  lp = jax.nn.log_softmax(logits)
  l = -jnp.take_along_axis(lp, ans[..., None], -1).mean()
  acc = (logits.argmax(-1) == ans).mean()
  return l, acc
@jax.jit
def step(p, st, tok, ans):
  (l, acc), g = jax.value_and_grad(loss_fn, has_aux=True)(p, tok, ans)
  u, st = opt.update(g, st, p)
  return optax.apply_updates(p, u), st, l, acc
t0 = time.time()
for i in range(a.steps):
  tok, ans = batch(64)
  params, st, l, acc = step(params, st, tok, ans)
  if i % 100 == 0 or i == a.steps - 1:
    tok, ans = batch(1000)
    l2, acc2 = jax.jit(loss_fn)(params, tok, ans)
    print(f"{i} loss {float(l):.3f} eval acc {float(acc2):.3f} ({time.time()-t0:.0f}s)", flush=True)
