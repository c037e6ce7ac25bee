"""Hugging Face Qwen3 checkpoints: load into (`Model`, params), save them back.

A saved LACE model is a valid Qwen3 checkpoint: `config.json` (readable by transformers 4.5x
and 5.x) plus safetensors whose backbone tensors carry the Hugging Face names. Lattice weights
are stored beside them under `model.layers.{i}.self_attn.lattice.*`, and the lattice config
under the `lace_lattice` key of `config.json`, so a save/load round trip is exact; transformers
loads such a directory as the plain base model (it reports the lattice tensors as unused).

Name map (ours -> Hugging Face; torch Linear weights are [out, in], ours are [in..., out...]):
  embed [V, D]                          model.embed_tokens.weight [V, D]
  layers_i/input_norm/scale [D]         model.layers.i.input_layernorm.weight
  layers_i/attn/{q,k,v}_proj [D, N|K, H] model.layers.i.self_attn.{q,k,v}_proj.weight [N|K*H, D]
  layers_i/attn/o_proj [N, H, D]        model.layers.i.self_attn.o_proj.weight [D, N*H]
  layers_i/attn/{q,k}_norm/scale [H]    model.layers.i.self_attn.{q,k}_norm.weight
  layers_i/post_norm/scale [D]          model.layers.i.post_attention_layernorm.weight
  layers_i/mlp/{gate,up} [D, F]         model.layers.i.mlp.{gate,up}_proj.weight [F, D]
  layers_i/mlp/down [F, D]              model.layers.i.mlp.down_proj.weight [D, F]
  final_norm/scale [D]                  model.norm.weight
  lm_head [D, V] (untied only)          lm_head.weight [V, D]
  layers_i/lattice/down [N, H, R]       model.layers.i.self_attn.lattice.down_proj.weight [R, N*H]
  layers_i/lattice/{q,k,v} [R, C, E]    ....lattice.{q,k,v}_proj.weight [C*E, R]
  layers_i/lattice/p [C, E, R]          ....lattice.o_proj.weight [R, C*E]
  layers_i/lattice/gate [2R, G]         ....lattice.gate_proj.weight [G, 2R] (+ gate_bias -> .bias)
  layers_i/lattice/up [R, D]            ....lattice.up_proj.weight [D, R]
  layers_i/lattice/{q,k}_norm [E]       ....lattice.{q,k}_norm.weight [E] (lattice.qk_norm only)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterator
from typing import Literal

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from lace_jax.config import LatticeConfig, ModelConfig, read_hf_config
from lace_jax.model import Model, Params, abstract_params

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
LATTICE_KEY = "lace_lattice"


class CheckpointError(ValueError):
  """A checkpoint directory does not hold what the model needs; the message says what."""


@dataclasses.dataclass(frozen=True)
class _Entry:
  path: tuple[str, ...]  # key path in our params
  hf_name: str
  n_in: int  # leading input dims of our kernel (0: copied as is)

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    if self.n_in == 0:
      return x
    fan_in = math.prod(x.shape[:self.n_in])
    return np.ascontiguousarray(x.reshape(fan_in, -1).T)

  def from_hf(self, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if self.n_in == 0:
      return x.reshape(shape)
    return x.T.reshape(shape)

  def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    if self.n_in == 0:
      return tuple(shape)
    return (math.prod(shape[self.n_in:]), math.prod(shape[:self.n_in]))


def name_map(cfg: ModelConfig, lattice: LatticeConfig | None) -> list[_Entry]:
  """Every parameter of the model with its Hugging Face tensor name."""
  entries = [_Entry(("embed",), "model.embed_tokens.weight", 0)]
  for i in range(cfg.num_layers):
    p, hf = f"layers_{i}", f"model.layers.{i}"
    entries += [
        _Entry((p, "input_norm", "scale"), f"{hf}.input_layernorm.weight", 0),
        _Entry((p, "attn", "q_proj"), f"{hf}.self_attn.q_proj.weight", 1),
        _Entry((p, "attn", "k_proj"), f"{hf}.self_attn.k_proj.weight", 1),
        _Entry((p, "attn", "v_proj"), f"{hf}.self_attn.v_proj.weight", 1),
        _Entry((p, "attn", "o_proj"), f"{hf}.self_attn.o_proj.weight", 2),
        _Entry((p, "attn", "q_norm", "scale"), f"{hf}.self_attn.q_norm.weight", 0),
        _Entry((p, "attn", "k_norm", "scale"), f"{hf}.self_attn.k_norm.weight", 0),
        _Entry((p, "post_norm", "scale"), f"{hf}.post_attention_layernorm.weight", 0),
        _Entry((p, "mlp", "gate"), f"{hf}.mlp.gate_proj.weight", 1),
        _Entry((p, "mlp", "up"), f"{hf}.mlp.up_proj.weight", 1),
        _Entry((p, "mlp", "down"), f"{hf}.mlp.down_proj.weight", 1),
    ]
    if lattice is not None and i in lattice.layers:
      lp, lhf = (p, "lattice"), f"{hf}.self_attn.lattice"
      entries += [
          _Entry((*lp, "down"), f"{lhf}.down_proj.weight", 2 if lattice.source == "attn_out" else 1),
          _Entry((*lp, "q"), f"{lhf}.q_proj.weight", 1),
          _Entry((*lp, "k"), f"{lhf}.k_proj.weight", 1),
          _Entry((*lp, "v"), f"{lhf}.v_proj.weight", 1),
          _Entry((*lp, "p"), f"{lhf}.o_proj.weight", 2),
          _Entry((*lp, "up"), f"{lhf}.up_proj.weight", 1),
      ]
      if lattice.qk_norm:
        entries += [_Entry((*lp, "q_norm", "scale"), f"{lhf}.q_norm.weight", 0),
                    _Entry((*lp, "k_norm", "scale"), f"{lhf}.k_norm.weight", 0)]
      if lattice.gate != "none":
        entries += [_Entry((*lp, "gate"), f"{lhf}.gate_proj.weight", 1),
                    _Entry((*lp, "gate_bias"), f"{lhf}.gate_proj.bias", 0)]
  entries.append(_Entry(("final_norm", "scale"), "model.norm.weight", 0))
  if not cfg.tie_embeddings:
    entries.append(_Entry(("lm_head",), "lm_head.weight", 1))
  return entries


def _get(tree: Params, path: tuple[str, ...]):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _tensor_files(checkpoint_dir: str) -> dict[str, str]:
  """Tensor name -> safetensors file path, from the index or the single file."""
  index = os.path.join(checkpoint_dir, INDEX_FILE)
  single = os.path.join(checkpoint_dir, SINGLE_FILE)
  if os.path.isfile(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise CheckpointError(f"{index}: expected JSON with a 'weight_map' object ({e})") from e
    files = {}
    for name, fname in weight_map.items():
      path = os.path.join(checkpoint_dir, fname)
      if not os.path.isfile(path):
        raise FileNotFoundError(f"{index} maps tensor {name!r} to {fname!r}, but {path} does not"
                                " exist")
      files[name] = path
    return files
  if os.path.isfile(single):
    with _open_safetensors(single) as f:
      return {name: single for name in f.keys()}
  raise FileNotFoundError(f"{checkpoint_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found")


@contextlib.contextmanager
def _open_safetensors(path: str) -> Iterator:
  """safe_open(path), with a CheckpointError naming the file when the file is not readable
  safetensors (truncated, corrupt): the library's own errors do not name it."""
  try:
    f = safe_open(path, "numpy")
  except Exception as e:  # SafetensorError, OSError, ...
    raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); "
                          "is it truncated or corrupt (an interrupted download or copy)?") from e
  with f:
    yield f


