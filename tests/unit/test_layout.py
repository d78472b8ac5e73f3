"""The source roots are installed packages and nothing shadows the standard library."""

from __future__ import annotations

import ast
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

PACKAGES = {
    "recsys_core": "core",
    "recsys_platform": "platform",
    "recsys_pipelines": "pipelines",
    "recsys_models": "models",
}
# Floors, bottom to top. A module may import its own floor or lower ones only.
FLOOR_0 = {"recsys_core"}


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


def _module_name(repo_root: Path, path: Path) -> str:
    for package, root in PACKAGES.items():
        base = repo_root / root
        if path.is_relative_to(base / package):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            return ".".join(parts)
    raise AssertionError(path)


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in PACKAGES:  # `from recsys_core import features`
                names.update(f"{node.module}.{a.name}" for a in node.names)
            else:
                names.add(node.module)
    return {n for n in names if n.split(".")[0] in PACKAGES}


def _floor(module: str) -> int:
    if any(module == m or module.startswith(m + ".") for m in FLOOR_0):
        return 0
    if module.startswith(("recsys_models", "recsys_pipelines")):
        return 1
    return 2  # serving and the CLI


def test_imports_only_point_down(repo_root: Path) -> None:
    graph: dict[str, set[str]] = {}
    for package, root in PACKAGES.items():
        for path in (repo_root / root / package).rglob("*.py"):
            graph[_module_name(repo_root, path)] = _imports(path)
    upward = [(m, i) for m, deps in graph.items() for i in deps if _floor(i) > _floor(m)]
    assert not upward, f"imports pointing up a floor: {upward}"
    cycles = [(a, b) for a, deps in graph.items() for b in deps
              if a != b and a in graph.get(b, set())]
    assert not cycles, f"modules importing each other: {cycles}"
