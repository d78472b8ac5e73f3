"""`infra/services/services.sh` starts the services profile, the platform runs on it, and it
stops cleanly: MLflow on PostgreSQL with a local artifact root, and a Prefect server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import psycopg
import pytest
from mlflow import MlflowClient

from recsys_core.settings import Settings, load_settings
from tests.conftest import REPO_ROOT
from tests.integration.services.conftest import Services

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _settings(services: Services, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key, value in services.env.items():
        monkeypatch.setenv(key, value)
    return load_settings("services")


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def test_status_reports_both_servers(services: Services) -> None:
    status = services.run("status", timeout=30)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "mlflow: running" in status.stdout and "prefect: running" in status.stdout
    assert (services.data_dir / "services" / "mlflow.log").is_file()


def test_platform_flow_runs_on_prefect_server_and_logs_to_mlflow_on_postgresql(
        services: Services, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    settings = _settings(services, monkeypatch)
    assert settings.profile == "services"
    # A platform flow, in its own process, on the Prefect server named by the settings.
    done = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("platform_flow.py")), "400"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=180,
        env={**os.environ, **services.env, "PREFECT_HOME": str(tmp_path / "prefect-client")})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    flow_run = _get_json(f"{settings.prefect.api_url}/flow_runs/{result['flow_run_id']}")
    assert flow_run["state"]["type"] == "COMPLETED"
    assert result["stats"]["events"] > 0

    # Its result logged to the MLflow server of the settings: params, metrics, an artifact.
    client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
    experiment_id = client.create_experiment(settings.mlflow.experiment)
    run_id = client.create_run(
        experiment_id, tags={"prefect.flow_run_id": result["flow_run_id"]}).info.run_id
    client.log_param(run_id, "profile", settings.profile)
    for key, value in result["stats"].items():
        client.log_metric(run_id, key, value)
    client.log_text(run_id, json.dumps(result["stats"]), "stats/summary.json")
    client.set_terminated(run_id)

    # The run is in PostgreSQL, not in a file store, with its metrics.
    database = urlparse(services.env["RECSYS_MLFLOW_DB_URI"]).path.lstrip("/")
    with psycopg.connect(f"host=127.0.0.1 user=postgres dbname={database}") as conn:
        status = conn.execute("SELECT status FROM runs WHERE run_uuid = %s",
                              (run_id,)).fetchone()
        metrics = dict(conn.execute("SELECT key, value FROM latest_metrics WHERE run_uuid = %s",
                                    (run_id,)).fetchall())
    assert status == ("FINISHED",)
    assert metrics == {k: float(v) for k, v in result["stats"].items()}

    # The artifact went through the server's proxy to the local artifact root.
    artifacts = Path(settings.path(settings.mlflow.artifact_location))
    summaries = list(artifacts.rglob("stats/summary.json"))
    assert len(summaries) == 1 and run_id in str(summaries[0])
    assert json.loads(summaries[0].read_text()) == result["stats"]


def test_stop_is_clean(services: Services) -> None:
    state = services.data_dir / "services"
    pids = [int((state / f"{name}.pid").read_text()) for name in ("mlflow", "prefect")]
    stopped = services.run("stop", timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)  # the whole process group (server workers too) is gone
    assert not list(state.glob("*.pid"))
    status = services.run("status", timeout=30)
    assert status.returncode == 3 and "mlflow: stopped" in status.stdout
