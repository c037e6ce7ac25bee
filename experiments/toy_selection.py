"""The selection diagnostic (lace_jax.toy.selection): does the lattice learn to pick another
thread's marked digit among distractors? And the sweeps of the selection study (issue 15):
what makes selection slow to learn.

  python -m lace_jax.main --config=experiments/toy_selection.py --workdir=runs/selection
  python -m lace_jax.main --config=experiments/toy_selection.py --workdir=runs/selection_study \
      --sweep=factors,seeds --jobs=2
  python -m lace_jax.main --config=experiments/toy_selection.py --workdir=runs/selection_off \
      --config.lattice.enabled=False        # the no-lattice control: chance (10%)
  python -m lace_jax.main --config=experiments/toy_selection.py --workdir=runs/selection_study \
      --sweep=chosen                        # the chosen toy lattice and the control, 5 seeds

The defaults here are the side path as the paper describes it (the per-thread attention output
as its input): the study's starting point. The toy runs use what the study chose
(`lace_jax.toy.configs.toy_lattice`: the same with `lattice.source=hidden`).

`:quick` is a 200-step version for a smoke test.
"""

from lace_jax import sweep
from lace_jax.toy import configs


def get_config(arg=None):
  cfg = configs.selection_config()
  if arg == "quick":
    cfg.selection.update(steps=200, eval_every=100, eval_problems=256)
  return cfg


def sweep_seeds():
  return sweep.values("seed", [0, 1, 2])


def sweep_factors():
  """One factor at a time from the defaults (each a list of alternatives to the default)."""
  base = [{}]  # the defaults themselves
  # ordered by what the first runs suggested matters most (a rerun skips finished points)
  return base + [
      {"lattice.enabled": False},  # the control: no side path
      {"selection.lattice_lr_multiplier": 10.0},
      {"selection.lattice_lr_multiplier": 3.0},
      {"lattice.qk_norm": True},
      {"lattice.rope_thetas": (100.0, 10_000.0)},  # a token-axis base for 16-token threads
      {"lattice.source": "hidden"},
      {"lattice.init_std": 0.02},
      {"lattice.width": 64, "lattice.heads": 2},
      {"lattice.mask": "other_threads"},
      {"lattice.rope_fractions": (1.0, 0.0)},
      {"lattice.gate": "none"},
      {"lattice.layers": (3,)},
  ]


def sweep_factors_more():
  """Further alternatives, declared for a longer study (not run in docs/results.md's: 2 CPU
  cores did not have the time)."""
  return [
      {"lattice.init_std": 0.2},
      {"lattice.width": 32, "lattice.heads": 1},
      {"lattice.mask": "same_position"},
      {"lattice.rope_thetas": (0.0, 100.0)},
      {"lattice.gate": "head"},
      {"lattice.layers": (1, 2, 3)},
  ]


def sweep_chosen():
  """The toy default the study chose (the residual stream as the side path's source,
  `lace_jax.toy.configs.toy_lattice`) and the no-lattice control, on seeds 0-4 (seeds 0-2 of
  both are points of factors x seeds as well, so a run after it adds seeds 3 and 4)."""
  return sweep.multiply([{"lattice.source": "hidden"}, {"lattice.enabled": False}],
                        sweep.values("seed", [0, 1, 2, 3, 4]))


def sweep_distract():
  return sweep.values("selection.distract", [0, 2, 6, 12])


# what the sweep table's plot shows (lace_jax.sweep)
SWEEP_PLOT = ("accuracy", "steps_to_target", "lattice/cross_thread", "lattice/entropy")
