"""Hugging Face interop: parity with transformers' Qwen3ForCausalLM, loading what transformers
writes (fp32, bf16, both config.json RoPE spellings, sharded), exact save/load round trips with
the lattice, and errors that name the file and tensor."""

import json
import os

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import Qwen3Config, Qwen3ForCausalLM

import lace_jax as lj
from tests.conftest import randomize

TINY = lj.ModelConfig.preset("tiny")


def _hf_logits(checkpoint_dir, tokens, dtype=torch.float32):
  """Runs each [B, W] row of tokens [B, W, T] through transformers as its own sequence."""
  hf = Qwen3ForCausalLM.from_pretrained(checkpoint_dir, dtype=dtype).eval()
  b, w, t = tokens.shape
  with torch.no_grad():
    out = hf(torch.tensor(np.asarray(tokens).reshape(b * w, t))).logits
  return out.float().numpy().reshape(b, w, t, -1)


def _random_model(tie, lattice, seed=0):
  cfg = TINY.replace(tie_embeddings=tie)
  lat = lj.LatticeConfig.default(cfg) if lattice else None
  m, fresh = lj.build_model(cfg, lat, seed=seed)
  params = randomize(fresh, seed=seed + 1)
  if lattice:  # keep the lattice exactly at its fresh (identity) state for HF parity
    for i in lat.layers:
      params[f"layers_{i}"]["lattice"] = fresh[f"layers_{i}"]["lattice"]
  return m, params


def _tokens(shape, seed=0):
  return np.random.RandomState(seed).randint(0, TINY.vocab_size, shape).astype(np.int32)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("lattice", [False, True])
@pytest.mark.parametrize("w", [1, 3])
def test_parity_with_transformers(tmp_path, tie, lattice, w):
  model, model_p = _random_model(tie, lattice)
  lj.save_pretrained(model, model_p, tmp_path)
  tokens = _tokens((2, w, 13), seed=w)
  ours = np.asarray(jax.jit(model.apply)(model_p, tokens))
  ref = _hf_logits(tmp_path, tokens)
  assert np.abs(ours - ref).max() <= 1e-4, np.abs(ours - ref).max()


def _hf_written_checkpoint(path, tie=True, dtype=torch.float32):
  torch.manual_seed(0)
  hf_cfg = Qwen3Config(vocab_size=TINY.vocab_size, hidden_size=TINY.d_model,
                       intermediate_size=TINY.mlp_dim, num_hidden_layers=TINY.num_layers,
                       num_attention_heads=TINY.num_heads, num_key_value_heads=TINY.num_kv_heads,
                       head_dim=TINY.head_dim, rope_theta=10_000.0, tie_word_embeddings=tie,
                       initializer_range=0.2)
  hf = Qwen3ForCausalLM(hf_cfg).to(dtype)
  with torch.no_grad():  # norms away from 1 so their loading is tested too
    for name, p in hf.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  hf.save_pretrained(path)
  return path


@pytest.mark.parametrize("tie", [True, False])
def test_loads_what_transformers_writes(tmp_path, tie):
  path = _hf_written_checkpoint(tmp_path / "hf", tie)
  model, model_p = lj.load_pretrained(path)
  assert model.lattice is None and model.config.tie_embeddings == tie
  tokens = _tokens((1, 2, 11))
  ours = np.asarray(model.apply(model_p, tokens))
  np.testing.assert_allclose(ours, _hf_logits(path, tokens), atol=1e-4)


@pytest.mark.parametrize("form", ["rope_theta", "rope_parameters"])
def test_both_config_rope_spellings(tmp_path, form):
  path = _hf_written_checkpoint(tmp_path / "hf")
  cfg_path = path / "config.json"
  hf_cfg = json.loads(cfg_path.read_text())
  hf_cfg.pop("rope_theta", None)
  hf_cfg.pop("rope_parameters", None)
  if form == "rope_theta":
    hf_cfg["rope_theta"] = 10_000.0
  else:
    hf_cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 10_000.0}
  cfg_path.write_text(json.dumps(hf_cfg))
  assert lj.ModelConfig.from_hf(path).rope_theta == 10_000.0


def test_bf16_checkpoint_loads(tmp_path):
  path = _hf_written_checkpoint(tmp_path / "hf", dtype=torch.bfloat16)
  tokens = _tokens((1, 1, 9))
  ref = _hf_logits(path, tokens, dtype=torch.float32)  # bf16 weights, fp32 compute
  as_fp32, as_fp32_p = lj.load_pretrained(path, dtype="float32")
  np.testing.assert_allclose(np.asarray(as_fp32.apply(as_fp32_p, tokens)), ref, atol=1e-4)
  as_bf16, as_bf16_p = lj.load_pretrained(path, dtype="bfloat16")
  assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(as_bf16_p))
  out = np.asarray(as_bf16.apply(as_bf16_p, tokens))
  assert np.abs(out - ref).max() / np.abs(ref).max() < 5e-2


