"""Model and lattice configuration.

Axis letters (used in every einsum string, shape comment and docstring of this package):
  B batch · W thread · T query position · S key position · D model width · N query heads
  K kv heads · G query heads per kv head (N = K * G) · H head dim · F MLP hidden · V vocab
  R lattice width · C lattice heads · E lattice head dim (R = C * E)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Literal

from lace_jax.errors import ConfigError

_DTYPES = ("float32", "bfloat16", "float16")
# vocabulary rows per slice of the chunked losses (`lace_jax.losses`): 19 slices of Qwen3's
# 151,936; here so that the config sections (`lace_jax.experiment`) need no jax
DEFAULT_LOGITS_CHUNK = 8192
_REMAT = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and numerics of a Qwen3 dense decoder.

  `dtype` is the compute dtype of activations and matmuls, `param_dtype` the storage dtype of
  the parameters; bf16 compute over fp32 parameters is `dtype="bfloat16", param_dtype="float32"`.
  `remat` rematerialises each decoder layer in the backward pass: "none", "full" (save only
  the layer input) or "dots" (save matmul outputs without batch dims). `attention` selects the
  backbone attention implementation (see `kernels.attention`; None = auto per backend).
  """

  vocab_size: int
  d_model: int  # D
  num_layers: int  # L
  num_heads: int  # N
  num_kv_heads: int  # K
  head_dim: int  # H
  mlp_dim: int  # F
  rms_eps: float = 1e-6
  rope_theta: float = 1_000_000.0
  tie_embeddings: bool = True
  max_position_embeddings: int = 40_960
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"
  attention: str | None = None
  init_std: float = 0.02
  name: str = "custom"

  def __post_init__(self):
    for field in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "mlp_dim"):
      if int(getattr(self, field)) <= 0:
        raise ConfigError(f"ModelConfig.{field} must be positive, got {getattr(self, field)!r}")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(
          f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE")
    for field in ("dtype", "param_dtype"):
      if getattr(self, field) not in _DTYPES:
        raise ConfigError(f"ModelConfig.{field}={getattr(self, field)!r}; expected one of {_DTYPES}")
    if self.remat not in _REMAT:
      raise ConfigError(f"ModelConfig.remat={self.remat!r}; expected one of {_REMAT}")
    # a NaN or non-positive theta or eps gives NaN activations: every token then decodes alike
    for field in ("rms_eps", "rope_theta"):
      _check_number(f"ModelConfig.{field}", getattr(self, field), positive=True)
    _check_number("ModelConfig.init_std", self.init_std, positive=False)
    if int(self.max_position_embeddings) <= 0:
      raise ConfigError(f"ModelConfig.max_position_embeddings must be positive, got "
                       f"{self.max_position_embeddings!r}")

  def replace(self, **kwargs) -> ModelConfig:
    return dataclasses.replace(self, **kwargs)

  @classmethod
  def preset(cls, name: str, **overrides) -> ModelConfig:
    """A named preset: `tiny` (tests and demos) or a published Qwen3 shape."""
    if name not in PRESETS:
      raise ConfigError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)

  @classmethod
  def from_hf(cls, checkpoint_dir: str | os.PathLike, **overrides) -> ModelConfig:
    """Reads a Hugging Face Qwen3 `config.json` (classic `rope_theta` or transformers-5
    `rope_parameters` form)."""
    return cls.from_hf_dict(read_hf_config(checkpoint_dir),
                            source=os.path.join(checkpoint_dir, "config.json"), **overrides)

  @classmethod
  def from_hf_dict(cls, hf: dict[str, Any], *, source: str = "config.json",
                   **overrides) -> ModelConfig:
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    if model_type != "qwen3" or (archs and "Qwen3ForCausalLM" not in archs):
      raise ConfigError(
          f"{source}: unsupported architecture (model_type={model_type!r}, architectures={archs});"
          " expected model_type 'qwen3' / Qwen3ForCausalLM")
    if hf.get("attention_bias", False):
      raise ConfigError(f"{source}: attention_bias=true is not part of Qwen3; not supported")
    theta = hf.get("rope_theta")
    rope_params = hf.get("rope_parameters")
    if theta is None and isinstance(rope_params, dict):
      if rope_params.get("rope_type", "default") != "default":
        raise ConfigError(f"{source}: rope_parameters.rope_type={rope_params.get('rope_type')!r};"
                         " only 'default' RoPE is supported")
      theta = rope_params.get("rope_theta")
    if hf.get("rope_scaling"):
      raise ConfigError(f"{source}: rope_scaling={hf['rope_scaling']!r} is not supported")
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size") if k not in hf]
    if missing:
      raise ConfigError(f"{source}: missing required fields {missing}")
    if theta is None:
      raise ConfigError(f"{source}: neither rope_theta nor rope_parameters.rope_theta is set")
    # numbers are checked here to name the config.json field and file (NaN and Infinity are
    # valid in Python's JSON)
    theta_key = "rope_theta" if "rope_theta" in hf else "rope_parameters.rope_theta"
    theta = _check_number(f"{source}: {theta_key}", theta, positive=True)
    rms_eps = _check_number(f"{source}: rms_norm_eps", hf.get("rms_norm_eps", 1e-6),
                            positive=True)
    d = int(hf["hidden_size"])
    n = int(hf["num_attention_heads"])
    dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    kwargs = dict(
        vocab_size=int(hf["vocab_size"]),
        d_model=d,
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=n,
        num_kv_heads=int(hf.get("num_key_value_heads", n)),
        head_dim=int(hf.get("head_dim") or d // n),
        mlp_dim=int(hf["intermediate_size"]),
        rms_eps=rms_eps,
        rope_theta=theta,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 40_960)),
        param_dtype=dtype if dtype in _DTYPES else "float32",
        dtype=dtype if dtype in _DTYPES else "float32",
        name=str(hf.get("_name_or_path") or os.path.basename(os.path.dirname(os.path.abspath(source)))),
    )
    kwargs.update(overrides)
    return cls(**kwargs)

  def to_hf_dict(self) -> dict[str, Any]:
    """`config.json` contents readable by transformers 4.5x and 5.x (both RoPE spellings)."""
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": self.vocab_size,
        "hidden_size": self.d_model,
        "intermediate_size": self.mlp_dim,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": self.rms_eps,
        "rope_theta": self.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": self.tie_embeddings,
        "max_position_embeddings": self.max_position_embeddings,
        "initializer_range": self.init_std,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": self.num_layers,
        "use_cache": True,
        "torch_dtype": self.param_dtype,
        # Qwen3's <|endoftext|> and <|im_end|>, only where the vocabulary holds them.
        "bos_token_id": 151643 if self.vocab_size > 151643 else None,
        "eos_token_id": 151645 if self.vocab_size > 151645 else None,
    }


