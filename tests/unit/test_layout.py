"""The source roots are installed packages, nothing shadows the standard library, and the floors
the folders show are the floors the imports make.

A package's floor is derived from its imports (0 when it imports no other project package, else
one above the highest floor it imports); the derived floors must be the ones the folders declare
(`FLOORS`), so an import pointing up (or sideways between the two stage packages) fails.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import sysconfig
from collections.abc import Iterable
from pathlib import Path

import pytest

# package -> source root. Each source root holds exactly one installed package.
PACKAGES = {
    "recsys_core": "core",
    "recsys_pipelines": "pipelines",
    "recsys_models": "models",
    "recsys_platform": "platform",
}
# The floors the folders declare, bottom to top (docs/architecture.md).
FLOORS = {"recsys_core": 0, "recsys_pipelines": 1, "recsys_models": 1, "recsys_platform": 2}
# Declarative code outside the packages and the floor it may stand on.
OUTSIDE = {"feature_repo": 0}


def test_stdlib_platform_is_not_shadowed(repo_root: Path) -> None:
    code = "import platform, uuid; platform.system(); uuid.uuid4(); import recsys_platform, " \
           "recsys_core, recsys_pipelines, recsys_models; print(platform.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True,
                         text=True, check=True)
    stdlib = sysconfig.get_paths()["stdlib"]
    assert Path(out.stdout.strip()).resolve().is_relative_to(Path(stdlib).resolve())


@pytest.mark.parametrize("root", sorted(set(PACKAGES.values())))
def test_source_roots_are_not_packages(repo_root: Path, root: str) -> None:
    assert not (repo_root / root / "__init__.py").exists()
    assert sorted(p.name for p in (repo_root / root).iterdir()
                  if (p / "__init__.py").is_file()) == [k for k, v in PACKAGES.items() if v == root]


def module_name(root: Path, path: Path) -> str:
    """``recsys_core.settings`` for ``<root>/core/recsys_core/settings.py``."""
    for package, folder in PACKAGES.items():
        base = root / folder
        if path.is_relative_to(base / package):
            parts = [p for p in path.relative_to(base).with_suffix("").parts if p != "__init__"]
            return ".".join(parts)
    raise AssertionError(path)


def project_imports(source: str) -> set[str]:
    """Project modules a file imports, module level and inside functions alike."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in PACKAGES:  # `from recsys_core import features`
                names.update(f"{node.module}.{a.name}" for a in node.names)
            else:
                names.add(node.module)
    return {n for n in names if n.split(".")[0] in PACKAGES}


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> project modules it imports, for every module of every package under ``root``."""
    graph: dict[str, set[str]] = {}
    for package, folder in PACKAGES.items():
        for path in sorted((root / folder / package).rglob("*.py")):
            graph[module_name(root, path)] = project_imports(path.read_text())
    return graph


def package_edges(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Package -> the other project packages its modules import."""
    edges: dict[str, set[str]] = {p: set() for p in PACKAGES}
    for module, deps in graph.items():
        source = module.split(".")[0]
        edges[source].update(d.split(".")[0] for d in deps if d.split(".")[0] != source)
    return edges


