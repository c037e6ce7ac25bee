"""Pure array functions of the model: normalisation and rotary embeddings.

Letters: see `lace_jax.config`. Every function here is stateless and differentiable.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """Qwen3 RMSNorm over the last axis, computed in float32, returned in x.dtype."""
  xf = x.astype(jnp.float32)
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (xf.astype(x.dtype) * scale.astype(x.dtype)).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding in the Hugging Face "rotate half" layout.

  x: [..., T, heads, dim]; positions: [..., T] (any int or float coordinate). The pair
  (i, i + dim/2) is rotated by angle positions * theta ** (-2i / dim). Computed in float32.
  """
  dim = x.shape[-1]
  if dim % 2:
    raise ValueError(f"rope needs an even head dim, got {dim}")
  inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))  # [dim/2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., T, dim/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[..., None, :]  # [..., T, 1, dim]
  xf = x.astype(jnp.float32)
  x1, x2 = jnp.split(xf, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (xf * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def multi_axis_rope(x: jax.Array, coords: Sequence[jax.Array], sections: Sequence[int],
                    thetas: Sequence[float]) -> jax.Array:
  """Rotary embedding over several coordinates (the lattice's "3D RoPE", spec section 4).

  x: [..., T, heads, E] with E = sum(sections); coords[i]: [..., T], the coordinate rotating
  section i (e.g. token position, thread index); thetas[i]: that section's base. Scores
  q . k of two rotated vectors depend on the coordinates only through their differences.
  """
  if not (len(coords) == len(sections) == len(thetas)):
    raise ValueError(f"{len(coords)} coords, {len(sections)} sections, {len(thetas)} thetas")
  if sum(sections) != x.shape[-1]:
    raise ValueError(f"sections {tuple(sections)} sum to {sum(sections)}, head dim is "
                     f"{x.shape[-1]}")
  parts = jnp.split(x, list(_cumsum(sections)[:-1]), axis=-1)
  return jnp.concatenate(
      [rope(p, c, th) for p, c, th in zip(parts, coords, thetas)], axis=-1)


def _cumsum(xs: Sequence[int]) -> list[int]:
  out, acc = [], 0
  for v in xs:
    acc += v
    out.append(acc)
  return out


def default_positions(valid: jax.Array) -> jax.Array:
  """Token positions from a validity mask [..., T]: the count of valid tokens before each one,
  so a left-padded sequence gets the positions it would have unpadded."""
  return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)
