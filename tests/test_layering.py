"""The package's structure, read from its source: the layers it is built in, the imports that
are deferred on purpose, and its name beside PyPI's `kernels`.

Every `import` of a project module is read with `ast`, at module level and inside functions
alike, so a dependency hidden in a function body is still an edge of the graph."""

import ast
import os
import subprocess
import sys
import textwrap
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# source folder -> the package it installs as (pyproject.toml's package-dir)
SOURCES = {"lace_jax": "lace_jax", "kernels": "lace_jax.kernels"}

# The layers, bottom to top. A module belongs to the entry that is the longest prefix of its
# name. It may import modules of lower layers, and modules under its own entry (a package's
# modules among themselves); nothing above, nothing beside it.
LAYERS = (
    ("lace_jax.errors",),  # the error classes every layer raises
    ("lace_jax.config", "lace_jax.runtime", "lace_jax.bundled", "lace_jax.workdir",
     "lace_jax.training", "lace_jax.rl"),  # the last two: their docstring-only __init__s
    ("lace_jax.tokenizer",),
    ("lace_jax.grading", "lace_jax.data"),
    ("lace_jax.experiment", "lace_jax.sweep"),  # config sections and sweeps: no jax
    ("lace_jax.kernels",),
    ("lace_jax.sharding", "lace_jax.ops"),
    ("lace_jax.model", "lace_jax.losses", "lace_jax.diagnostics"),
    ("lace_jax.hf_io", "lace_jax.sampling", "lace_jax.overhead", "lace_jax.distributed"),
    ("lace_jax.engine",),  # generation in slots, on the sampler's pieces
    ("lace_jax.training.setup", "lace_jax.training.trainer", "lace_jax.training.checkpointer",
     "lace_jax.training.metrics", "lace_jax.rl.grpo"),
    ("lace_jax.training.loop", "lace_jax.evaluate"),
    ("lace_jax.training.lm", "lace_jax.rl.stage"),
    ("lace_jax.plan",),
    ("lace_jax.serve", "lace_jax.datagen", "lace_jax.toy"),  # applications and the demo
    ("lace_jax.modes",),
    ("lace_jax.main",),
)

# Function-local imports of the project's own modules allowed, each for a reason written
# beside it in the source: they keep the CLI's start light (a mode's stack loads when that
# mode runs). Any other one hides an edge and fails `test_no_hidden_imports`.
LAZY = {
    ("lace_jax.modes", "lace_jax.datagen.pipeline"),
    ("lace_jax.modes", "lace_jax.evaluate"),
    ("lace_jax.modes", "lace_jax.overhead"),
    ("lace_jax.modes", "lace_jax.rl.stage"),
    ("lace_jax.modes", "lace_jax.training.lm"),
    ("lace_jax.modes", "lace_jax.toy.comparison"),
    ("lace_jax.modes", "lace_jax.toy.quickstart"),
    ("lace_jax.modes", "lace_jax.toy.selection"),
    ("lace_jax.main", "lace_jax.plan"),
    ("lace_jax.toy.quickstart", "lace_jax.toy.comparison"),  # the CLI's default --config file
    ("lace_jax.toy.quickstart", "lace_jax.toy.selection"),
}


def _modules() -> dict[str, str]:
  """{module name: path} of every module the project installs."""
  out = {}
  for folder, package in SOURCES.items():
    for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
      for f in files:
        if f.endswith(".py"):
          rel = os.path.relpath(os.path.join(dirpath, f), os.path.join(ROOT, folder))
          parts = [package] + rel[:-3].split(os.sep)
          if parts[-1] == "__init__":
            parts.pop()
          out[".".join(parts)] = os.path.join(dirpath, f)
  return out


def imports_of(source: str, module: str, is_package: bool, known: set[str]):
  """[(imported module, line, inside a function)] of the project's modules in `source`;
  `if TYPE_CHECKING:` blocks are skipped (they run for type checkers only)."""
  package = module if is_package else module.rpartition(".")[0]
  found = []

  class Visitor(ast.NodeVisitor):

    def __init__(self):
      self.depth = 0

    def visit_FunctionDef(self, node):
      self.depth += 1
      self.generic_visit(node)
      self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node):
      if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
        self.generic_visit(node)

    def visit_Import(self, node):
      for alias in node.names:
        found.append((alias.name, node.lineno, self.depth > 0))

    def visit_ImportFrom(self, node):
      base = node.module or ""
      if node.level:
        parts = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
      for alias in node.names:
        full = f"{base}.{alias.name}"
        found.append((full if full in known else base, node.lineno, self.depth > 0))

  Visitor().visit(ast.parse(source))
  return [(m, line, local) for m, line, local in found
          if m.split(".")[0] == "lace_jax" or m.split(".")[0] == "kernels"]


def graph():
  modules = _modules()
  known = set(modules)
  edges = []
  for name, path in modules.items():
    with open(path) as f:
      source = f.read()
    for target, line, local in imports_of(source, name, path.endswith("__init__.py"), known):
      edges.append((name, target, f"{os.path.relpath(path, ROOT)}:{line}", local))
  return modules, edges


