"""Attention kernels of lace_jax, each beside its plain-jnp reference.

  kernels/attention/          per-thread causal GQA (the backbone)
  kernels/lattice_attention/  cross-thread attention over the flattened W*T lattice

Each package exposes one function with an `implementation=` switch; `reference.py` is the
specification every other implementation is tested against.

The automatic choice of implementation follows the platform the computation is compiled for:
`jax.default_backend()`, unless a `target_platform(...)` context names another (the plan mode
compiles for compile-only TPU and GPU devices from a CPU host, where the default backend would
pick the CPU kernels).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Sequence

import jax
from jax.sharding import PartitionSpec as P

_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("lace_kernel_platform",
                                                                        default=None)
PLATFORMS = ("cpu", "gpu", "tpu")


@contextlib.contextmanager
def target_platform(platform: str | None):
  """Within the context, automatic kernel choices are made for `platform` ("cpu", "gpu"
  (= "cuda"), "tpu"; None = the default backend)."""
  if platform == "cuda":
    platform = "gpu"
  if platform is not None and platform not in PLATFORMS:
    raise ValueError(f"target platform {platform!r}; expected one of {PLATFORMS}")
  token = _PLATFORM.set(platform)
  try:
    yield
  finally:
    _PLATFORM.reset(token)


def backend() -> str:
  """The platform kernels are chosen for: the `target_platform` context's, else JAX's default
  backend ("cuda" / "rocm" reported as "gpu")."""
  platform = _PLATFORM.get() or jax.default_backend()
  return "gpu" if platform in ("cuda", "rocm") else platform


def batch_parallel(fn, *arrays, batch_axes: Sequence[str]):
  """fn(*arrays) run on each device's share of the batch (axis 0 of every array and output)
  under `jax.shard_map`, when a mesh is set (`jax.set_mesh`) whose `batch_axes` split it;
  otherwise fn(*arrays) as is. The caller names the axes (the model passes those of its
  sharding rules' `batch` entry, `lace_jax.sharding.batch_axes`).

  Pallas kernels have no partitioning rule: under GSPMD, Mosaic (TPU) refuses to compile a
  sharded call, and a Triton (GPU) call would gather its operands and run replicated on every
  device. Every example's attention is independent, so each device runs the kernel on its own
  examples. A batch the mesh cannot split (e.g. one decoding prompt) runs unsplit."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(*arrays)
  axes = tuple(a for a in batch_axes if a in mesh.axis_names and mesh.shape[a] > 1)
  ways = 1
  for a in axes:
    ways *= mesh.shape[a]
  if not axes or arrays[0].shape[0] % ways:
    return fn(*arrays)
  spec = lambda x: P(axes, *([None] * (x.ndim - 1)))
  out_shape = jax.eval_shape(fn, *arrays)
  return jax.shard_map(fn, in_specs=tuple(spec(x) for x in arrays),
                       out_specs=jax.tree.map(spec, out_shape), check_vma=False)(*arrays)
