"""The chart's ConfigMap is the rendering of the k8s settings profile, and reads back as it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from recsys_core.settings import load_settings
from recsys_platform.commands.deploy import app
from recsys_platform.k8s import (
    CHART_CONFIG_FILE,
    configmap_data,
    render_configmap_file,
    secret_env_names,
)
from tests.conftest import REPO_ROOT
from tests.deploy.conftest import VALUES_FILES, Manifest, one


@pytest.fixture()
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("RECSYS_") or k == "REDIS_URL"]:
        monkeypatch.delenv(key)


@pytest.mark.parametrize("name", sorted(VALUES_FILES))
def test_chart_configmap_equals_the_k8s_rendering(rendered: dict[str, list[Manifest]],
                                                  clean_env: None, name: str) -> None:
    configmap = one(rendered[name], "ConfigMap", "recsys-config")
    assert configmap["data"] == configmap_data(load_settings("k8s", secrets=False))


def test_committed_rendering_is_fresh(clean_env: None) -> None:
    committed = (REPO_ROOT / CHART_CONFIG_FILE).read_text()
    assert committed == render_configmap_file(load_settings("k8s", secrets=False)), (
        "run `recsys deploy render-config` and commit helm/recsys/files/recsys-config.yaml")


def test_configmap_environment_loads_back_as_the_k8s_settings(
        clean_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_PRIVACY__KEY", "a-key-from-the-secret")  # as the chart does
    expected = load_settings("k8s")
    data = configmap_data(expected)
    assert data["RECSYS_REDIS__URL"] == "redis://recsys-redis:6379/0"
    assert data["RECSYS_FEAST__RETRIEVAL_SERVICE"] == expected.feast.retrieval_service
    for key, value in data.items():
        monkeypatch.setenv(key, value)
    assert load_settings() == expected  # the pod's view: RECSYS_PROFILE comes from the map


def test_configmap_environment_wins_over_the_profile(
        clean_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    data = configmap_data(load_settings("k8s", secrets=False))
    data["RECSYS_SERVING__CANDIDATES"] = "123"
    data["RECSYS_PRIVACY__KEY"] = "a-key-from-the-secret"
    for key, value in data.items():
        monkeypatch.setenv(key, value)
    assert load_settings().serving.candidates == 123


def test_render_config_command_writes_and_checks(tmp_path: Path, clean_env: None) -> None:
    out = tmp_path / "config.yaml"
    runner = CliRunner()
    stale = runner.invoke(app, ["render-config", "--out", str(out), "--check"])
    assert stale.exit_code == 1
    written = runner.invoke(app, ["render-config", "--out", str(out)])
    assert written.exit_code == 0, written.output
    assert out.read_text() == render_configmap_file(load_settings("k8s", secrets=False))
    fresh = runner.invoke(app, ["render-config", "--out", str(out), "--check"])
    assert fresh.exit_code == 0, fresh.output
    override = tmp_path / "override.yaml"
    override.write_text("redis:\n  url: redis://redis.external:6380/1\n")
    runner.invoke(app, ["render-config", "--out", str(out), "--config", str(override)])
    assert "RECSYS_REDIS__URL: redis://redis.external:6380/1" in out.read_text()


def test_credentials_come_from_the_secret_not_the_configmap(
        rendered: dict[str, list[Manifest]], clean_env: None) -> None:
    secret_env = secret_env_names(load_settings("k8s", secrets=False))
    assert secret_env == ["RECSYS_PRIVACY__KEY"]
    for objects in rendered.values():
        assert not set(secret_env) & set(one(objects, "ConfigMap", "recsys-config")["data"])
        flink = one(objects, "FlinkDeployment")["spec"]["podTemplate"]["spec"]["containers"][0]
        ray = one(objects, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]
        for container in (flink, ray["template"]["spec"]["containers"][0]):
            env = {e["name"]: e for e in container["env"]}
            for name in secret_env:
                assert env[name]["valueFrom"]["secretKeyRef"]["key"] == name


def test_chart_lists_exactly_the_secret_settings(clean_env: None) -> None:
    values = yaml.safe_load((REPO_ROOT / "helm/recsys/values.yaml").read_text())
    assert values["platformSecret"]["env"] == secret_env_names(load_settings("k8s", secrets=False))