def _entry(module: str) -> tuple[int, str]:
  best = None
  for level, entries in enumerate(LAYERS):
    for e in entries:
      if (module == e or module.startswith(e + ".")) and (best is None or len(e) > len(best[1])):
        best = (level, e)
  assert best is not None, f"{module} is in no layer of tests/test_layering.py: add it"
  return best


def violations(edges) -> list[str]:
  bad = []
  for source, target, where, _ in edges:
    if "lace_jax" in (source, target):  # the package's lazy API (`import lace_jax as lj`)
      continue
    (ls, es), (lt, et) = _entry(source), _entry(target)
    if lt > ls or (lt == ls and es != et):
      bad.append(f"{where}: {source} (layer {ls}, {es}) imports {target} (layer {lt}, {et})")
  return bad


def test_every_module_has_a_layer():
  modules, _ = graph()
  for m in modules:
    if m != "lace_jax":  # the package: its public API, imported lazily by name (PEP 562)
      _entry(m)


def test_imports_go_down_the_layers():
  """Function-local imports included: a hidden upward import fails here."""
  _, edges = graph()
  assert not violations(edges), "\n".join(violations(edges))


def test_the_layering_check_sees_a_hidden_upward_import():
  modules, edges = graph()
  source = "def f():\n  from lace_jax.training import loop\n  return loop\n"
  extra = [("lace_jax.model", t, "model.py:2", local) for t, _, local in
           imports_of(source, "lace_jax.model", False, set(modules))]
  assert extra == [("lace_jax.model", "lace_jax.training.loop", "model.py:2", True)]
  assert violations(extra) == ["model.py:2: lace_jax.model (layer 7, lace_jax.model) imports "
                               "lace_jax.training.loop (layer 11, lace_jax.training.loop)"]
  beside = [("lace_jax.serve.server", "lace_jax.toy.tasks", "server.py:1", False)]
  assert len(violations(beside)) == 1  # same layer, another entry: not allowed either


def test_no_hidden_imports():
  """Function-local imports of the project's modules: only the documented lazy ones."""
  _, edges = graph()
  hidden = sorted(f"{where}: {s} imports {t}" for s, t, where, local in edges
                  if local and (s, t) not in LAZY)
  assert not hidden, "imports inside functions (move them to the top):\n" + "\n".join(hidden)
  used = {(s, t) for s, t, _, local in edges if local}
  assert LAZY <= used, f"LAZY lists imports the code no longer makes: {LAZY - used}"


def test_no_top_level_kernels_import():
  """The kernels install as lace_jax.kernels; nothing imports a top-level `kernels` (PyPI's
  package of that name may be installed beside this one)."""
  offenders = []
  for folder in ("lace_jax", "kernels", "tests", "benchmarks", "experiments"):
    for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
      for f in files:
        if not f.endswith(".py"):
          continue
        path = os.path.join(dirpath, f)
        with open(path) as fh:
          tree = ast.parse(fh.read())
        for node in ast.walk(tree):
          names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                   [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                   else [])
          offenders += [f"{os.path.relpath(path, ROOT)}:{node.lineno}" for n in names
                        if n == "kernels" or n.startswith("kernels.")]
  assert not offenders, offenders


def test_pyproject_installs_every_package_folder():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    tool = tomllib.load(f)["tool"]["setuptools"]
  assert tool["package-dir"] == {"lace_jax": "lace_jax", "lace_jax.kernels": "kernels"}
  packages = {m for m, p in _modules().items() if p.endswith("__init__.py")}
  assert set(tool["packages"]) == packages


def test_imports_beside_another_top_level_kernels(tmp_path):
  """With a different top-level `kernels` first on the path (as PyPI's would be), both import
  and the model runs: the project never reaches for the other one."""
  other = tmp_path / "site" / "kernels"
  other.mkdir(parents=True)
  (other / "__init__.py").write_text("WHO = 'another package'\n")
  code = textwrap.dedent("""
      import kernels
      import lace_jax.kernels
      import jax.numpy as jnp
      import lace_jax as lj
      assert kernels.WHO == 'another package', kernels.__file__
      assert lace_jax.kernels.__name__ == 'lace_jax.kernels'
      model, params = lj.build_model(lj.ModelConfig.preset('tiny'))
      logits = model.apply(params, jnp.ones((1, 2, 4), jnp.int32))
      import sys
      print(sys.modules['kernels'].__file__, logits.shape)
  """)
  env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert str(other) in r.stdout and "(1, 2, 4, " in r.stdout, r.stdout


@pytest.mark.parametrize("name", sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "experiments"))
                                        if f.endswith(".py")))
def test_experiment_files_load_without_jax(name):
  """An experiment file is config only: loading it and building its configs imports no jax."""
  code = textwrap.dedent(f"""
      import importlib.util, sys
      spec = importlib.util.spec_from_file_location("x", {os.path.join(ROOT, 'experiments', name + '.py')!r})
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      module.get_config()
      module.get_config("runlocal")
      heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "flax", "optax", "orbax"))
      print(heavy[:5])
  """)
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.strip() == "[]", r.stdout
