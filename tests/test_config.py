"""Presets against the published Hugging Face shapes, lattice defaults, and config errors."""

import jax
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
