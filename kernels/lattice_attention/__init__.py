"""Lattice (cross-thread) attention behind one `implementation=` switch.

  "reference"    plain jnp, materialises [B, C, W*T, W*S] scores (the specification)
  "xla_chunked"  blockwise online softmax with a flash-style backward: memory linear in W*T
  "pallas"       fused Pallas kernels (Triton backend, GPUs): in-kernel mask, bf16 in / fp32
                 accumulation, forward + backward
  None           auto: "pallas" on GPU, "xla_chunked" elsewhere (CPU, TPU)
  "pallas_interpret"  the Pallas kernels run by the Pallas interpreter (CPU tests)

Decoding (one new query per thread against the lattice cache) has the same switch in
`lattice_decode_attention`. Every implementation is tested against `reference.py`.

On a GPU, the first call of a Pallas kernel at a new shape compiles it on its own (forward and
gradient, or the decode step); if Triton cannot compile it (a shape or a device the tiles do not
suit), that shape falls back to "xla_chunked" with one warning naming the shape and the error,
instead of failing the whole program's compilation.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from lace_jax import kernels
from lace_jax.kernels.lattice_attention import decode as _decode
from lace_jax.kernels.lattice_attention.decode import DecodeBlockSizes
from lace_jax.kernels.lattice_attention.mask import MASK_MODES, validate_mode
from lace_jax.kernels.lattice_attention.pallas_gpu import BlockSizes as PallasBlockSizes
from lace_jax.kernels.lattice_attention.pallas_gpu import lattice_attention_pallas
from lace_jax.kernels.lattice_attention.reference import (lattice_attention_reference,
                                                          lattice_mask, validate)
from lace_jax.kernels.lattice_attention.xla_chunked import BlockSizes as ChunkedBlockSizes
from lace_jax.kernels.lattice_attention.xla_chunked import lattice_attention_chunked

IMPLEMENTATIONS = ("reference", "xla_chunked", "pallas", "pallas_interpret")


def default_implementation(backend: str | None = None) -> str:
  """"pallas" when compiling for GPUs (see `kernels.backend`), "xla_chunked" elsewhere."""
  backend = backend or kernels.backend()
  return "pallas" if backend in ("gpu", "cuda", "rocm") else "xla_chunked"


def _check(impl: str | None) -> str:
  impl = impl or default_implementation()
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"lattice attention implementation={impl!r}; available: {IMPLEMENTATIONS}")
  return impl


def _compiles_here() -> bool:
  """Whether Pallas kernels are compiled for this process's own GPU (not a compile-only target
  of the plan mode, not the interpreter): then a failing kernel can be probed and replaced."""
  return kernels.backend() == "gpu" and jax.default_backend() in ("gpu", "cuda", "rocm")


def _pallas_kernel(kind: str, mask: str, scale: float | None):
  if kind == "train":
    return lambda q, k, v, key_valid: lattice_attention_pallas(q, k, v, key_valid=key_valid,
                                                               mask=mask, scale=scale)
  return functools.partial(_decode.decode_pallas, mask=mask, scale=scale)


@functools.lru_cache(maxsize=None)
def _pallas_failure(kind: str, mask: str, scale: float | None, shapes: tuple) -> str | None:
  """Compiles the Pallas kernel of `kind` ("train": forward and gradient; "decode") alone at
  `shapes` ((shape, dtype) pairs); None if it compiles, else the error in one line. Once per
  shape."""
  fn = _pallas_kernel(kind, mask, scale)
  args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
  try:
    jax.jit(fn).lower(*args).compile()
    if kind == "train":
      loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32))
      jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
  except Exception as e:  # noqa: BLE001 -- any compiler error means: use the XLA form
    lines = str(e).strip().splitlines() or [""]
    return f"{type(e).__name__}: {lines[0][:400]}"
  return None


def _fallback(kind: str, mask: str, scale: float | None, arrays, what: str) -> bool:
  """True (after one warning per shape) if the Pallas kernel of `kind` does not compile here
  for these arrays' shapes."""
  if not _compiles_here():
    return False
  shapes = tuple((tuple(a.shape), jnp.dtype(a.dtype)) for a in arrays)
  first_time = _pallas_failure.cache_info().currsize
  error = _pallas_failure(kind, mask, scale, shapes)
  if error is not None and _pallas_failure.cache_info().currsize > first_time:
    warnings.warn(f"lattice {what}: the Pallas kernel does not compile for shapes "
                  f"{[s for s, _ in shapes]} ({error}); using implementation='xla_chunked' "
                  "for this shape", RuntimeWarning, stacklevel=3)
  return error is not None


