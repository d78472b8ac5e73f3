"""The container build files and the compose file: pinned bases, the project's constraints,
and the same addresses as the settings profiles (no Docker engine here, so read, not built)."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from recsys_core.settings import load_settings
from tests.conftest import REPO_ROOT
from tests.deploy.conftest import Manifest, one

DOCKER_DIR = REPO_ROOT / "infra" / "docker"
DOCKERFILES = sorted(DOCKER_DIR.glob("*.Dockerfile"))
PINNED = re.compile(r"^[\w.\-/]+:(?!latest$)[\w][\w.\-]*(@sha256:[a-f0-9]{64})?$")


def _args(text: str) -> dict[str, str]:
    found = re.findall(r'^ARG (\w+)=("[^"]*"|\S+)$', text, flags=re.M)
    return {name: value.strip('"') for name, value in found}


def test_every_chart_image_has_a_build_file() -> None:
    names = {p.name.removesuffix(".Dockerfile") for p in DOCKERFILES}
    assert {"platform", "flink", "mlflow", "prefect-worker"} <= names


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_bases_are_pinned_and_installs_use_constraints(path: Path) -> None:
    text = path.read_text()
    args = _args(text)
    bases = re.findall(r"^FROM (\S+)", text, flags=re.M)
    assert bases
    for base in bases:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
        assert PINNED.match(image), f"{path.name}: base image {image!r} is not pinned"
    installs = re.findall(r"pip install ([^\n\\]*)", text)
    assert installs, f"{path.name} installs nothing"
    for install in installs:
        assert "constraints.txt" in install or "--no-deps" in install, (
            f"{path.name}: `pip install {install}` bypasses constraints.txt")
    users = re.findall(r"^USER (\S+)", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"{path.name} runs as root"


def test_flink_image_carries_the_jar_the_chart_runs(rendered: dict[str, list[Manifest]]) -> None:
    text = (DOCKER_DIR / "flink.Dockerfile").read_text()
    version = _args(text)["FLINK_VERSION"]
    jar = one(rendered["default"], "FlinkDeployment")["spec"]["job"]["jarURI"]
    assert jar == f"local:///opt/flink/opt/flink-python-{version}.jar"
    assert "flink-sql-connector-kafka" in text
    assert "apache-flink==" + version in _args(text)["STREAM_REQUIREMENTS"]


def test_compose_matches_the_services_profile() -> None:
    compose = yaml.safe_load((REPO_ROOT / "infra" / "compose.yaml").read_text())
    services = compose["services"]
    for service in services.values():
        assert PINNED.match(service["image"]), service["image"]
        if "build" in service:
            assert (REPO_ROOT / "infra" / service["build"]["context"]
                    / service["build"]["dockerfile"]).is_file()
    settings = load_settings("services", secrets=False)
    published = {name: {int(p.split(":")[-2]) for p in s.get("ports", [])}
                 for name, s in services.items()}
    assert urlparse(settings.mlflow_tracking_uri).port in published["mlflow"]
    assert urlparse(settings.prefect.api_url or "").port in published["prefect-server"]
    assert urlparse(settings.redis.url).port in published["redis"]
    assert urlparse(settings.feast.registry_path).port in published["postgresql"]
