"""Compiler options that must be set before JAX starts its backends.

XLA:TPU reads its options from the `LIBTPU_INIT_ARGS` environment variable once, when libtpu
starts (the first device query, `jax.distributed.initialize`, or a compile-only topology of the
plan mode). `apply_libtpu_args` adds an experiment's `runtime.libtpu_init_args` to it; a flag the
user already set in the environment keeps the user's value. `lace_jax.main` calls it before
anything touches a backend, on every host of a pod alike.

Why the default is what it is (measured with the plan mode, docs/benchmarks.md): with the batch
split over fsdp, XLA:TPU implements the weight all-gathers and gradient reduce-scatters of the
MLP and attention projections as windowed einsums (collective matmuls) and, where it judges
memory allows, keeps each layer's activation-sized loop buffers alive across the backward
pass; the SFT step of a 4-layer Qwen3-1.7B on v5p:2x2x2 then needs 10.8 GB of temporaries
(2.25 GB more per layer) against 4.4 GB without windowed einsums, and sft_4b at full depth did not
fit a 95 GB v5p chip. The plain all-gather / reduce-scatter forms are overlapped by the
latency-hiding scheduler all the same.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from lace_jax.errors import ConfigError

LIBTPU_ENV = "LIBTPU_INIT_ARGS"

# the memory-lean XLA:TPU configuration every experiment starts from (base_config)
DEFAULT_LIBTPU_INIT_ARGS = (
    "--xla_tpu_enable_windowed_einsum_for_all_gather=false",
    "--xla_tpu_enable_windowed_einsum_for_reduce_scatter=false",
)

_FLAG = re.compile(r"^--([A-Za-z0-9_]+)(=.*)?$")


def _name(flag: str, source: str) -> str:
  m = _FLAG.match(flag)
  if not m:
    raise ConfigError(f"{source}: {flag!r} is not a flag of the form --name or --name=value")
  return m.group(1)


def merge_libtpu_args(current: str, extra: Sequence[str], *,
                      source: str = "runtime.libtpu_init_args") -> str:
  """`current` (the environment's flags) with each of `extra` appended unless a flag of the
  same name is already there (the environment wins)."""
  have = {_name(f, LIBTPU_ENV) for f in current.split()}
  out = current.split()
  for flag in extra:
    if _name(flag, source) not in have:
      out.append(flag)
  return " ".join(out)


def apply_libtpu_args(extra: Sequence[str], environ=os.environ) -> str:
  """Adds `extra` to LIBTPU_INIT_ARGS in `environ` (see module doc); returns the new value.
  Raises if a JAX backend has already started, since libtpu would never read them."""
  extra = tuple(extra)
  if not extra:
    return environ.get(LIBTPU_ENV, "")
  from jax._src import xla_bridge  # the one place JAX records started backends
  if getattr(xla_bridge, "_backends", None):
    raise RuntimeError("runtime.libtpu_init_args must be applied before JAX starts a backend "
                       f"(already started: {sorted(xla_bridge._backends)})")
  value = merge_libtpu_args(environ.get(LIBTPU_ENV, ""), extra)
  environ[LIBTPU_ENV] = value
  return value
