"""lace_jax: LACE (lattice attention for cross-thread exploration) in JAX."""

from lace_jax.config import LatticeConfig, ModelConfig
from lace_jax.model import Model, abstract_params, build_model, count_params, lattice_param_mask

__version__ = "0.1.0"

__all__ = ["LatticeConfig", "Model", "ModelConfig", "abstract_params", "build_model",
           "count_params", "lattice_param_mask"]

from lace_jax.hf_io import CheckpointError, load_pretrained, save_pretrained  # noqa: E402

__all__ += ["CheckpointError", "load_pretrained", "save_pretrained"]

from lace_jax.tokenizer import Tokenizer, chat_prompt, thread_prompts  # noqa: E402

__all__ += ["Tokenizer", "chat_prompt", "thread_prompts"]
