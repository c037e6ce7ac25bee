"""What the side path can read at the start of training: a linear probe of its input.

The selection diagnostic (`lace_jax.toy.selection`) asks thread w for the other thread's marked
digit d. The lattice reads the other thread through its input h = source @ W_down ([R] per
position); whatever it copies must be linearly present in h at the marked position. This
script builds the toy model at initialisation (the state every from-scratch run starts in),
collects h at the marked position of every lattice layer for each `lattice.source`, fits a
least-squares linear readout of d on 4096 problems and reports its accuracy on 2048 others
(chance 10%), over several initialisation seeds.

  python benchmarks/selection_probe.py [--seeds 3] [--distract 6]
"""

import argparse
import dataclasses

import jax.numpy as jnp
import numpy as np

from lace_jax import diagnostics
from lace_jax.model import Model
from lace_jax.toy import configs, selection
from lace_jax.training import setup


def readout_accuracy(x_train, y_train, x_test, y_test) -> float:
  """Least squares from features (plus a bias) to one-hot digits; argmax accuracy."""
  add_bias = lambda x: np.concatenate([x, np.ones((len(x), 1))], axis=1)
  targets = np.eye(10)[y_train]
  coef, *_ = np.linalg.lstsq(add_bias(x_train), targets, rcond=None)
  return float((add_bias(x_test) @ coef).argmax(1).__eq__(y_test).mean())


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--seeds", type=int, default=3)
  ap.add_argument("--distract", type=int, default=6)
  args = ap.parse_args()
  k = args.distract
  rng = np.random.default_rng(0)
  tok, _ = selection.problems(rng, 6144, task="copy", num_threads=2, distract=k)
  marked = tok[:, :, 2 + k]  # [n, W] the digit after MARK
  print(f"linear readout of the marked digit from the lattice input h at its position "
        f"(k = {k}; chance 10%)")
  print("| lattice.source | layer | readout accuracy, per init seed |")
  print("|---|---|---|")
  for source in ("attn_out", "hidden"):
    cfg = configs.selection_config()
    cfg.lattice = configs.toy_lattice()
    cfg.lattice.source = source
    model_cfg, lattice = setup.model_configs(cfg)
    model = Model(dataclasses.replace(model_cfg, vocab_size=selection.VOCAB), lattice)
    accs = {}
    for seed in range(args.seeds):
      params = model.init(seed)
      feats = {}
      for start in range(0, len(tok), 1024):
        chunk = jnp.asarray(tok[start:start + 1024])
        out = diagnostics.lattice_intermediates(model, params, chunk,
                                                jnp.ones(chunk.shape, bool))
        for layer, x in out.items():
          feats.setdefault(layer, []).append(np.asarray(x["input"][:, :, 2 + k]))
      for layer, parts in feats.items():
        h = np.concatenate(parts).reshape(-1, lattice.width)  # [n * W, R]
        y = marked.reshape(-1)
        n = 4096 * 2
        accs.setdefault(layer, []).append(readout_accuracy(h[:n], y[:n], h[n:], y[n:]))
    for layer, a in sorted(accs.items()):
      print(f"| {source} | {layer} | " + " / ".join(f"{100 * x:.1f}%" for x in a) + " |")


if __name__ == "__main__":
  main()
