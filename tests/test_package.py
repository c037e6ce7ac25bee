"""The package as a user imports it: light, with the public API and applications apart."""

import subprocess
import sys


def _modules_after(code: str) -> set[str]:
  r = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sys.modules))"],
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  return {m.split(".")[0] for m in r.stdout.split()}


def test_import_lace_jax_is_light():
  """No application dependency, and not even jax, until a name that needs it is used."""
  loaded = _modules_after("import lace_jax")
  assert not loaded & {"fastapi", "uvicorn", "httpx", "matplotlib", "starlette", "jax", "flax",
                       "kernels", "torch"}, loaded


def test_core_library_imports_no_application():
  """Training, RL, sampling, evaluation and grading never import the server, datagen or the
  toy demo (they are clients of the library)."""
  loaded = _modules_after(
      "import lace_jax.training.loop, lace_jax.training.lm, lace_jax.rl.stage, "
      "lace_jax.evaluate, lace_jax.sampling, lace_jax.grading, lace_jax.modes")
  assert not loaded & {"fastapi", "uvicorn", "httpx", "matplotlib", "starlette"}, loaded
  r = subprocess.run([sys.executable, "-c",
                      "import lace_jax.training.loop, lace_jax.rl.stage, lace_jax.evaluate, sys;"
                      "print(sorted(m for m in sys.modules if m.startswith(('lace_jax.serve', "
                      "'lace_jax.datagen', 'lace_jax.toy'))))"],
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr)


def test_public_api_names_resolve():
  import lace_jax as lj
  for name in lj.__all__:
    assert getattr(lj, name) is not None, name
  from lace_jax.sampling import sample
  assert lj.sample is sample
  try:
    lj.no_such_name
  except AttributeError as e:
    assert "no_such_name" in str(e)
  else:
    raise AssertionError("an unknown attribute must raise AttributeError")
