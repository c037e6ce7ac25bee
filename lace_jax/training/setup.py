"""From an experiment config to the run's objects: model and lattice configs, the tokenizer,
the parameters (a checkpoint's or fresh ones) and the mesh.

`lace_jax.experiment` holds the config sections and imports no jax; every mode that runs a
model (the run loop's stages, eval, datagen's local generator, the plan mode, the selection
diagnostic) builds its objects here, so a stage's config is read downward: experiment file ->
these builders -> config / tokenizer / hf_io / model.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections

from lace_jax import sharding
from lace_jax.config import LatticeConfig, ModelConfig
from lace_jax.errors import ConfigError
from lace_jax.hf_io import load_pretrained
from lace_jax.model import Model, Params
from lace_jax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Setup:
  """What the run loop builds before the stage: handed to the stage's factory."""

  cfg: ml_collections.ConfigDict
  model: Model
  tokenizer: Tokenizer
  mesh: jax.sharding.Mesh


def lattice_config(section: ml_collections.ConfigDict,
                   model: ModelConfig) -> LatticeConfig | None:
  """The `LatticeConfig` of a lattice section (`experiment.lattice_section`), or None when it
  is switched off."""
  if not section.enabled or not tuple(section.layers):
    return None
  kwargs = {f.name: section[f.name] for f in dataclasses.fields(LatticeConfig)}
  lat = LatticeConfig(**{k: tuple(v) if isinstance(v, (list, tuple)) else v
                         for k, v in kwargs.items()})
  lat.validate_for(model)
  return lat


def model_configs(cfg: ml_collections.ConfigDict) -> tuple[ModelConfig, LatticeConfig | None]:
  """(ModelConfig, LatticeConfig or None) described by an experiment config."""
  m = cfg.model
  num_layers = m.get("num_layers")
  if m.checkpoint:
    if num_layers is not None:
      raise ConfigError(f"model.num_layers={num_layers} cuts a preset; a checkpoint "
                       f"({m.checkpoint}) is loaded whole: unset one of them")
    model = ModelConfig.from_hf(m.checkpoint, dtype=m.dtype, param_dtype=m.param_dtype,
                                remat=m.remat, attention=m.attention)
  else:
    extra = {} if num_layers is None else {"num_layers": num_layers}
    model = ModelConfig.preset(m.preset, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat,
                               attention=m.attention, **extra)
  return model, lattice_config(cfg.lattice, model)


def resolve_tokenizer(cfg: ml_collections.ConfigDict) -> tuple[Tokenizer, str]:
  """(Tokenizer, path): model.tokenizer, else the checkpoint's tokenizer.json."""
  path = cfg.model.tokenizer
  if not path and cfg.model.checkpoint:
    path = os.path.join(cfg.model.checkpoint, "tokenizer.json")
  if not path:
    raise ConfigError("no tokenizer: set model.tokenizer to a tokenizer.json, or "
                     "model.checkpoint to a directory that holds one")
  return Tokenizer.from_file(path), path


def load_checkpoint(cfg: ml_collections.ConfigDict, model: ModelConfig,
                    lattice: LatticeConfig | None) -> Params | None:
  """The parameters in cfg.model.checkpoint with this run's lattice and dtypes, or None when
  no checkpoint is configured (callers then initialise from cfg.seed)."""
  if not cfg.model.checkpoint:
    return None
  return load_pretrained(cfg.model.checkpoint, lattice=lattice, dtype=model.param_dtype,
                         compute_dtype=model.dtype)[1]


def load_or_init(cfg: ml_collections.ConfigDict, model_cfg: ModelConfig,
                 lattice: LatticeConfig | None) -> tuple[Model, Params]:
  """(Model, params): cfg.model.checkpoint's weights if set, else fresh ones from cfg.seed."""
  model = Model(model_cfg, lattice)
  params = load_checkpoint(cfg, model_cfg, lattice)
  return model, (model.init(cfg.seed) if params is None else params)


def make_setup(cfg: ml_collections.ConfigDict) -> Setup:
  """The run loop's `Setup`: the model (no parameters yet), the tokenizer (checked against the
  model's vocabulary) and the mesh of cfg.sharding.mesh."""
  model_cfg, lattice = model_configs(cfg)
  tokenizer, tok_path = resolve_tokenizer(cfg)
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ConfigError(f"tokenizer {tok_path} has {tokenizer.vocab_size} tokens but the model's "
                     f"vocab_size is {model_cfg.vocab_size}")
  return Setup(cfg, Model(model_cfg, lattice), tokenizer,
               sharding.make_mesh(dict(cfg.sharding.mesh)))
