"""Fixtures of the offline chart tests: a real helm binary, rendered manifests, real CRDs."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO_ROOT, SHARED_DIR
from tests.deploy.crd import CrdSchema
from tests.deploy.helm import find_helm

CHART_DIR = REPO_ROOT / "helm" / "recsys"
# Every values file the chart ships: name -> extra `-f` files on top of values.yaml.
VALUES_FILES: dict[str, list[str]] = {
    "default": [],
    "dev": ["values-dev.yaml"],
    "prod": ["values-prod.yaml"],
}
KUBERNETES_VERSION = "1.33"  # the version built-in objects are validated against
CRD_FILES = ("ray.io_rayservices.yaml", "ray.io_rayjobs.yaml", "flinkdeployments.yml")
Manifest = dict[str, Any]


def helm_run(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Runs helm in the chart folder without raising; the caller checks the return code."""
    return subprocess.run([str(helm), *args], cwd=CHART_DIR, capture_output=True, text=True,
                          timeout=60)


def helm_template(helm: Path, values: list[str], *extra: str) -> list[Manifest]:
    """Renders the chart with ``helm template`` and returns its objects.

    Raises:
        AssertionError: helm failed; the message carries its stderr.
    """
    args = ["template", "recsys", ".", "--namespace", "recsys",
            "--kube-version", f"{KUBERNETES_VERSION}.0"]
    for name in values:
        args += ["-f", name]
    done = helm_run(helm, *args, *extra)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="session")
def helm() -> Path:
    return find_helm()


@pytest.fixture(scope="session")
def rendered(helm: Path) -> dict[str, list[Manifest]]:
    """Objects rendered from each values file, keyed like :data:`VALUES_FILES`."""
    return {name: helm_template(helm, files) for name, files in VALUES_FILES.items()}


@pytest.fixture(scope="session")
def crds() -> dict[str, CrdSchema]:
    """The operators' CRDs from ../shared/k8s-crds, keyed by kind."""
    folder = SHARED_DIR / "k8s-crds"
    missing = [name for name in CRD_FILES if not (folder / name).is_file()]
    assert not missing, f"CRDs {missing} not found in {folder} (set RECSYS_SHARED_DIR)"
    schemas = [CrdSchema.load(folder / name) for name in CRD_FILES]
    return {schema.kind: schema for schema in schemas}


def by_kind(objects: list[Manifest], kind: str) -> list[Manifest]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = [o for o in by_kind(objects, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]
