"""Presets against the published Hugging Face shapes, lattice defaults, and config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

import lace_jax as lj


@pytest.mark.parametrize("preset", ["qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b"])
def test_preset_param_count_equals_transformers(preset):
  """eval_shape (no memory) vs the same config instantiated by transformers on the meta device."""
  cfg = lj.ModelConfig.preset(preset)
  ours = lj.count_params(lj.abstract_params(cfg))
  with torch.device("meta"):
    hf = Qwen3ForCausalLM(Qwen3Config(**{k: v for k, v in cfg.to_hf_dict().items()
                                         if k not in ("architectures", "model_type")}))
  theirs = sum(p.numel() for p in hf.parameters())  # tied weights are counted once
  assert ours == theirs


# Published sizes (Hugging Face model cards: total parameters incl. embeddings).
@pytest.mark.parametrize("preset,billions", [("qwen3-0.6b", 0.6), ("qwen3-1.7b", 1.7),
                                             ("qwen3-4b", 4.0), ("qwen3-8b", 8.2)])
def test_preset_sizes_match_model_cards(preset, billions):
  n = lj.count_params(lj.abstract_params(lj.ModelConfig.preset(preset)))
  assert abs(n / 1e9 - billions) < 0.05, n


def test_default_lattice_band():
  assert lj.LatticeConfig.default(lj.ModelConfig.preset("qwen3-1.7b")).layers == tuple(
      range(14, 27, 2))
  lat4 = lj.LatticeConfig.default(lj.ModelConfig.preset("qwen3-4b"))
  assert lat4.layers == tuple(range(18, 35, 2)) and lat4.width == 320 and lat4.heads == 4
  assert lat4.rope_sections == (60, 20)  # 3/4 token position, 1/4 thread index of E = 80


def test_lattice_param_overhead_under_one_percent():
  for preset in ("qwen3-1.7b", "qwen3-4b"):
    cfg = lj.ModelConfig.preset(preset)
    base = lj.count_params(lj.abstract_params(cfg))
    extra = lj.count_params(lj.abstract_params(cfg, lj.LatticeConfig.default(cfg))) - base
    assert 0 < extra / base < 0.01


def test_abstract_params_allocate_nothing():
  params = lj.abstract_params(lj.ModelConfig.preset("qwen3-8b"))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))


def test_config_errors():
  with pytest.raises(ValueError, match="unknown model preset 'qwen9'"):
    lj.ModelConfig.preset("qwen9")
  with pytest.raises(ValueError, match="num_heads=6 must be a multiple of num_kv_heads=4"):
    lj.ModelConfig.preset("tiny", num_heads=6, num_kv_heads=4)
  with pytest.raises(ValueError, match="dtype='fp8'"):
    lj.ModelConfig.preset("tiny", dtype="fp8")
  with pytest.raises(ValueError, match="gate='sometimes'"):
    lj.LatticeConfig(layers=(1,), width=16, gate="sometimes")
  with pytest.raises(ValueError, match="must be a positive multiple of heads"):
    lj.LatticeConfig(layers=(1,), width=18, heads=4)
  with pytest.raises(ValueError, match="unknown lattice fields"):
    lj.LatticeConfig.from_dict({"layers": [1], "width": 16, "colour": "red"})


def test_three_axis_rope_is_a_config_change():
  lat = lj.LatticeConfig(layers=(1,), width=32, heads=2, rope_axes=("token", "thread", "round"),
                         rope_fractions=(0.5, 0.25, 0.25), rope_thetas=(0.0, 1e4, 1e4))
  assert lat.rope_sections == (8, 4, 4)
  model, params = lj.build_model(lj.ModelConfig.preset("tiny"), lat)
  tokens = jax.numpy.zeros((1, 2, 5), jax.numpy.int32)
  with pytest.raises(ValueError, match=r"needs coordinates \['round'\]"):
    model.apply(params, tokens)
  rounds = jax.numpy.zeros((1, 2, 5), jax.numpy.int32)
  assert model.apply(params, tokens, extra_coords={"round": rounds}).shape == (1, 2, 5, 1024)


_HIDDEN = list(range(64, 4097, 32))


def _default_lattices():
  """LatticeConfig.default for hidden sizes 64..4096 (step 32) x head counts 1..8 (the model's
  attention heads N and the lattice heads C both = c), as (model config, lattice config)."""
  for d in _HIDDEN:
    for c in range(1, 9):
      cfg = lj.ModelConfig(vocab_size=32, d_model=d, num_layers=1, num_heads=c, num_kv_heads=1,
                           head_dim=8, mlp_dim=16, attention="reference")
      yield cfg, lj.LatticeConfig.default(cfg, heads=c, layers=(0,), implementation="reference")


def test_default_lattice_is_valid_for_every_model_shape():
  """Each default is valid (each rotary section of E an even number >= 2 of dims) and R is
  close to D/8."""
  for cfg, lat in _default_lattices():
    d, c = cfg.d_model, lat.heads
    e = lat.head_dim
    assert e % 2 == 0 and e >= 4 and all(n >= 2 and n % 2 == 0 for n in lat.rope_sections)
    assert abs(lat.width - d / 8) <= 2 * c or lat.width == 4 * c, (d, c, lat.width)


def _distinct_lattice_shapes():
  """The first model of each distinct (E, rotary sections) among the defaults (191 of the 1016
  models): the rotary split is what a default can get wrong; C only multiplies the heads."""
  seen = {}
  for cfg, lat in _default_lattices():
    seen.setdefault((lat.head_dim, lat.rope_sections), (cfg, lat))
  return list(seen.values())


@pytest.mark.parametrize("chunk", range(2))
def test_default_lattice_runs_for_every_distinct_shape(chunk):
  """A forward runs for every distinct lattice shape the defaults give; the models of a chunk
  are compiled as one program (XLA:CPU compiles are the cost)."""
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (1, 2, 3)), jnp.int32)
  models, params = [], []
  for i, (cfg, lat) in enumerate(_distinct_lattice_shapes()[chunk::2]):
    rng = np.random.default_rng(i)
    model = lj.Model(cfg, lat)
    models.append(model)
    params.append(jax.tree.map(lambda s: rng.normal(0.0, 0.1, s.shape).astype(s.dtype),
                               model.abstract_params()))
  forward = jax.jit(lambda ps: [m.apply(p, tokens) for m, p in zip(models, ps)])
  outs = forward.trace(params).lower().compile(
      compiler_options={"xla_backend_optimization_level": 0})(params)
  for out in outs:
    assert out.shape == (1, 2, 3, 32) and bool(jnp.all(jnp.isfinite(out)))
  # the lattice changes the output once its up-projection is non-zero
  assert float(jnp.abs(outs[0] - jax.jit(models[0].replace(lattice=None).apply)(
      lj.model.without_lattice(params[0]), tokens)).max()) > 0
