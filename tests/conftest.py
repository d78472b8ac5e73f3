"""Session-wide fixtures shared by every test folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Session fixtures live in tests/fixtures/, one module per real component.
pytest_plugins = [
    "tests.fixtures.ray_cluster",
    "tests.fixtures.prefect_harness",
    "tests.fixtures.feast_store",
    "tests.fixtures.batch_pipeline",
    "tests.fixtures.mlflow_store",
    "tests.fixtures.flink",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("RECSYS_SHARED_DIR", REPO_ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def movielens_dir() -> Path:
    path = SHARED_DIR / "datasets" / "ml-latest-small"
    assert (path / "ratings.csv").is_file(), f"MovieLens not found at {path}"
    return path
