"""Attention kernels of lace_jax, each beside its plain-jnp reference.

  kernels/attention/          per-thread causal GQA (the backbone)
  kernels/lattice_attention/  cross-thread attention over the flattened W*T lattice

Each package exposes one function with an `implementation=` switch; `reference.py` is the
specification every other implementation is tested against.
"""
