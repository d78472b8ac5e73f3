"""`prefect deploy --all` registers every deployment of prefect.yaml, with its cron schedule
and entrypoint, on the session's Prefect API (the test harness's server)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.integration]

EXPECTED_CRONS = {  # the whole loop: what docs/operations.md promises
    "etl-daily": "30 0 * * *", "features-daily": "30 1 * * *",
    "materialize-hourly": "5 * * * *", "retrain-weekly": "0 3 * * 1",
    "monitoring-hourly": "15 * * * *", "experiment-decide": "45 * * * *",
}


def _prefect(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(Path(sys.executable).with_name("prefect")), *args], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done


def test_prefect_deploy_registers_every_schedule(prefect_harness: None, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    declared = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())["deployments"]
    assert {d["name"]: d["schedules"][0]["cron"] for d in declared} == EXPECTED_CRONS

    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()),
           "PREFECT_HOME": str(tmp_path / "prefect-home"), "RECSYS_REPO_DIR": str(REPO_ROOT),
           "RECSYS_PROFILE": "local"}
    _prefect(["--no-prompt", "work-pool", "create", "recsys-process", "--type", "process",
              "--overwrite"], env)
    _prefect(["--no-prompt", "deploy", "--all"], env)

    with get_client(sync_client=True) as client:
        registered = {d.name: d for d in client.read_deployments()}
    for spec in declared:
        deployment = registered[spec["name"]]
        assert deployment.entrypoint == spec["entrypoint"]
        assert deployment.work_pool_name == "recsys-process"
        [schedule] = deployment.schedules
        assert schedule.active
        assert schedule.schedule.cron == spec["schedules"][0]["cron"]  # type: ignore[union-attr]
        assert schedule.schedule.timezone == "UTC"  # type: ignore[union-attr]
    step = registered["retrain-weekly"].pull_steps[0]  # type: ignore[index]
    assert step["prefect.deployments.steps.set_working_directory"]["directory"] == str(REPO_ROOT)
