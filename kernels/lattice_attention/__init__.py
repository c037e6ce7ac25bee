"""Lattice (cross-thread) attention behind one `implementation=` switch.

  "reference"    plain jnp, materialises [B, C, W*T, W*S] scores (the specification)
  "xla_chunked"  blockwise online softmax with a flash-style backward: memory linear in W*T
  "pallas"       fused Pallas kernels for the platform compiled for: Triton on GPUs
                 (`pallas_gpu.py`), Mosaic on TPUs (`pallas_tpu.py`); in-kernel mask, bf16 in /
                 fp32 accumulation, forward + backward, and a decode kernel each
  None           auto: "pallas" on GPU and TPU, "xla_chunked" elsewhere (CPU)
  "pallas_interpret"      the GPU kernels run by the Pallas interpreter (CPU tests)
  "pallas_tpu_interpret"  the TPU kernels run by the TPU interpreter (CPU tests)

Decoding (one new query per thread against the lattice cache) has the same switch in
`lattice_decode_attention`. Every implementation is tested against `reference.py`.

On a GPU or TPU, the first call of a Pallas kernel at a new shape compiles it on its own
(forward and gradient, or the decode step); if it does not compile (a shape or a device the
tiles do not suit), that shape falls back to "xla_chunked" with one warning naming the shape and
the error, instead of failing the whole program's compilation. The TPU kernels take T and S
(cache columns when decoding) in multiples of 128; other shapes fall back the same way, with
the same warning, on any target.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from lace_jax import kernels
from lace_jax.kernels.lattice_attention import decode as _decode
from lace_jax.kernels.lattice_attention import pallas_tpu
from lace_jax.kernels.lattice_attention.decode import DecodeBlockSizes
from lace_jax.kernels.lattice_attention.mask import MASK_MODES, validate_mode
from lace_jax.kernels.lattice_attention.pallas_gpu import BlockSizes as PallasBlockSizes
from lace_jax.kernels.lattice_attention.pallas_gpu import lattice_attention_pallas
from lace_jax.kernels.lattice_attention.reference import (lattice_attention_reference,
                                                          lattice_mask, validate)
from lace_jax.kernels.lattice_attention.xla_chunked import BlockSizes as ChunkedBlockSizes
from lace_jax.kernels.lattice_attention.xla_chunked import lattice_attention_chunked

IMPLEMENTATIONS = ("reference", "xla_chunked", "pallas", "pallas_interpret",
                   "pallas_tpu_interpret")


def default_implementation(backend: str | None = None) -> str:
  """"pallas" when compiling for GPUs or TPUs (see `kernels.backend`), "xla_chunked"
  elsewhere."""
  backend = backend or kernels.backend()
  return "pallas" if backend in ("gpu", "cuda", "rocm", "tpu") else "xla_chunked"


def _check(impl: str | None) -> str:
  impl = impl or default_implementation()
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"lattice attention implementation={impl!r}; available: {IMPLEMENTATIONS}")
  return impl


def _compiles_here() -> bool:
  """Whether Pallas kernels are compiled for this process's own GPU or TPU (not a compile-only
  target of the plan mode, not the interpreter): then a failing kernel can be probed and
  replaced."""
  here = jax.default_backend()
  here = "gpu" if here in ("cuda", "rocm") else here
  return kernels.backend() in ("gpu", "tpu") and kernels.backend() == here


def _pallas_kernel(kind: str, mask: str, scale: float | None):
  tpu = kernels.backend() == "tpu"
  if kind == "train":
    fn = pallas_tpu.lattice_attention_pallas_tpu if tpu else lattice_attention_pallas
    return lambda q, k, v, key_valid: fn(q, k, v, key_valid=key_valid, mask=mask, scale=scale)
  return functools.partial(pallas_tpu.decode_pallas_tpu if tpu else _decode.decode_pallas,
                           mask=mask, scale=scale)


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


@functools.lru_cache(maxsize=None)
def _unsupported(kind: str, shapes: tuple) -> str | None:
  """Why the TPU kernel of `kind` does not take these shapes (None if it does)."""
  if kind == "train":
    t, s = shapes[0][0][2], shapes[1][0][2]
    if not pallas_tpu.supports(t, s):
      return f"T={t} and S={s} are not multiples of {pallas_tpu.LANES}"
  else:
    e, s = shapes[1][0][3:5]
    if not pallas_tpu.decode_supports(s, e):
      return (f"the cache's S={s} is not a multiple of {pallas_tpu.LANES} or its E={e} not a "
              "multiple of 16")
  return None


def _fallback(kind: str, mask: str, scale: float | None, arrays, what: str,
              tpu: bool = False) -> bool:
  """True (after one warning per shape) if the TPU kernel of `kind` does not take these
  arrays' shapes (`tpu`: checked on any target, on the whole batch), or else if the Pallas
  kernel does not compile here (on one device's examples)."""
  shapes = tuple((tuple(a.shape), jnp.dtype(a.dtype)) for a in arrays)
  if tpu:
    first_time = _unsupported.cache_info().currsize
    error = _unsupported(kind, shapes)
    if error is not None and _unsupported.cache_info().currsize > first_time:
      warnings.warn(f"lattice {what}: the Pallas TPU kernel does not take shapes "
                    f"{[s for s, _ in shapes]} ({error}); using implementation='xla_chunked' "
                    "for this shape", RuntimeWarning, stacklevel=3)
    return error is not None
  if not _compiles_here():
    return False
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
  tpu = impl == "pallas_tpu_interpret" or (impl == "pallas" and kernels.backend() == "tpu")
  if impl in ("pallas_interpret", "pallas_tpu_interpret"):
    impl, interpret = "pallas", True
  validate_mode(mask)
  validate(q, k, v, key_valid)
  kw = dict(key_valid=key_valid, mask=mask, q_cols=q_cols, k_cols=k_cols, scale=scale)
  if impl == "reference":
    return lattice_attention_reference(q, k, v, **kw)
  if impl == "xla_chunked":
    return lattice_attention_chunked(q, k, v, **kw)
  if q_cols is not None or k_cols is not None:
    if tpu:
      return lattice_attention_chunked(q, k, v, **kw)
    return lattice_attention_pallas(q, k, v, interpret=interpret, **kw)
  if tpu and _fallback("train", mask, scale, (q, k, v, key_valid), "attention", tpu=True):
    return lattice_attention_chunked(q, k, v, **kw)  # a shape the TPU kernels do not take
  kernel = pallas_tpu.lattice_attention_pallas_tpu if tpu else lattice_attention_pallas

  def run(q, k, v, key_valid):  # on one device's examples
    if not interpret and _fallback("train", mask, scale, (q, k, v, key_valid), "attention"):
      return lattice_attention_chunked(q, k, v, key_valid=key_valid, mask=mask, scale=scale)
    return kernel(q, k, v, key_valid=key_valid, mask=mask, scale=scale, interpret=interpret)

  # one kernel per device's examples
  return kernels.batch_parallel(run, q, k, v, key_valid, batch_axes=batch_axes)


def lattice_decode_attention(q, k_cache, v_cache, cache_valid, length, k_new, v_new, new_valid,
                             *, mask: str = "causal", scale: float | None = None,
                             implementation: str | None = None, interpret: bool = False,
                             batch_axes: Sequence[str] = ()):
  """One decoding step; shapes and mask in `decode.py`. "xla_chunked" selects the direct XLA
  form (a single query row per thread needs no blocking). batch_axes: as `lattice_attention`'s."""
  impl = _check(implementation)
  tpu = impl == "pallas_tpu_interpret" or (impl == "pallas" and kernels.backend() == "tpu")
  if impl in ("pallas_interpret", "pallas_tpu_interpret"):
    impl, interpret = "pallas", True
  validate_mode(mask)
  args = (q, k_cache, v_cache, cache_valid, length, k_new, v_new, new_valid)
  if impl == "reference":
    return _decode.decode_reference(*args, mask=mask, scale=scale)
  if impl == "xla_chunked":
    return _decode.decode_xla(*args, mask=mask, scale=scale)
  if tpu and _fallback("decode", mask, scale, args, "decode attention", tpu=True):
    return _decode.decode_xla(*args, mask=mask, scale=scale)  # a shape the kernel does not take
  kernel = pallas_tpu.decode_pallas_tpu if tpu else _decode.decode_pallas

  def run(*a):  # on one device's examples
    if not interpret and _fallback("decode", mask, scale, a, "decode attention"):
      return _decode.decode_xla(*a, mask=mask, scale=scale)
    return kernel(*a, mask=mask, scale=scale, interpret=interpret)

  # one kernel per device's examples
  return kernels.batch_parallel(run, *args, batch_axes=batch_axes)


__all__ = ["ChunkedBlockSizes", "DecodeBlockSizes", "IMPLEMENTATIONS", "MASK_MODES", "PallasBlockSizes",
           "default_implementation", "lattice_attention", "lattice_attention_chunked",
           "lattice_attention_pallas", "lattice_attention_reference", "lattice_decode_attention",
           "lattice_mask"]
