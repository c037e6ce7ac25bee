"""Device mesh and the one table of logical-to-mesh sharding rules.

Model code names logical axes only (each parameter carries them, see `Model.logical_axes`);
this module maps them onto a mesh with axes

  data    pure data parallelism (parameters replicated)
  fsdp    data parallelism with parameters and optimizer state sharded (ZeRO-3 style)
  tensor  tensor parallelism over heads, MLP hidden and vocabulary

An experiment overrides single rules with `sharding.rules = (("mlp", None), ...)`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from lace_jax.errors import ConfigError

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
      raise ConfigError(f"sharding rule {item!r}: expected (logical_axis, mesh_axis_or_None)")
    name, target = item
    if name not in table:
      raise ConfigError(f"sharding rule for unknown logical axis {name!r}; known: {sorted(table)}")
    targets = target if isinstance(target, (tuple, list)) else (target,)
    bad = [t for t in targets if t is not None and t not in MESH_AXES]
    if bad:
      raise ConfigError(f"sharding rule {name!r} -> {target!r}: mesh axes must be in {MESH_AXES}")
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
    raise ConfigError(f"constrain: {len(axes)} logical axes {tuple(axes)} for an array of shape "
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
    raise ConfigError(f"mesh axes {unknown} unknown; expected {MESH_AXES}")
  shape = {a: int(spec.get(a, 1)) for a in MESH_AXES}
  free = [a for a, n in shape.items() if n == -1]
  if len(free) > 1:
    raise ConfigError(f"mesh {dict(spec)}: at most one axis may be -1")
  fixed = math.prod(n for n in shape.values() if n != -1)
  if free:
    if num_devices % fixed:
      raise ConfigError(f"mesh {dict(spec)}: {num_devices} devices are not divisible by {fixed}")
    shape[free[0]] = num_devices // fixed
  if math.prod(shape.values()) != num_devices:
    raise ConfigError(f"mesh {shape} has {math.prod(shape.values())} devices but "
                     f"{num_devices} are available")
  return shape


def make_mesh(spec: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh of `spec` (`mesh_shape`) over `devices` (default: all), in jax.make_mesh's
  physical order; over several processes (hosts) reordered process-major (make_mesh's order
  kept within each process), so that every process's devices hold one contiguous block of the
  batch (`process_share`): jax.make_mesh alone interleaves the hosts of a TPU v5p 2x2x2 slice
  along an 8-way axis."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(spec, len(devices))
  mesh = jax.make_mesh(tuple(shape.values()), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                       devices=devices)
  if len({d.process_index for d in devices}) == 1:
    return mesh
  order = sorted(mesh.devices.flat, key=lambda d: d.process_index)  # stable
  return Mesh(np.asarray(order, dtype=object).reshape(mesh.devices.shape), MESH_AXES,
              axis_types=(AxisType.Auto,) * 3)


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
    "attn": ("batch", "thread", "kv_heads", "seq", "head_dim"),  # head-major (model.py)
    "lattice": ("batch", "thread", "lattice_heads", "lattice_head_dim", "seq"),  # model.py
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
  axis (dimension `leading`) by `rules` (`from_process_rows`); on one process this is a
  sharded device_put."""
  share = process_share(mesh, rules)
  return {name: from_process_rows(x, mesh, share=share, leading=leading, rules=rules)
          for name, x in local.items()}


# ----- a process's share of a batch on a mesh that may span processes (hosts)


@dataclasses.dataclass(frozen=True)
class ProcessShare:
  """Where this process's rows sit in a batch laid out by `batch_sharding`: the batch is cut
  into `blocks` equal contiguous blocks, one per group of processes holding the same rows
  (more than one process per block only when a batch shard's devices span processes), and
  this process feeds and reads block `index`, which spans `shards` of the batch's `ways`
  shards (devices' slices). One process: index 0 of 1 block, every shard."""

  index: int
  blocks: int
  shards: int
  ways: int

  def rows(self, global_rows: int) -> slice:
    """The global rows [start, stop) of this process's block of a batch of `global_rows`."""
    if global_rows % self.blocks:
      raise ValueError(f"a batch of {global_rows} rows does not split into {self.blocks} "
                       "equal blocks, one per process (group)")
    n = global_rows // self.blocks
    return slice(self.index * n, (self.index + 1) * n)