def _check_number(name: str, value: Any, *, positive: bool) -> float:
  """float(value), or ValueError naming `name` unless it is a finite number > 0 (positive)
  or >= 0."""
  bound = "> 0" if positive else ">= 0"
  try:
    x = float(value)
  except (TypeError, ValueError):
    x = math.nan
  if isinstance(value, bool) or not math.isfinite(x) or x < 0 or (positive and x == 0):
    raise ConfigError(f"{name}={value!r}; expected a finite number {bound}")
  return x


def read_hf_config(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
  path = os.path.join(checkpoint_dir, "config.json")
  if not os.path.isdir(checkpoint_dir):
    raise FileNotFoundError(f"checkpoint directory {str(checkpoint_dir)!r} does not exist")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: a Hugging Face checkpoint directory needs a"
                            " config.json")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path} is not valid JSON: {e}") from e


# Published shapes from the Hugging Face config.json of each Qwen3 release:
# name: (d_model D, layers L, heads N, kv heads K, MLP hidden F, tied embeddings); V 151936, H 128
_QWEN3 = {
    "qwen3-0.6b": (1024, 28, 16, 8, 3072, True),
    "qwen3-1.7b": (2048, 28, 16, 8, 6144, True),
    "qwen3-4b": (2560, 36, 32, 8, 9728, True),
    "qwen3-8b": (4096, 36, 32, 8, 12288, False),
}
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab_size=1024, d_model=128, num_layers=4, num_heads=4, num_kv_heads=2,
                        head_dim=32, mlp_dim=256, rope_theta=10_000.0, max_position_embeddings=4096,
                        name="tiny"),
    **{name: ModelConfig(vocab_size=151936, d_model=d, num_layers=layers, num_heads=n,
                         num_kv_heads=k, head_dim=128, mlp_dim=f, tie_embeddings=tied, name=name)
       for name, (d, layers, n, k, f, tied) in _QWEN3.items()},
}

GateMode = Literal["elementwise", "head", "none"]
MaskMode = Literal["causal", "other_threads", "same_position"]
_GATES = ("elementwise", "head", "none")
_SOURCES = ("attn_out", "hidden")
_MASKS = ("causal", "other_threads", "same_position")


