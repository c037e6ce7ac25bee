"""The toy-scale demo: tasks only cross-thread communication solves (`tasks`), the
LACE / Isolated Parallel / Independent + Voting comparison trained from scratch on CPU
(`comparison`), its plots (`plots`, needs matplotlib) and the embedded quickstart
(`quickstart`, the default job of `python -m lace_jax.main`)."""
