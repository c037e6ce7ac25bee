"""lace_jax: LACE (lattice attention for cross-thread exploration) in JAX.

The public API, imported on first use (PEP 562), so `import lace_jax` is light: it loads no
jax, flax or kernels until a name that needs them is touched, and never the applications'
dependencies (the server's fastapi / uvicorn, the plots' matplotlib).

  import lace_jax as lj
  model, params = lj.build_model(lj.ModelConfig.preset("tiny"))   # or lj.load_pretrained(dir)
  out = lj.sample(model, params, prompts, num_threads=4, max_new_tokens=64)

Layout: the core library is `config`, `model`, `ops`, `hf_io`, `tokenizer`, `data`,
`sharding`, `distributed`, `sampling`, `grading/`, `training/` (the run loop and stages),
`rl/` (Lattice GRPO), `evaluate`, `overhead` and `experiment` (config sections); the
applications `serve/` and `datagen/` and the demo `toy/` are clients of it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "LatticeConfig": "lace_jax.config",
    "ModelConfig": "lace_jax.config",
    "Model": "lace_jax.model",
    "Params": "lace_jax.model",
    "abstract_params": "lace_jax.model",
    "build_model": "lace_jax.model",
    "count_params": "lace_jax.model",
    "lattice_param_mask": "lace_jax.model",
    "without_lattice": "lace_jax.model",
    "CheckpointError": "lace_jax.hf_io",
    "load_pretrained": "lace_jax.hf_io",
    "save_pretrained": "lace_jax.hf_io",
    "Tokenizer": "lace_jax.tokenizer",
    "chat_prompt": "lace_jax.tokenizer",
    "thread_prompts": "lace_jax.tokenizer",
    "SampleOutput": "lace_jax.sampling",
    "sample": "lace_jax.sampling",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name in _EXPORTS:
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value
  try:  # submodules: lace_jax.model, lace_jax.grading, ...
    return importlib.import_module(f"{__name__}.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"{__name__}.{name}":
      raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs: the eager imports
  from lace_jax.config import LatticeConfig, ModelConfig  # noqa: F401
  from lace_jax.hf_io import CheckpointError, load_pretrained, save_pretrained  # noqa: F401
  from lace_jax.model import (Model, Params, abstract_params, build_model,  # noqa: F401
                              count_params, lattice_param_mask, without_lattice)
  from lace_jax.sampling import SampleOutput, sample  # noqa: F401
  from lace_jax.tokenizer import Tokenizer, chat_prompt, thread_prompts  # noqa: F401
