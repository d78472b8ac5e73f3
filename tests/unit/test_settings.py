"""Settings: every profile loads; bad values fail with one line naming the key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from recsys_core.errors import SettingsError
from recsys_core.settings import PROFILES, load_settings

TEST_KEY = "unit-test-pseudonym-key"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("RECSYS_") or k == "REDIS_URL"]:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RECSYS_PRIVACY__KEY", TEST_KEY)  # services/k8s refuse the default


@pytest.mark.parametrize("profile", PROFILES)
def test_each_profile_loads(profile: str) -> None:
    s = load_settings(profile)
    assert s.profile == profile
    assert s.feast.retrieval_service == "retrieval_v1"


def test_profiles_differ_where_they_should() -> None:
    local, services, k8s = (load_settings(p) for p in PROFILES)
    assert local.mlflow_tracking_uri.startswith("sqlite:///")
    assert services.mlflow.tracking_uri.startswith("http://127.0.0.1")
    assert services.feast.registry == "sql" and local.feast.registry == "file"
    assert k8s.flink.source == "kafka" and "recsys-redis" in k8s.redis.url


def test_env_overrides_yaml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_FLINK__SOURCE", "kafka")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6390/3")
    s = load_settings("local")
    assert s.flink.source == "kafka"
    assert s.redis.url == "redis://127.0.0.1:6390/3"


def test_config_file_overrides_profile(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("serving:\n  candidates: 300\n")
    assert load_settings("local", cfg).serving.candidates == 300


def test_invalid_enum_names_key_and_allowed_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_FLINK__SOURCE", "kafak")
    with pytest.raises(SettingsError) as err:
        load_settings("local")
    message = str(err.value)
    assert "flink.source" in message and "'file'" in message and "'kafka'" in message
    assert "\n" not in message


def test_unknown_key_is_an_error(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("serving:\n  replicas: 3\n")
    with pytest.raises(SettingsError, match=r"unknown setting 'serving.replicas'"):
        load_settings("local", cfg)


def test_unknown_profile() -> None:
    with pytest.raises(SettingsError, match="allowed values: 'local', 'services', 'k8s'"):
        load_settings("prod")


def test_cli_reports_bad_value_in_one_line(repo_root: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("serving:\n  port: 99999\n")
    out = subprocess.run(
        [sys.executable, "-m", "recsys_platform.cli", "--config", str(cfg), "config", "show"],
        cwd=repo_root, capture_output=True, text=True,
    )
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "serving.port" in lines[0], out.stderr


def test_a_command_config_wins_and_is_passed_on(tmp_path: Path) -> None:
    """`recsys --config A serve up` and `recsys serve up --config A` load A for the command
    and hand A to the replicas (the command's own file wins over the top-level one)."""
    from recsys_platform.commands.context import set_settings, settings_with

    top, own = tmp_path / "top.yaml", tmp_path / "own.yaml"
    top.write_text(f"data_dir: {tmp_path / 'top'}\n")
    own.write_text(f"data_dir: {tmp_path / 'own'}\n")
    set_settings(load_settings("local", top), top)
    settings, passed = settings_with(None)
    assert passed == top and settings.data_dir == tmp_path / "top"
    settings, passed = settings_with(own)
    assert passed == own and settings.data_dir == tmp_path / "own"
    assert settings.profile == "local"
    set_settings(load_settings("local"))
    assert settings_with(None)[1] is None


@pytest.mark.parametrize("name, value, fragment", [
    ("RECSYS_SERVNG__PORT", "1", "RECSYS_SERVNG__PORT (did you mean RECSYS_SERVING__PORT?)"),
    ("RECSYS_REDIS_URL", "redis://127.0.0.1:6390/0",
     "RECSYS_REDIS_URL (did you mean RECSYS_REDIS__URL?)"),
    ("RECSYS_SERVING__REPLICAS", "3", "RECSYS_SERVING__REPLICAS"),
    ("recsys_serving__portt", "1", "recsys_serving__portt"),
])
def test_unknown_environment_variable_fails_in_one_line(
        monkeypatch: pytest.MonkeyPatch, name: str, value: str, fragment: str) -> None:
    """Before: RECSYS_SERVNG__PORT=1 and RECSYS_REDIS_URL=... were silently ignored."""
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as err:
        load_settings("local")
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_known_and_non_setting_variables_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_SERVING__PORT", "8123")
    monkeypatch.setenv("RECSYS_DATA_DIR", "/tmp/recsys-data")
    monkeypatch.setenv("RECSYS_TEST_DIRECT_INGRESS", "0")
    monkeypatch.setenv("RECSYS_MLFLOW_DB_URI", "postgresql+psycopg://postgres@127.0.0.1/db")
    s = load_settings("local")
    assert s.serving.port == 8123 and str(s.data_dir) == "/tmp/recsys-data"


@pytest.mark.parametrize("name, value, key", [
    ("RECSYS_REDIS__URL", "notaurl", "redis.url"),
    ("RECSYS_REDIS__URL", "http://127.0.0.1:6379/0", "redis.url"),
    ("RECSYS_REDIS__URL", "redis://127.0.0.1:port/0", "redis.url"),
    ("RECSYS_MLFLOW__TRACKING_URI", "htp//mlflow:5000", "mlflow.tracking_uri"),
    ("RECSYS_MLFLOW__TRACKING_URI", "http://", "mlflow.tracking_uri"),
    ("RECSYS_PREFECT__API_URL", "prefect:4200/api", "prefect.api_url"),
    ("RECSYS_MONITORING__SERVING_METRICS_URL", "127.0.0.1:8000/metrics",
     "monitoring.serving_metrics_url"),
    ("RECSYS_RAY__ADDRESS", "ray-head", "ray.address"),
    ("RECSYS_FEAST__REGISTRY_PATH", "postgres-ql://x", "feast.registry_path"),
])
def test_malformed_url_fails_in_one_line(monkeypatch: pytest.MonkeyPatch, name: str,
                                         value: str, key: str) -> None:
    """Before: RECSYS_REDIS__URL=notaurl was accepted (and failed later, far away)."""
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as err:
        load_settings("local")
    assert f"invalid setting {key!r}" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name, value", [
    ("RECSYS_REDIS__URL", "rediss://:pw@redis.example:6380/2"),
    ("RECSYS_REDIS__URL", "unix:///var/run/redis.sock"),
    ("RECSYS_MLFLOW__TRACKING_URI", "file:///tmp/mlruns"),
    ("RECSYS_MLFLOW__TRACKING_URI", "mlruns"),
    ("RECSYS_RAY__ADDRESS", "ray://ray-head:10001"),
    ("RECSYS_RAY__ADDRESS", "10.0.0.5:6379"),
    ("RECSYS_RAY__ADDRESS", "auto"),
])
def test_real_urls_are_accepted(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    load_settings("local")


@pytest.mark.parametrize("profile", ["services", "k8s"])
def test_production_profiles_refuse_the_development_key(
        monkeypatch: pytest.MonkeyPatch, profile: str) -> None:
    """Before: k8s pseudonymized with 'local-development-key' when the variable was missing."""
    monkeypatch.delenv("RECSYS_PRIVACY__KEY")
    with pytest.raises(SettingsError, match="RECSYS_PRIVACY__KEY") as err:
        load_settings(profile)
    assert "\n" not in str(err.value)
    monkeypatch.setenv("RECSYS_PRIVACY__KEY", "local-development-key")
    with pytest.raises(SettingsError, match="privacy.key"):
        load_settings(profile)
    assert load_settings(profile, secrets=False).privacy.key == "local-development-key"
    monkeypatch.setenv("RECSYS_PRIVACY__KEY", TEST_KEY)
    assert load_settings(profile).privacy.key == TEST_KEY
    monkeypatch.delenv("RECSYS_PRIVACY__KEY")
    assert load_settings("local").privacy.key == "local-development-key"  # local: allowed


def test_config_show_redacts_secrets(repo_root: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("redis:\n  url: redis://:hunter2@127.0.0.1:6379/0\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")}
    out = subprocess.run(
        [sys.executable, "-m", "recsys_platform.cli", "--profile", "services", "--config",
         str(cfg), "config", "show", "--no-check-online"],
        cwd=repo_root, capture_output=True, text=True,
        env={**env, "RECSYS_PRIVACY__KEY": TEST_KEY})
    assert out.returncode == 0, out.stderr
    assert TEST_KEY not in out.stdout and "hunter2" not in out.stdout
    assert "key: '***'" in out.stdout and "redis://:***@127.0.0.1:6379/0" in out.stdout