def process_share(mesh: Mesh, rules: Sequence[tuple[str, Any]] | None = None,
                  process: int | None = None) -> ProcessShare:
  """This process's (or `process`'s) `ProcessShare` of a batch split over `rules`' batch axes
  of `mesh`. ValueError when its devices' batch shards are not one contiguous run (a device
  order that interleaves processes along the batch axes)."""
  process = jax.process_index() if process is None else process
  axes = batch_axes(rules)
  ways = batch_ways(mesh, rules)
  names = list(mesh.axis_names)
  shard_of = {}  # device id -> the index of its batch shard (row-major over the batch axes)
  for idx in np.ndindex(mesh.devices.shape):
    flat = 0
    for a in axes:
      flat = flat * mesh.shape[a] + idx[names.index(a)]
    shard_of[mesh.devices[idx].id] = flat
  mine = sorted({shard_of[d.id] for d in mesh.devices.flat if d.process_index == process})
  if not mine:
    raise ValueError(f"mesh {dict(mesh.shape)} has no device of process {process}")
  if mine != list(range(mine[0], mine[0] + len(mine))) or ways % len(mine) or mine[0] % len(mine):
    raise ValueError(f"process {process} holds the batch shards {mine} of {ways} "
                     f"over the axes {axes} of mesh {dict(mesh.shape)}: not one aligned "
                     "contiguous block; order the mesh's devices by process")
  k = len(mine)
  return ProcessShare(index=mine[0] // k, blocks=ways // k, shards=k, ways=ways)


def split_rows(x: np.ndarray, parts: int, shards: int) -> np.ndarray:
  """x [b, ...] (rows laid out as `shards` equal batch shards) -> [parts, b / parts, ...]: part
  i holds the i-th slice of every shard's rows, so every part spreads evenly over the shards'
  devices and its global rows do not depend on how many processes hold the batch."""
  b = x.shape[0]
  if b % (parts * shards):
    raise ValueError(f"{b} rows do not split into {parts} parts of {shards} equal shards")
  y = x.reshape(shards, parts, b // (parts * shards), *x.shape[1:]).swapaxes(0, 1)
  return y.reshape(parts, b // parts, *x.shape[1:])


def merge_rows(y: np.ndarray, shards: int) -> np.ndarray:
  """The inverse of `split_rows`: [parts, b / parts, ...] -> [b, ...]."""
  parts, per = y.shape[:2]
  z = y.reshape(parts, shards, per // shards, *y.shape[2:]).swapaxes(0, 1)
  return z.reshape(parts * per, *y.shape[2:])


def from_process_rows(x: np.ndarray, mesh: Mesh, *, share: ProcessShare, leading: int = 0,
                      rules: Sequence[tuple[str, Any]] | None = None) -> jax.Array:
  """This process's rows x [.., b, ...] (batch at dimension `leading`) -> the global array
  [.., b * share.blocks, ...] laid out by `batch_sharding`; every process calls it with its
  own rows (on one process: a sharded device_put)."""
  shape = list(np.shape(x))
  shape[leading] *= share.blocks
  return jax.make_array_from_process_local_data(
      batch_sharding(mesh, np.ndim(x), leading=leading, rules=rules), np.asarray(x),
      tuple(shape))


def process_rows(x: jax.Array, *, leading: int = 0) -> np.ndarray:
  """This process's rows of a global array split along dimension `leading` (its addressable
  shards, each distinct block once, in order) on the host; never reads a shard it cannot
  address. An array replicated along `leading` comes back whole."""
  blocks: dict[int, Any] = {}
  for s in x.addressable_shards:
    start = (s.index[leading].start or 0) if x.ndim else 0
    blocks.setdefault(start, s.data)
  starts = sorted(blocks)
  parts = [np.asarray(blocks[k]) for k in starts]
  for (a, p), b in zip(zip(starts, parts), starts[1:]):
    if a + p.shape[leading] != b:
      raise ValueError(f"process {jax.process_index()} holds rows of dimension {leading} "
                       f"from {starts}: not one contiguous block")
  return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=leading)


def replicate(x: Any, mesh: Mesh) -> Any:
  """Host values, identical on every process -> arrays replicated on `mesh`."""
  rep = replicated(mesh)
  return jax.tree.map(lambda a: jax.make_array_from_process_local_data(rep, np.asarray(a)), x)


def place(tree: Any, shardings: Any) -> Any:
  """Host (or single-device) values, identical on every process -> global arrays laid out by
  `shardings`: each process builds only its own devices' slices (no transfer or comparison
  across hosts, unlike a `device_put` to a multi-host sharding)."""

  def one(x, sh):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sh, lambda idx: host[idx])

  return jax.tree.map(one, tree, shardings)


def first_rows(x: np.ndarray, n: int, share: ProcessShare) -> np.ndarray:
  """The first n rows of a global batch, on every process, from each process's own rows x
  [b, ...] (its block `share.index`): each sends at most n rows; one process: x[:n]."""
  if jax.process_count() == 1:
    return x[:n]
  every = np.asarray(multihost_utils.process_allgather(np.asarray(x[:min(n, x.shape[0])])))
  index = np.asarray(multihost_utils.process_allgather(np.asarray(share.index, np.int64)))
  blocks: dict[int, np.ndarray] = {}
  for i, rows in zip(index.reshape(-1), every):
    blocks.setdefault(int(i), rows)
  return np.concatenate([blocks[i] for i in sorted(blocks)])[:n]


def gather_blocks(value: Any, index: int) -> list:
  """Every process's `value` (a JSON-serialisable list), the block `index` it holds -> their
  concatenation in block order (a block held by several processes counted once), the same on
  every process. One process: `value`."""
  if jax.process_count() == 1:
    return list(value)
  data = np.frombuffer(json.dumps([index, value]).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int64)))
  buf = np.zeros(int(sizes.max()), np.uint8)
  buf[:data.size] = data
  every = np.asarray(multihost_utils.process_allgather(buf))
  blocks: dict[int, list] = {}
  for row, size in zip(every, sizes.reshape(-1)):
    i, got = json.loads(bytes(row[:int(size)]).decode())
    blocks.setdefault(i, got)
  return [x for i in sorted(blocks) for x in blocks[i]]