def lattice_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, key_valid: jax.Array,
                      mask: str = "causal", q_cols: jax.Array | None = None,
                      k_cols: jax.Array | None = None, scale: float | None = None,
                      implementation: str | None = None, interpret: bool = False,
                      batch_axes: Sequence[str] = ()) -> jax.Array:
  """Cross-thread attention over the flattened W*T grid; see `reference.py` for the spec.

  q: [B, W, T, C, E], k/v: [B, W, S, C, E], key_valid: [B, W, S] -> [B, W, T, C, E].
  `interpret` runs the Pallas kernels in the Pallas interpreter (CPU tests). batch_axes: the
  mesh axes B is split over (under `jax.set_mesh`): the Pallas kernel runs on each device's
  examples (`lace_jax.kernels.batch_parallel`).
  """
  impl = _check(implementation)
  if impl == "pallas_interpret":
    impl, interpret = "pallas", True
  validate_mode(mask)
  validate(q, k, v, key_valid)
  kw = dict(key_valid=key_valid, mask=mask, q_cols=q_cols, k_cols=k_cols, scale=scale)
  if impl == "reference":
    return lattice_attention_reference(q, k, v, **kw)
  if impl == "xla_chunked":
    return lattice_attention_chunked(q, k, v, **kw)
  if q_cols is not None or k_cols is not None:
    return lattice_attention_pallas(q, k, v, interpret=interpret, **kw)
  def run(q, k, v, key_valid):  # on one device's examples
    if not interpret and _fallback("train", mask, scale, (q, k, v, key_valid), "attention"):
      return lattice_attention_chunked(q, k, v, key_valid=key_valid, mask=mask, scale=scale)
    return lattice_attention_pallas(q, k, v, key_valid=key_valid, mask=mask, scale=scale,
                                    interpret=interpret)

  # one kernel per device's examples
  return kernels.batch_parallel(run, q, k, v, key_valid, batch_axes=batch_axes)


def lattice_decode_attention(q, k_cache, v_cache, cache_valid, length, k_new, v_new, new_valid,
                             *, mask: str = "causal", scale: float | None = None,
                             implementation: str | None = None, interpret: bool = False,
                             batch_axes: Sequence[str] = ()):
  """One decoding step; shapes and mask in `decode.py`. "xla_chunked" selects the direct XLA
  form (a single query row per thread needs no blocking). batch_axes: as `lattice_attention`'s."""
  impl = _check(implementation)
  if impl == "pallas_interpret":
    impl, interpret = "pallas", True
  validate_mode(mask)
  args = (q, k_cache, v_cache, cache_valid, length, k_new, v_new, new_valid)
  if impl == "reference":
    return _decode.decode_reference(*args, mask=mask, scale=scale)
  if impl == "xla_chunked":
    return _decode.decode_xla(*args, mask=mask, scale=scale)
  def run(*a):  # on one device's examples
    if not interpret and _fallback("decode", mask, scale, a, "decode attention"):
      return _decode.decode_xla(*a, mask=mask, scale=scale)
    return _decode.decode_pallas(*a, mask=mask, scale=scale, interpret=interpret)

  # one kernel per device's examples
  return kernels.batch_parallel(run, *args, batch_axes=batch_axes)


__all__ = ["ChunkedBlockSizes", "DecodeBlockSizes", "IMPLEMENTATIONS", "MASK_MODES", "PallasBlockSizes",
           "default_implementation", "lattice_attention", "lattice_attention_chunked",
           "lattice_attention_pallas", "lattice_attention_reference", "lattice_decode_attention",
           "lattice_mask"]
