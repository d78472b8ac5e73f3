"""Generated Feast config and the declarative repository, without any server."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from recsys_core import features as F
from recsys_core.settings import load_settings
from recsys_pipelines import feature_store
from recsys_pipelines.errors import FeatureRepoError


def _settings(tmp_path: Path, profile: str, **feast: object) -> object:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data"),
                                      "feast": {"repo_path": str(tmp_path / "repo"), **feast},
                                      "privacy": {"key": "unit-test-pseudonym-key"}}))
    return load_settings(profile, config)


@pytest.mark.parametrize(("url", "expected"), [
    ("redis://127.0.0.1:6379/0", "127.0.0.1:6379,db=0"),
    ("redis://:secret@redis:6380/2", "redis:6380,db=2,password=secret"),
    ("redis://localhost", "localhost:6379,db=0"),
])
def test_redis_urls_become_feast_connection_strings(url: str, expected: str) -> None:
    assert feature_store.redis_connection_string(url) == expected


def test_local_profile_gets_a_file_registry_and_the_configured_online_store(
    tmp_path: Path,
) -> None:
    s = _settings(tmp_path, "local", online_store="sqlite")
    path = feature_store.write_feature_store_yaml(s)  # type: ignore[arg-type]
    config = yaml.safe_load(path.read_text())
    assert path == tmp_path / "repo" / "feature_store.yaml"
    assert config["registry"]["registry_type"] == "file"
    assert config["registry"]["path"] == str(tmp_path / "data" / "feast" / "registry.db")
    assert config["online_store"] == {"type": "sqlite",
                                      "path": str(tmp_path / "data" / "feast" / "online.db")}
    assert config["offline_store"] == {"type": "file"} and config["project"] == "recsys"


def test_services_profile_gets_the_sql_registry_and_redis(tmp_path: Path) -> None:
    s = _settings(tmp_path, "services")
    config = feature_store.feature_store_config(s)  # type: ignore[arg-type]
    assert config["registry"]["registry_type"] == "sql"
    assert config["registry"]["path"].startswith("postgresql+psycopg://")
    assert config["online_store"] == {"type": "redis", "connection_string": "127.0.0.1:6379,db=0"}


def test_the_repository_defines_every_view_and_service_from_the_shared_definitions(
    repo_root: Path,
) -> None:
    objects = feature_store.load_definitions(repo_root / "feature_repo")
    views = {o.name: o for o in objects if type(o).__name__ == "FeatureView"}
    assert set(views) == {"user_batch", "item_batch", "user_history", "item_metadata",
                          "user_stream", "item_trending"}
    for group in (*F.BATCH_GROUPS, *F.STREAM_GROUPS):
        assert [f.name for f in views[group.name].features][: len(group.feature_names)] \
            == group.feature_names
        assert views[group.name].ttl == group.ttl
    assert F.USER_RECENT_ITEMS in {f.name for f in views["user_stream"].features}
    services = {o.name: o for o in objects if type(o).__name__ == "FeatureService"}
    for name, wanted in F.FEATURE_SERVICES.items():
        assert [p.name for p in services[name].feature_view_projections] == list(wanted)
    types = {f.name: str(f.dtype) for f in views["user_batch"].features}
    assert types["user_clicks_7d"] == "Int64" and types["user_ctr_7d"] == "Float64"


def test_a_repository_without_definitions_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FeatureRepoError, match="no \\*.py definitions"):
        feature_store.load_definitions(tmp_path)