def derive_floors(edges: dict[str, set[str]]) -> dict[str, int]:
    """Each package's floor from its imports; raises ``ValueError`` on a cycle of packages."""
    floors: dict[str, int] = {}

    def visit(package: str, path: tuple[str, ...]) -> int:
        if package in path:
            raise ValueError("packages import each other: " + " -> ".join((*path, package)))
        if package not in floors:
            floors[package] = max((visit(d, (*path, package)) + 1 for d in edges[package]),
                                  default=0)
        return floors[package]

    for package in edges:
        visit(package, ())
    return floors


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(module, import) pairs whose import is not on a lower floor of the declared ``FLOORS``
    (imports within one package are the package's own business)."""
    def floor(module: str) -> int:
        return FLOORS[module.split(".")[0]]

    return sorted((m, d) for m, deps in graph.items() for d in deps
                  if m.split(".")[0] != d.split(".")[0] and floor(d) >= floor(m))


def module_cycles(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a, deps in graph.items() for b in deps
                  if a < b and a in graph.get(b, set()))


def floor_violations(root: Path) -> list[str]:
    """Every reason the tree under ``root`` breaks the floors (empty when it keeps them)."""
    graph = import_graph(root)
    reasons = [f"{m} imports {d}, which is not on a lower floor" for m, d in upward_imports(graph)]
    reasons += [f"{a} and {b} import each other" for a, b in module_cycles(graph)]
    try:
        derived = derive_floors(package_edges(graph))
    except ValueError as exc:
        return [*reasons, str(exc)]
    reasons += [f"{p} is on floor {f} by its imports but its folder says {FLOORS[p]}"
                for p, f in derived.items() if f != FLOORS[p] and not reasons]
    return reasons


def outside_violations(root: Path) -> list[str]:
    """Files of the declarative folders (``OUTSIDE``) that import above their floor."""
    reasons = []
    for folder, top in OUTSIDE.items():
        for path in sorted((root / folder).glob("*.py")):
            reasons += [f"{folder}/{path.name} imports {d}" for d in
                        project_imports(path.read_text()) if FLOORS[d.split(".")[0]] > top]
    return reasons


def test_the_floors_the_imports_make_are_the_ones_the_folders_show(repo_root: Path) -> None:
    assert floor_violations(repo_root) == []
    assert derive_floors(package_edges(import_graph(repo_root))) == FLOORS
    assert outside_violations(repo_root) == []


def _tree(root: Path, files: Iterable[tuple[str, str]]) -> Path:
    for package, folder in PACKAGES.items():
        (root / folder / package).mkdir(parents=True)
        (root / folder / package / "__init__.py").write_text("")
    for rel, text in files:
        (root / rel).write_text(text)
    return root


GOOD = [("core/recsys_core/settings.py", "import os\n"),
        ("pipelines/recsys_pipelines/etl.py", "from recsys_core import settings\n"),
        ("models/recsys_models/train.py", "from recsys_core.settings import X\n"),
        ("platform/recsys_platform/cli.py",
         "import recsys_pipelines.etl\nfrom recsys_models import train\n")]


def test_the_floor_check_passes_a_tree_that_keeps_its_floors(tmp_path: Path) -> None:
    root = _tree(tmp_path, GOOD)
    assert floor_violations(root) == []
    assert derive_floors(package_edges(import_graph(root))) == FLOORS


@pytest.mark.parametrize(("rel", "text", "expected"), [
    # the ground importing the application, inside a function (a local import counts too)
    ("core/recsys_core/settings.py", "def f():\n    from recsys_platform import cli\n",
     "recsys_core.settings imports recsys_platform.cli"),
    # a stage importing the application
    ("pipelines/recsys_pipelines/etl.py", "import recsys_platform.serving.app\n",
     "recsys_pipelines.etl imports recsys_platform.serving.app"),
    # the two stage packages importing each other sideways
    ("models/recsys_models/train.py", "from recsys_pipelines.etl import read\n",
     "recsys_models.train imports recsys_pipelines.etl"),
])
def test_the_floor_check_fails_on_an_upward_import(tmp_path: Path, rel: str, text: str,
                                                   expected: str) -> None:
    root = _tree(tmp_path, [*GOOD, (rel, text)])
    reasons = floor_violations(root)
    assert reasons and reasons[0].startswith(expected), reasons


def test_the_floor_derivation_names_a_package_cycle() -> None:
    edges = {"recsys_core": {"recsys_models"}, "recsys_models": {"recsys_core"},
             "recsys_pipelines": set(), "recsys_platform": set()}
    with pytest.raises(ValueError, match="recsys_core -> recsys_models -> recsys_core"):
        derive_floors(edges)


def test_two_modules_importing_each_other_fail(tmp_path: Path) -> None:
    root = _tree(tmp_path, [*GOOD, ("core/recsys_core/a.py", "from recsys_core import b\n"),
                            ("core/recsys_core/b.py", "import recsys_core.a\n")])
    assert floor_violations(root) == ["recsys_core.a and recsys_core.b import each other"]
