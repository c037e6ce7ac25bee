"""The OpenAI-compatible lattice server (`python -m lace_jax.serve`; see `server`).

An application of the library: needs the `serve` extra (`pip install "lace_jax[serve]"`)."""
