"""The package's shape as checked contracts: layering, no cycles, no private imports, sizes.

* import-linter (`[importlinter]` in setup.cfg): experiments > models > attention; inside
  attention, front doors > backends > shared modules; kernels never import a front door.
* No import cycle among the project's modules (lazy imports inside functions included).
* No module imports a private (`_name`) from another module, nor reads `module._name`.
* Modules at most 400 lines; functions at most 60 lines outside attention/kernels/.
* experiments/ keeps its commands on top: at most 8 modules directly in it, the library in
  subpackages whose `__init__` says what lives there; README.md is a front page (<= 300 lines).
Static (AST and import graph only): about a second.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("attention", "models", "experiments")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
MAX_EXPERIMENTS_MODULES = 8  # the commands, besides __init__.py
MAX_README_LINES = 300


def _modules() -> dict[str, pathlib.Path]:
  """Dotted name -> path of every module of the project's packages."""
  out = {}
  for package in PACKAGES:
    for path in sorted((ROOT / package).rglob("*.py")):
      parts = path.relative_to(ROOT).with_suffix("").parts
      out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def _type_checking_only(tree: ast.Module) -> set[int]:
  """ids of the nodes under `if TYPE_CHECKING:` (annotations only, never run)."""
  return {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
          and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
          for stmt in block.body for node in ast.walk(stmt)}


def _imports(name: str, tree: ast.Module, *, type_checking: bool = False):
  """`(imported module, imported name or None, bound alias, node)` for every run-time import
  (and those under `if TYPE_CHECKING:` too with `type_checking=True`)."""
  package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
  skip = set() if type_checking else _type_checking_only(tree)
  for node in ast.walk(tree):
    if id(node) in skip:
      continue
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name, None, alias.asname or alias.name, node
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] +
                        ([base] if base else []))
      for alias in node.names:
        yield base, alias.name, alias.asname or alias.name, node


def _project_target(module: str, imported: str | None) -> str | None:
  """The project module an import refers to (`from a import b` may name module a.b)."""
  if imported and f"{module}.{imported}" in MODULES:
    return f"{module}.{imported}"
  return module if module in MODULES else None


def test_import_linter_contracts():
  from importlinter import cli  # pylint: disable=g-import-not-at-top
  assert cli.lint_imports(config_filename=str(ROOT / "setup.cfg")) == 0, (
      "an import-linter contract is broken (run `lint-imports` for the details)")


def test_no_import_cycles():
  """No circle among the modules, counting lazy imports inside functions and the imports under
  `if TYPE_CHECKING:` (a circle hidden from the interpreter is still a circle to a reader)."""
  graph = {name: set() for name in MODULES}
  for name, tree in TREES.items():
    for module, imported, _, _ in _imports(name, tree, type_checking=True):
      target = _project_target(module, imported)
      # A package __init__ only re-exports its modules: edges into it are not followed.
      if target and target != name and MODULES[target].name != "__init__.py":
        graph[name].add(target)
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        pytest.fail("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
      elif nxt not in state:
        visit(nxt)
    stack.pop()
    state[node] = "done"

  for name in sorted(graph):
    if name not in state:
      visit(name)


def test_no_private_names_across_modules():
  bad = []
  for name, tree in TREES.items():
    module_aliases = set()
    for module, imported, alias, node in _imports(name, tree):
      target = _project_target(module, imported)
      if imported and imported.startswith("_") and module.split(".")[0] in PACKAGES:
        bad.append(f"{name}:{node.lineno} imports {module}.{imported}")
      if target and (imported is None or target == f"{module}.{imported}"):
        module_aliases.add(alias)  # a name bound to a project module
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id in module_aliases and node.attr.startswith("_")
          and not node.attr.startswith("__")):
        bad.append(f"{name}:{node.lineno} reads {node.value.id}.{node.attr}")
  assert not bad, "private names used across modules:\n" + "\n".join(bad)


def test_module_and_function_sizes():
  bad = []
  for name, path in MODULES.items():
    lines = len(path.read_text().splitlines())
    if lines > MAX_MODULE_LINES:
      bad.append(f"{name}: {lines} lines")
    if name.startswith(("experiments", "attention.kernels")):
      continue  # experiments: long command functions remain; kernels may be long
    for node in ast.walk(TREES[name]):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        length = node.end_lineno - node.lineno + 1
        if length > MAX_FUNCTION_LINES:
          bad.append(f"{name}.{node.name}: {length} lines")
  assert not bad, f"over {MAX_MODULE_LINES} lines per module / {MAX_FUNCTION_LINES} per function:\n" + (
      "\n".join(bad))


def test_jaxtyping_annotations_are_checked_in_tests():
  """tests/conftest.py's import hook: a shape that contradicts an annotation fails."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import attention  # pylint: disable=g-import-not-at-top
  q, k = jnp.zeros((1, 4, 2, 8)), jnp.zeros((1, 4, 2, 16))  # head_dim 8 vs 16: "H" differs
  with pytest.raises(TypeError, match="Type-check error"):
    attention.reference_attention(q, k, k)


def test_experiments_top_holds_only_commands():
  top = sorted(p.name for p in (ROOT / "experiments").glob("*.py") if p.name != "__init__.py")
  assert len(top) <= MAX_EXPERIMENTS_MODULES, f"experiments/ has {len(top)} modules: {top}"
  for path in (ROOT / "experiments").glob("*.py"):
    if path.name != "__init__.py":  # a command: runnable, with flags
      assert 'if __name__ == "__main__":' in path.read_text(), f"{path.name} is not a command"
  for package in sorted(p for p in (ROOT / "experiments").iterdir() if p.is_dir()
                        and (p / "__init__.py").exists()):
    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text()))
    assert doc and "import" in doc, f"{package.name}/__init__.py must say what may be imported"


def test_readme_is_a_front_page():
  lines = len((ROOT / "README.md").read_text().splitlines())
  assert lines <= MAX_README_LINES, f"README.md has {lines} lines (at most {MAX_README_LINES})"
