"""Declared, licensed, laid out: every third-party package the code imports is in setup.py."""
import ast
import functools
import importlib.metadata
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = {"attrib_jax", "launch", "configs", "__future__"}


def _imports(folders):
  names = set()
  for folder in folders:
    for directory, _, files in os.walk(os.path.join(ROOT, folder)):
      for name in files:
        if name.endswith(".py"):
          tree = ast.parse(open(os.path.join(directory, name)).read())
          for node in ast.walk(tree):
            if isinstance(node, ast.Import):
              names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
              names.add(node.module.split(".")[0])
  return {n for n in names if n not in OURS and n not in sys.stdlib_module_names}


def _requirements(key):
  """Distribution names in setup.py's install_requires (key None) or extras_require[key]."""
  tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
  call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call)
              and getattr(n.func, "attr", "") == "setup")
  kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords
            if k.arg in ("install_requires", "extras_require")}
  specs = kwargs["install_requires"] if key is None else kwargs["extras_require"][key]
  return {re.split(r"[<>=!~\[; ]", s)[0].lower().replace("_", "-") for s in specs}


@functools.cache
def _module_to_distributions():
  return importlib.metadata.packages_distributions()   # reads every installed distribution


def _distributions(module):
  found = _module_to_distributions().get(module, [])
  return {d.lower().replace("_", "-") for d in found}


def test_every_runtime_import_is_declared():
  declared = _requirements(None)
  missing = {m: _distributions(m) for m in _imports(["attrib_jax", "launch", "configs"])
             if not _distributions(m) & declared}
  assert not missing, f"imported but not in install_requires: {missing}"


def test_every_test_import_is_declared():
  declared = _requirements(None) | _requirements("test")
  local = {os.path.splitext(n)[0] for n in os.listdir(os.path.join(ROOT, "tests"))}
  local |= {os.path.splitext(n)[0] for n in os.listdir(os.path.join(ROOT, "benchmarks"))}
  missing = {m: _distributions(m) for m in _imports(["tests", "benchmarks"]) - local
             if not _distributions(m) & declared}
  assert not missing, f"imported by tests/benchmarks but not declared: {missing}"


def test_license_and_layout():
  assert "Apache License" in open(os.path.join(ROOT, "LICENSE")).read()
  for entry in ("setup.py", "attrib_jax", "launch", "configs", "tests", "third_party", "docs"):
    assert os.path.exists(os.path.join(ROOT, entry)), entry
  assert os.listdir(os.path.join(ROOT, "third_party")), "third_party/ says what it holds"