def test_round_trip_with_lattice_is_exact_and_sharded(tmp_path):
  cfg = TINY.replace(tie_embeddings=False)
  lat = lj.LatticeConfig(layers=(1, 3), width=16, heads=2, gate="head", mask="other_threads")
  model, model_p = lj.build_model(cfg, lat, seed=4)
  model_p = randomize(model_p, seed=5)  # non-zero up-projections
  lj.save_pretrained(model, model_p, tmp_path, max_shard_bytes=200_000)
  files = sorted(os.listdir(tmp_path))
  assert "model.safetensors.index.json" in files
  assert sum(f.endswith(".safetensors") for f in files) > 1
  loaded, loaded_p = lj.load_pretrained(tmp_path)
  assert loaded.lattice == lat and loaded.config == cfg.replace(name=loaded.config.name)
  jax.tree.map(np.testing.assert_array_equal, model_p, loaded_p)
  # transformers reads the same directory as the base model, ignoring the lattice tensors
  base, base_p = lj.load_pretrained(tmp_path, lattice=None)
  tokens = _tokens((1, 2, 7))
  np.testing.assert_allclose(np.asarray(base.apply(base_p, tokens)),
                             _hf_logits(tmp_path, tokens), atol=1e-4)


def test_attaching_a_fresh_lattice_to_a_base_checkpoint(tmp_path):
  path = _hf_written_checkpoint(tmp_path / "hf")
  lat = lj.LatticeConfig.default(TINY)
  model, model_p = lj.load_pretrained(path, lattice=lat)
  base, base_p = lj.load_pretrained(path)
  assert model.lattice == lat
  tokens = _tokens((1, 4, 9))
  np.testing.assert_array_equal(np.asarray(model.apply(model_p, tokens)),
                                np.asarray(base.apply(base_p, tokens)))


# ----- errors name the file and the tensor -----

@pytest.fixture
def saved(tmp_path):
  model, model_p = lj.build_model(TINY, None, seed=0)
  lj.save_pretrained(model, model_p, tmp_path / "ck")
  return tmp_path / "ck"


def test_error_missing_directory_and_config(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    lj.load_pretrained(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="config.json"):
    lj.load_pretrained(tmp_path / "empty")


def test_error_missing_weights_file(saved):
  os.remove(saved / "model.safetensors")
  with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
    lj.load_pretrained(saved)


def test_error_unknown_architecture(saved):
  cfg = json.loads((saved / "config.json").read_text())
  cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
  (saved / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=r"config.json: unsupported architecture.*llama"):
    lj.load_pretrained(saved)


def _edit_tensors(path, fn):
  tensors = load_file(path / "model.safetensors")
  fn(tensors)
  save_file(tensors, path / "model.safetensors")


def test_error_missing_tensor(saved):
  _edit_tensors(saved, lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
  with pytest.raises(lj.CheckpointError,
                     match=r"missing tensor 'model.layers.2.mlp.up_proj.weight'.*model.safetensors"):
    lj.load_pretrained(saved)


def test_error_unexpected_tensor(saved):
  _edit_tensors(saved, lambda t: t.update({"model.layers.9.mlp.up_proj.weight": np.zeros(3)}))
  with pytest.raises(lj.CheckpointError, match=r"unexpected tensors.*model.layers.9.*model.safetensors"):
    lj.load_pretrained(saved)


def test_error_shape_mismatch(saved):
  def shrink(t):
    t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:-1]
  _edit_tensors(saved, shrink)
  with pytest.raises(lj.CheckpointError,
                     match=r"model.safetensors: tensor 'model.layers.0.self_attn.k_proj.weight' "
                           r"has shape \(63, 128\), expected \(64, 128\)"):
    lj.load_pretrained(saved)


def test_error_missing_shard(tmp_path):
  model, model_p = lj.build_model(TINY, None, seed=0)
  lj.save_pretrained(model, model_p, tmp_path, max_shard_bytes=300_000)
  shard = sorted(f for f in os.listdir(tmp_path) if f.startswith("model-"))[-1]
  os.remove(tmp_path / shard)
  with pytest.raises(FileNotFoundError, match=f"maps tensor .* to '{shard}'"):
    lj.load_pretrained(tmp_path)


def test_error_lattice_config_mismatch(tmp_path):
  model, model_p = lj.build_model(TINY, lj.LatticeConfig(layers=(1,), width=16, heads=2), seed=0)
  lj.save_pretrained(model, model_p, tmp_path)
  with pytest.raises(lj.CheckpointError, match=r"lattice.down_proj.weight' has shape \(16, 128\), expected \(32, 128\)"):
    lj.load_pretrained(tmp_path, lattice=lj.LatticeConfig(layers=(1,), width=32, heads=2))


def test_lattice_qk_norm_round_trip_and_identity_at_init(tmp_path):
  """lattice.qk_norm adds q/k RMSNorm scales: saved and loaded exactly; a fresh model still
  computes its base model."""
  import numpy as np
  import jax.numpy as jnp
  import lace_jax as lj
  cfg = lj.ModelConfig.preset("tiny", dtype="float32")
  lat = lj.LatticeConfig(layers=(1, 3), width=32, heads=2, qk_norm=True)
  model, model_p = lj.build_model(cfg, lat, seed=3)
  assert model_p["layers_1"]["lattice"]["q_norm"]["scale"].shape == (16,)
  base, base_p = lj.build_model(cfg, None, seed=3)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 1000, (1, 3, 9)), jnp.int32)
  np.testing.assert_array_equal(model.apply(model_p, tokens), base.apply(base_p, tokens))
  # perturb every lattice tensor so the round trip is checked on non-trivial values
  params = jax.tree.map(lambda x: x + 0.1 * jnp.sin(jnp.arange(x.size).reshape(x.shape)),
                        model_p)
  lj.save_pretrained(lj.Model(cfg, lat), params, tmp_path)
  loaded, loaded_p = lj.load_pretrained(tmp_path)
  assert loaded.lattice == lat
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded_p)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----- issue 16: non-finite numbers and unreadable files are refused on load, by name -----