@dataclasses.dataclass(frozen=True)
class LatticeConfig:
  """The gated cross-thread side path (spec section 3) and its multi-axis RoPE (section 4).

  `rope_axes` names the coordinate of each rotary section of a lattice head (E dims): "token"
  (the token position), "thread" (the thread index) or any name passed as an extra coordinate
  to the forward pass. `rope_fractions` gives each section's share of E (the first section takes
  the remainder after the others are rounded to even sizes), `rope_thetas` each base; a theta of
  0 means the backbone's `rope_theta`.
  """

  layers: tuple[int, ...]
  width: int  # R
  heads: int = 4  # C
  gate: str = "elementwise"
  source: str = "attn_out"
  mask: str = "causal"
  rope_axes: tuple[str, ...] = ("token", "thread")
  rope_fractions: tuple[float, ...] = (0.75, 0.25)
  rope_thetas: tuple[float, ...] = (0.0, 10_000.0)
  implementation: str | None = None
  # RMSNorm (learned per-dim scale) on each lattice head's q and k before RoPE, as Qwen3 does in
  # its own attention: the scores then no longer scale with the size of the side path's input
  qk_norm: bool = False
  # std of the lattice matrices at init (W_up excepted: it starts at zero); 0 = 1/sqrt(fan_in),
  # which keeps the side path's signal at unit scale through its five projections at any width
  init_std: float = 0.0

  def __post_init__(self):
    object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
    object.__setattr__(self, "rope_axes", tuple(self.rope_axes))
    object.__setattr__(self, "rope_fractions", tuple(float(x) for x in self.rope_fractions))
    object.__setattr__(self, "rope_thetas", tuple(float(x) for x in self.rope_thetas))
    if len(set(self.layers)) != len(self.layers) or any(i < 0 for i in self.layers):
      raise ConfigError(f"LatticeConfig.layers={self.layers} must be distinct non-negative ints")
    if self.width <= 0 or self.heads <= 0 or self.width % self.heads:
      raise ConfigError(f"LatticeConfig.width={self.width} must be a positive multiple of "
                       f"heads={self.heads}")
    for field, allowed in (("gate", _GATES), ("source", _SOURCES), ("mask", _MASKS)):
      if getattr(self, field) not in allowed:
        raise ConfigError(f"LatticeConfig.{field}={getattr(self, field)!r}; expected one of "
                         f"{allowed}")
    if not (len(self.rope_axes) == len(self.rope_fractions) == len(self.rope_thetas)):
      raise ConfigError(f"rope_axes={self.rope_axes}, rope_fractions={self.rope_fractions} and "
                       f"rope_thetas={self.rope_thetas} must have the same length")
    if len(set(self.rope_axes)) != len(self.rope_axes):
      raise ConfigError(f"rope_axes={self.rope_axes} must be distinct")
    for i, (fraction, theta) in enumerate(zip(self.rope_fractions, self.rope_thetas)):
      _check_number(f"LatticeConfig.rope_fractions[{i}]", fraction, positive=False)
      _check_number(f"LatticeConfig.rope_thetas[{i}] (0 = the backbone's)", theta, positive=False)
    _check_number("LatticeConfig.init_std (0 = 1/sqrt(fan_in))", self.init_std, positive=False)
    self.rope_sections  # validates the split of E

  @property
  def head_dim(self) -> int:  # E
    return self.width // self.heads

  @property
  def rope_sections(self) -> tuple[int, ...]:
    """Dims of each rotary section (each even, summing to E)."""
    e = self.head_dim
    rest = [2 * max(1, round(f * e / 2)) if f > 0 else 0 for f in self.rope_fractions[1:]]
    first = e - sum(rest)
    if first < 2 or first % 2:
      raise ConfigError(
          f"lattice head dim E={e} (width {self.width} / heads {self.heads}) cannot hold rotary "
          f"sections {self.rope_axes} with fractions {self.rope_fractions}: every section needs "
          "an even number >= 2 of dims; raise lattice.width or lower lattice.heads")
    return (first, *rest)

  def replace(self, **kwargs) -> LatticeConfig:
    return dataclasses.replace(self, **kwargs)

  def validate_for(self, model: ModelConfig) -> None:
    bad = [i for i in self.layers if i >= model.num_layers]
    if bad:
      raise ConfigError(f"lattice layers {bad} out of range for a {model.num_layers}-layer model")

  @classmethod
  def default(cls, model: ModelConfig, **overrides) -> LatticeConfig:
    """The spec's defaults: R = D/8, C = 4, every other layer from L/2 to L-1.

    R is rounded so that each head's dim E = R/C is even and at least 4: the rotary sections
    (token 3/4, thread 1/4 of E) then each get an even number >= 2 of dims, for every model
    width (Qwen3-1.7B: R = 256, E = 64; 4B: R = 320, E = 80; a width-96 model: R = 16, E = 4).
    """
    heads = overrides.pop("heads", 4)
    if "width" not in overrides:
      overrides["width"] = heads * max(4, 2 * round(model.d_model / (16 * heads)))
    kwargs = dict(layers=tuple(range(model.num_layers // 2, model.num_layers, 2)), heads=heads)
    kwargs.update(overrides)
    return cls(**kwargs)

  def to_dict(self) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(self).items()}

  @classmethod
  def from_dict(cls, d: dict[str, Any], *, source: str = "lattice config") -> LatticeConfig:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ConfigError(f"{source}: unknown lattice fields {unknown}; expected a subset of "
                       f"{sorted(names)}")
    try:
      return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})
    except (TypeError, ValueError) as e:
      raise ConfigError(f"{source}: {e}") from e
