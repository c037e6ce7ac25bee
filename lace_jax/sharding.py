"""Device mesh and the one table of logical-to-mesh sharding rules.

Model code names logical axes only (each parameter carries them, see `Model.logical_axes`);
this module maps them onto a mesh with axes

  data    pure data parallelism (parameters replicated)
  fsdp    data parallelism with parameters and optimizer state sharded (ZeRO-3 style)
  tensor  tensor parallelism over heads, MLP hidden and vocabulary

An experiment overrides single rules with `sharding.rules = (("mlp", None), ...)`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or None: replicated). Parameters name their axes (`Model.
# logical_axes`); activations are constrained at layer boundaries with the act_* names and
# batch / thread / seq (`constrain`): a parameter's "embed" is split over fsdp, an activation's
# model width ("act_embed") is not.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),  # read through batch_axes(rules)
    ("thread", None),
    ("seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("lattice", None),
    ("lattice_heads", None),
    ("lattice_head_dim", None),
    ("lattice_gate_in", None),
    ("lattice_gate", None),
)


def rules_with_overrides(overrides: Sequence[Sequence[Any]] = ()) -> tuple[tuple[str, Any], ...]:
  """DEFAULT_RULES with some logical axes remapped; an unknown logical name is an error."""
  table = dict(DEFAULT_RULES)
  for item in overrides:
    if len(item) != 2:
      raise ValueError(f"sharding rule {item!r}: expected (logical_axis, mesh_axis_or_None)")
    name, target = item
    if name not in table:
      raise ValueError(f"sharding rule for unknown logical axis {name!r}; known: {sorted(table)}")
    targets = target if isinstance(target, (tuple, list)) else (target,)
    bad = [t for t in targets if t is not None and t not in MESH_AXES]
    if bad:
      raise ValueError(f"sharding rule {name!r} -> {target!r}: mesh axes must be in {MESH_AXES}")
    table[name] = tuple(target) if isinstance(target, list) else target
  return tuple(table.items())


def logical_rules(rules: Sequence[tuple[str, Any]] | None = None):
  """The context (flax's `nn.logical_axis_rules`) in which `constrain` maps logical names
  through `rules` (None or () = DEFAULT_RULES). Jitted model functions enter it inside, from
  their own static rules; the mesh comes from `jax.set_mesh` at the call."""
  return nn.logical_axis_rules(tuple(rules or DEFAULT_RULES))


def with_rules(fn: Callable, rules: Sequence[tuple[str, Any]] | None) -> Callable:
  """fn run inside `logical_rules(rules)`."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with logical_rules(rules):
      return fn(*args, **kwargs)

  return wrapped


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """x with a sharding constraint from its logical axes (one name, or None, per dimension)
  through the rules in effect (`logical_rules`), when a mesh is set (`jax.set_mesh`); x
  unchanged otherwise.

  Without these, GSPMD infers activation shardings from the parameters' and can settle on
  replicating the batch (seen on TPU: every device computing the whole global batch of the
  MLP). A dimension that the named mesh axes do not divide (e.g. one decoding prompt over 8
  devices) is left replicated."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  if len(axes) != x.ndim:
    raise ValueError(f"constrain: {len(axes)} logical axes {tuple(axes)} for an array of shape "
                     f"{x.shape}")
  rules = nn.get_logical_axis_rules() or DEFAULT_RULES
  spec = nn.logical_to_mesh_axes(tuple(axes), rules)
  dims = []
  for size, entry in zip(x.shape, tuple(spec) + (None,) * (x.ndim - len(spec))):
    names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
    names = tuple(n for n in names if n in mesh.axis_names and mesh.shape[n] > 1)
    ways = math.prod(mesh.shape[n] for n in names)
    dims.append(names if names and size % ways == 0 else None)
  return jax.lax.with_sharding_constraint(x, P(*dims))


def mesh_shape(spec: Mapping[str, int], num_devices: int | None = None) -> dict[str, int]:
  """Resolves one -1 entry so the product equals the device count."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  unknown = [a for a in spec if a not in MESH_AXES]
  if unknown:
    raise ValueError(f"mesh axes {unknown} unknown; expected {MESH_AXES}")
  shape = {a: int(spec.get(a, 1)) for a in MESH_AXES}
  free = [a for a, n in shape.items() if n == -1]
  if len(free) > 1:
    raise ValueError(f"mesh {dict(spec)}: at most one axis may be -1")
  fixed = math.prod(n for n in shape.values() if n != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f"mesh {dict(spec)}: {num_devices} devices are not divisible by {fixed}")
    shape[free[0]] = num_devices // fixed
  if math.prod(shape.values()) != num_devices:
    raise ValueError(f"mesh {shape} has {math.prod(shape.values())} devices but "
                     f"{num_devices} are available")
  return shape


def make_mesh(spec: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(spec, len(devices))
  return jax.make_mesh(tuple(shape.values()), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                       devices=devices)


def logical_to_sharding(logical: Any, mesh: Mesh, rules) -> Any:
  """Pytree of logical-axis tuples -> pytree of NamedSharding."""
  return jax.tree.map(lambda axes: NamedSharding(mesh, nn.logical_to_mesh_axes(axes, rules)),
                      logical, is_leaf=lambda x: isinstance(x, tuple))


def check_divisible(shapes: Any, shardings: Any, what: str = "parameter") -> None:
  """Raises a ValueError naming the first array whose dimensions the mesh cannot split."""
  for (path, shape), sh in zip(jax.tree_util.tree_leaves_with_path(shapes),
                               jax.tree.leaves(shardings)):
    for dim, axes in enumerate(sh.spec):
      if axes is None:
        continue
      ways = math.prod(sh.mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))
      if shape.shape[dim] % ways:
        raise ValueError(
            f"{what} {jax.tree_util.keystr(path)} of shape {tuple(shape.shape)}: dimension {dim} "
            f"({shape.shape[dim]}) cannot be split {ways} ways over mesh axes {axes} "
            f"(mesh {dict(sh.mesh.shape)}); change sharding.mesh or override its rule in "
            "sharding.rules")


# logical axes of the decoding caches (`Model.init_cache`), by the cache entry's name
CACHE_AXES = {
    "valid": ("batch", "thread", "seq"),
    "attn": ("batch", "thread", "seq", "kv_heads", "head_dim"),
    "lattice": ("batch", "thread", "seq", "lattice_heads", "lattice_head_dim"),
}


def cache_sharding(cache: Any, mesh: Mesh, rules) -> Any:
  """Shardings of a decoding cache (shapes or arrays) through the rule table: the batch over
  data/fsdp, kv heads over tensor (by the default rules)."""

  def pick(path, leaf):
    keys = [_key(k) for k in path]
    kind = next((k for k in ("attn", "lattice") if k in keys), "valid")
    axes = CACHE_AXES[kind]
    if len(leaf.shape) != len(axes):
      raise ValueError(f"cache entry {jax.tree_util.keystr(path)} of shape {leaf.shape}: "
                       f"expected {len(axes)} axes {axes}")
    return NamedSharding(mesh, nn.logical_to_mesh_axes(axes, rules))

  return jax.tree_util.tree_map_with_path(pick, cache)


def batch_axes(rules: Sequence[tuple[str, Any]] | None = None) -> tuple[str, ...]:
  """The mesh axes the logical `batch` axis is split over by `rules` (None: the rules of the
  enclosing `logical_rules` context, else DEFAULT_RULES). Every placement of a batch (inputs,
  the sampler's prompts, the kernels' shard_map) reads it here, so an override of the `batch`
  rule moves them all."""
  if rules is None:
    rules = nn.get_logical_axis_rules() or DEFAULT_RULES
  target = dict(rules or DEFAULT_RULES).get("batch")
  if target is None:
    return ()
  return (target,) if isinstance(target, str) else tuple(target)


def batch_ways(mesh: Mesh, rules: Sequence[tuple[str, Any]] | None = None) -> int:
  """Into how many shards `mesh` splits a batch under `rules`."""
  return math.prod(mesh.shape[a] for a in batch_axes(rules))


def batch_sharding(mesh: Mesh, ndim: int, *, leading: int = 0,
                   rules: Sequence[tuple[str, Any]] | None = None) -> NamedSharding:
  """Sharding of a [..leading dims.., B, ...] array: B over the batch axes of `rules`, the rest
  replicated."""
  axes = batch_axes(rules) or None
  return NamedSharding(mesh, P(*([None] * leading), axes, *([None] * (ndim - leading - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def like_params(tree_shapes: Any, params_sharding: Any, mesh: Mesh) -> Any:
  """Shardings for a tree (e.g. optimizer state) whose leaves mirror parameters: a leaf whose
  key path ends with a parameter's path and has its shape gets that parameter's sharding; any
  other leaf (step counters, scalars) is replicated."""
  by_path = {}
  for path, sh in jax.tree_util.tree_leaves_with_path(params_sharding):
    by_path[tuple(_key(k) for k in path)] = sh
  rep = replicated(mesh)

  def pick(path, leaf):
    keys = tuple(_key(k) for k in path)
    for start in range(len(keys)):
      sh = by_path.get(keys[start:])
      if sh is not None and len(sh.spec) <= len(leaf.shape):
        return sh
    return rep

  return jax.tree_util.tree_map_with_path(pick, tree_shapes)


def _key(k) -> Any:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return getattr(k, attr)
  return str(k)


def describe(mesh: Mesh) -> str:
  return " x ".join(f"{a}={n}" for a, n in zip(mesh.axis_names, mesh.devices.shape))


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh, *, leading: int = 0,
                 rules: Sequence[tuple[str, Any]] | None = None) -> dict:
  """Assembles each process's slice of the batch into global jax.Arrays sharded on the batch
  axis (dimension `leading`) by `rules`; on one process this is a sharded device_put."""
  out = {}
  for name, x in local.items():
    sharding = batch_sharding(mesh, x.ndim, leading=leading, rules=rules)
    global_shape = list(x.shape)
    global_shape[leading] *= jax.process_count()
    out[name] = jax.make_array_from_process_local_data(sharding, x, tuple(global_shape))
  return out