def _read_tensors(files: dict[str, str], names: list[str]) -> Iterator[tuple[str, np.ndarray]]:
  by_file: dict[str, list[str]] = {}
  for n in names:
    by_file.setdefault(files[n], []).append(n)
  for path, ns in by_file.items():
    with _open_safetensors(path) as f:
      present = set(f.keys())
      for n in ns:
        if n not in present:
          raise CheckpointError(f"{path}: tensor {n!r} is listed in {INDEX_FILE} but not stored "
                                "in this file")
        try:
          arr = f.get_tensor(n)
        except Exception as e:
          raise CheckpointError(f"{path}: tensor {n!r} cannot be read ({type(e).__name__}: {e}); "
                                "is the file truncated or corrupt?") from e
        yield n, arr


def _check_finite(checks: list[tuple[str, str, str, jax.Array, jax.Array]],
                  checkpoint_dir: str) -> None:
  """Raises CheckpointError naming every tensor with a NaN or infinite value. checks: (tensor
  name, its file, its stored dtype, the loaded array, a device flag `all finite`): the flags
  are fetched together, once, so the check costs one pass over the weights on the device."""
  flags = jax.device_get([c[4] for c in checks])
  bad = [c for c, ok in zip(checks, flags) if not ok]
  if not bad:
    return
  lines = []
  for name, path, stored, x, _ in bad[:5]:
    n_nan, n_inf = (int(v) for v in jax.device_get((jnp.isnan(x).sum(), jnp.isinf(x).sum())))
    cast = "" if stored == str(x.dtype) else \
        f" (stored as {stored}, loaded as {x.dtype}: values beyond its range become inf)"
    lines.append(f"{path}: tensor {name!r} has {n_nan} NaN and {n_inf} infinite values of "
                 f"{x.size}{cast}")
  more = f"\n  ... and {len(bad) - 5} more tensors" if len(bad) > 5 else ""
  raise CheckpointError(f"{checkpoint_dir}: refusing to load non-finite weights:\n  "
                        + "\n  ".join(lines) + more)


