"""Packaging: lazy `import jsparse`, core dependencies, the public names."""

import ast
import pathlib
import re
import subprocess
import sys
import tomllib

from absl.testing import absltest

import jsparse

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Import name -> distribution name, where they differ.
_DISTRIBUTIONS = {"PIL": "pillow", "sklearn": "scikit-learn",
                  "ml_collections": "ml-collections"}
# Modules that are an extra's (jsparse.viz needs the viz extra).
_EXTRA_MODULES = {"jsparse/viz.py"}


def _imports(path: pathlib.Path, module_level: bool) -> set[str]:
  """Third-party distributions imported by a file (at module level only)."""
  tree = ast.parse(path.read_text())
  nodes = tree.body if module_level else ast.walk(tree)
  names = set()
  for node in nodes:
    if isinstance(node, ast.Import):
      names.update(alias.name.split(".")[0] for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      names.add(node.module.split(".")[0])
  return {_DISTRIBUTIONS.get(name, name) for name in names
          if name not in sys.stdlib_module_names
          and name not in ("jsparse", "pallas_kernels")}


def _library_imports(module_level: bool) -> set[str]:
  names = set()
  for package in ("jsparse", "pallas_kernels"):
    for path in (ROOT / package).rglob("*.py"):
      if not (module_level
              and str(path.relative_to(ROOT)) in _EXTRA_MODULES):
        names |= _imports(path, module_level)
  return names


def _dependencies(extra: str | None = None) -> set[str]:
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  deps = (project["dependencies"] if extra is None
          else project["optional-dependencies"][extra])
  return {re.split(r"[<>=\[ ;]", dep)[0] for dep in deps}


class PackageTest(absltest.TestCase):

  def test_core_dependencies_are_what_the_library_imports(self):
    core = _dependencies()
    # Importing any module needs the core only (viz aside)...
    self.assertContainsSubset(_library_imports(module_level=True), core)
    # ... and function-level imports need the core or the models/viz extras.
    used = _library_imports(module_level=False)
    self.assertContainsSubset(core, used)
    self.assertContainsSubset(
        used - core, _dependencies("models") | _dependencies("viz"))

  def test_import_is_lazy(self):
    heavy = ("jsparse.methods", "jsparse.attention", "scipy", "optax",
             "matplotlib")
    code = ("import sys, jsparse; print([m for m in %r if m in sys.modules])"
            % (heavy,))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    self.assertEqual(out.strip(), "[]")

  def test_public_names_resolve(self):
    for name in jsparse.__all__:
      self.assertIsNotNone(getattr(jsparse, name), name)
    self.assertContainsSubset(jsparse.__all__, dir(jsparse))
    with self.assertRaises(AttributeError):
      jsparse.no_such_name  # pylint: disable=pointless-statement

  def test_typed_marker_ships(self):
    self.assertTrue((ROOT / "jsparse" / "py.typed").is_file())
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())[
        "tool"]["setuptools"]["package-data"]
    self.assertIn("py.typed", package_data["jsparse"])


if __name__ == "__main__":
  absltest.main()
