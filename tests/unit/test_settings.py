"""Settings: every profile loads; bad values fail with one line naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from recsys_platform.errors import SettingsError
from recsys_platform.settings import PROFILES, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RECSYS_PROFILE", "REDIS_URL", "RECSYS_REDIS__URL", "RECSYS_FLINK__SOURCE"):
        monkeypatch.delenv(key, raising=False)


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