def test_error_non_finite_weight(saved):
  def poison(t):
    w = t["model.layers.1.mlp.up_proj.weight"]
    w[3, 5], w[0, 0] = np.nan, np.inf
  _edit_tensors(saved, poison)
  with pytest.raises(lj.CheckpointError,
                     match=r"refusing to load non-finite weights:\n  .*model.safetensors: tensor "
                           r"'model.layers.1.mlp.up_proj.weight' has 1 NaN and 1 infinite values"):
    lj.load_pretrained(saved)


def test_error_float32_weight_overflowing_float16(saved):
  _edit_tensors(saved, lambda t: t["model.norm.weight"].__setitem__(0, 1e6))
  lj.load_pretrained(saved)  # finite in float32
  with pytest.raises(lj.CheckpointError, match=r"'model.norm.weight' has 0 NaN and 1 infinite "
                                               r"values of 128 \(stored as float32, loaded as "
                                               r"float16"):
    lj.load_pretrained(saved, dtype="float16")


@pytest.mark.parametrize("field,value,name", [
    ("rope_theta", float("nan"), "rope_theta"),
    ("rope_theta", 0.0, "rope_theta"),
    ("rms_norm_eps", -1e-6, "rms_norm_eps"),
    ("rms_norm_eps", float("inf"), "rms_norm_eps"),
    ("rms_norm_eps", "small", "rms_norm_eps"),
])
def test_error_non_finite_or_non_positive_config_numbers(saved, field, value, name):
  cfg = json.loads((saved / "config.json").read_text())
  cfg[field] = value
  cfg.pop("rope_parameters")  # else it would be read as a second spelling of rope_theta
  (saved / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=rf"config.json: {name}=.*expected a finite number > 0"):
    lj.load_pretrained(saved)


def test_config_numbers_are_checked_in_the_dataclasses():
  with pytest.raises(ValueError, match=r"ModelConfig.rope_theta=nan; expected a finite number"):
    lj.ModelConfig.preset("tiny", rope_theta=float("nan"))
  with pytest.raises(ValueError, match=r"ModelConfig.rms_eps=-1.0; expected a finite number > 0"):
    lj.ModelConfig.preset("tiny", rms_eps=-1.0)
  with pytest.raises(ValueError, match=r"LatticeConfig.rope_thetas\[1\].*=inf"):
    lj.LatticeConfig(layers=(1,), width=16, rope_thetas=(0.0, float("inf")))
  with pytest.raises(ValueError, match=r"lattice: LatticeConfig.init_std.*=-0.1"):
    lj.LatticeConfig.from_dict({"layers": [1], "width": 16, "init_std": -0.1}, source="lattice")


@pytest.mark.parametrize("keep", [0.5, 0.999, 4])
def test_error_truncated_safetensors_names_the_file(saved, keep):
  path = saved / "model.safetensors"
  data = path.read_bytes()
  path.write_bytes(data[:int(len(data) * keep)] if keep < 1 else data[:keep])
  with pytest.raises(lj.CheckpointError, match=rf"{path}: not a readable safetensors file"):
    lj.load_pretrained(saved)