def load_pretrained(checkpoint_dir: str | os.PathLike,
                    lattice: LatticeConfig | None | Literal["checkpoint"] = "checkpoint",
                    dtype: str = "float32", *, compute_dtype: str | None = None,
                    seed: int = 0, **config_overrides) -> tuple[Model, Params]:
  """Loads a Hugging Face Qwen3 directory: returns (model, params).

  lattice: "checkpoint" (default) takes the lattice stored in the checkpoint, if any (a plain
    Qwen3 checkpoint then gives the base model); None gives the base model (stored lattice
    tensors are then dropped, with a warning); a `LatticeConfig` attaches that lattice: its
    tensors are read from the checkpoint when present, else freshly initialised from `seed`
    (zero up-projection, so the model still computes its base model).
  dtype: parameter dtype; compute_dtype: activation dtype (default: same as dtype).
  """
  checkpoint_dir = os.fspath(checkpoint_dir)
  hf = read_hf_config(checkpoint_dir)
  config_path = os.path.join(checkpoint_dir, "config.json")
  cfg = ModelConfig.from_hf_dict(hf, source=config_path, param_dtype=dtype,
                                 dtype=compute_dtype or dtype, **config_overrides)
  stored = hf.get(LATTICE_KEY)
  if lattice == "checkpoint":
    lattice = LatticeConfig.from_dict(stored, source=f"{config_path}:{LATTICE_KEY}") if stored \
        else None
  if lattice is not None:
    lattice.validate_for(cfg)
  files = _tensor_files(checkpoint_dir)
  entries = name_map(cfg, lattice)
  expected = abstract_params(cfg, lattice)
  has_lattice_tensors = any(".self_attn.lattice." in n for n in files)

  wanted, fresh = [], []
  for e in entries:
    if e.hf_name in files:
      wanted.append(e)
    elif "lattice" in e.path and not has_lattice_tensors:
      fresh.append(e)
    else:
      where = sorted(set(files.values()))
      raise CheckpointError(f"{checkpoint_dir}: missing tensor {e.hf_name!r} (for parameter "
                            f"{'/'.join(e.path)}); looked in {[os.path.basename(w) for w in where]}")
  known = {e.hf_name for e in entries}
  extra = sorted(set(files) - known)
  ignored = [n for n in extra if cfg.tie_embeddings and n == "lm_head.weight"]
  dropped = [n for n in extra if ".self_attn.lattice." in n and lattice is None]
  unexpected = [n for n in extra if n not in ignored and n not in dropped]
  if unexpected:
    raise CheckpointError(
        f"{checkpoint_dir}: unexpected tensors {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        f" in {os.path.basename(files[unexpected[0]])} (not part of a {cfg.num_layers}-layer Qwen3"
        f" with lattice={None if lattice is None else lattice.layers})")
  if dropped:
    log.warning("%s: dropping %d lattice tensors because lattice=None (base model requested)",
                checkpoint_dir, len(dropped))

  params: dict = {}
  by_name = {e.hf_name: e for e in wanted}
  pdt = jnp.dtype(cfg.param_dtype)
  checks = []  # NaN / inf in a weight makes every output NaN: refuse it here, by name
  for name, arr in _read_tensors(files, [e.hf_name for e in wanted]):
    e = by_name[name]
    shape = tuple(_get(expected, e.path).shape)
    if tuple(arr.shape) != e.hf_shape(shape):
      raise CheckpointError(f"{files[name]}: tensor {name!r} has shape {tuple(arr.shape)}, "
                            f"expected {e.hf_shape(shape)} (from the shapes in {config_path}"
                            f"{' and its lattice' if lattice else ''})")
    with np.errstate(over="ignore"):  # an overflowing cast is reported by _check_finite
      x = jnp.asarray(e.from_hf(arr, shape), dtype=pdt)
    _set(params, e.path, x)
    checks.append((name, files[name], str(arr.dtype), x, jnp.isfinite(x).all()))
  _check_finite(checks, checkpoint_dir)
  del checks
  if fresh:
    init = Model(cfg, lattice).init(seed)
    for e in fresh:
      _set(params, e.path, _get(init, e.path))
    log.info("initialised %d lattice tensors (none stored in %s)", len(fresh), checkpoint_dir)
  return Model(cfg, lattice), params


def save_pretrained(model: Model, params: Params, out_dir: str | os.PathLike, *,
                    max_shard_bytes: int | None = None, dtype: str | None = None) -> None:
  """Writes `model` with `params` as a Hugging Face Qwen3 directory (config.json +
  safetensors).

  max_shard_bytes: split tensors into `model-0000k-of-0000n.safetensors` files of at most this
  size, with a `model.safetensors.index.json` (default: one `model.safetensors`).
  dtype: storage dtype (default: the parameters' own).
  """
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  cfg, lattice = model.config, model.lattice
  store_dtype = dtype or cfg.param_dtype
  hf_cfg = cfg.replace(param_dtype=store_dtype).to_hf_dict()
  if lattice is not None:
    hf_cfg[LATTICE_KEY] = lattice.to_dict()
  tensors: dict[str, np.ndarray] = {}
  for e in name_map(cfg, lattice):
    arr = np.asarray(jax.device_get(_get(params, e.path)))
    tensors[e.hf_name] = e.to_hf(arr.astype(jnp.dtype(store_dtype)))
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, arr in tensors.items():
    if max_shard_bytes and shards[-1] and size + arr.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = arr
    size += arr.nbytes
  for stale in (SINGLE_FILE, INDEX_FILE):
    if os.path.exists(os.path.join(out_dir, stale)):
      os.remove(os.path.join(out_dir, stale))
  metadata = {"format": "pt"}
  if len(shards) == 1 and not max_shard_bytes:
    save_file(shards[0], os.path.join(out_dir, SINGLE_FILE), metadata=metadata)
  else:
    weight_map = {}
    for k, shard in enumerate(shards):
      fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
      save_file(shard, os.path.join(out_dir, fname), metadata=metadata)
      weight_map.update({n: fname for n in shard})
    index = {"metadata": {"total_size": int(sum(a.nbytes for a in tensors.values()))},
             "weight_map": weight_map}
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
      json.dump(index, f, indent=2)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf_cfg, f, indent=2)

