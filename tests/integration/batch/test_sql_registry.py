"""The ``services`` profile's Feast SQL registry on the real PostgreSQL (127.0.0.1:5432)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from recsys_core import features as F
from recsys_core.settings import load_settings
from recsys_pipelines import feature_store
from tests.fixtures.feast_store import make_repo

pytestmark = pytest.mark.integration
ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture()
def database() -> Iterator[str]:
    import psycopg

    name = f"recsys_feast_test_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield name
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_services_profile_applies_to_the_sql_registry(
    database: str, tmp_path: Path, repo_root: Path
) -> None:
    repo = make_repo(repo_root, tmp_path / "feature_repo")
    config = tmp_path / "settings.yaml"
    config.write_text(yaml.safe_dump({
        "data_dir": str(tmp_path / "data"),
        "feast": {"repo_path": str(repo), "online_store": "sqlite", "project": "recsys_sql",
                  "registry_path": f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}"},
        "privacy": {"key": "sql-registry-test-key"},
    }))
    settings = load_settings("services", config)
    feature_store.apply_definitions(settings)
    written = yaml.safe_load((repo / "feature_store.yaml").read_text())
    assert written["registry"]["registry_type"] == "sql"
    fresh = feature_store.load_store(settings)  # a new client reads the registry back
    assert {v.name for v in fresh.list_feature_views()} == {
        "user_batch", "item_batch", "user_history", "item_metadata", "user_stream",
        "item_trending"}
    assert {s.name for s in fresh.list_feature_services()} == set(F.FEATURE_SERVICES)
