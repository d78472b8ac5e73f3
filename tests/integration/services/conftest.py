"""Runs infra/services/services.sh on free loopback ports for this folder's tests."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tests.conftest import REPO_ROOT
from tests.fixtures.net import free_port

SCRIPT = REPO_ROOT / "infra" / "services" / "services.sh"
POSTGRES = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"


@dataclass(frozen=True)
class Services:
    """A running `services` profile: the environment that points settings at it."""

    env: dict[str, str]
    data_dir: Path
    database: str

    def run(self, command: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(SCRIPT), command], cwd=REPO_ROOT, env={**os.environ,
                              **self.env}, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    database = f"recsys_mlflow_test_{uuid.uuid4().hex[:8]}"
    data_dir = tmp_path_factory.mktemp("services-data")
    env = {
        "RECSYS_DATA_DIR": str(data_dir),
        "RECSYS_MLFLOW__TRACKING_URI": f"http://127.0.0.1:{free_port()}",
        "RECSYS_PREFECT__API_URL": f"http://127.0.0.1:{free_port()}/api",
        "RECSYS_MLFLOW_DB_URI": f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}",
        "RECSYS_PRIVACY__KEY": "services-test-pseudonym-key",  # the profile refuses the default
        "PYTHON": str(REPO_ROOT / ".venv" / "bin" / "python"),
    }
    running = Services(env=env, data_dir=data_dir, database=database)
    started = running.run("start")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield running
    finally:
        running.run("stop", timeout=60)
        with psycopg.connect(POSTGRES, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(database)))
