"""`helm lint --strict` and `helm template` pass for every values file the chart ships."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deploy.conftest import KUBERNETES_VERSION, VALUES_FILES, Manifest, helm_run
from tests.deploy.helm import helm_version


def test_helm_is_real(helm: Path) -> None:
    assert helm_version(helm).startswith(("v3.", "v4."))


@pytest.mark.parametrize("name", sorted(VALUES_FILES))
def test_helm_lint_strict(helm: Path, name: str) -> None:
    args = ["lint", "--strict", ".", "--kube-version", f"{KUBERNETES_VERSION}.0"]
    for values in VALUES_FILES[name]:
        args += ["-f", values]
    done = helm_run(helm, *args)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout


@pytest.mark.parametrize("name", sorted(VALUES_FILES))
def test_template_renders_every_component(rendered: dict[str, list[Manifest]],
                                          name: str) -> None:
    kinds = {o["kind"] for o in rendered[name]}
    expected = {"ConfigMap", "RayService", "RayJob", "FlinkDeployment", "Deployment", "Service",
                "ServiceAccount", "Role", "RoleBinding", "NetworkPolicy"}
    assert expected <= kinds, f"missing kinds: {expected - kinds}"


def test_prod_runs_feast_and_persistent_redis(rendered: dict[str, list[Manifest]]) -> None:
    names = {(o["kind"], o["metadata"]["name"]) for o in rendered["prod"]}
    assert ("Deployment", "recsys-feast") in names
    assert ("PersistentVolumeClaim", "recsys-redis") in names
    assert ("Deployment", "recsys-feast") not in {
        (o["kind"], o["metadata"]["name"]) for o in rendered["dev"]}
