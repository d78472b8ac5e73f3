"""The CLI's output is the project's own: library logs, warnings and prints stay out of it.

The demo itself takes ~10 minutes; the integration test runs the cheap stages that touch the
noisiest libraries (Prefect flows, Ray Data, Feast materialization) as a user would, on a
tiny dataset, and counts what :mod:`tests.docs.demo_output` calls library lines.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from tests.docs.demo_output import classify

REPO = Path(__file__).resolve().parents[2]
RECSYS = Path(sys.executable).with_name("recsys")

SAMPLE = """\
───────── 1. synthetic events ─────────
┏━━━━━━━━┳━━━━━━━┓
│ events │ 2,000 │
2026-12-07 05:32:36,076 INFO recsys_pipelines.etl: ETL 2026-11-01..2026-11-02: 10 rows
2026-12-07 05:32:37,000 WARNING recsys_models.registry: a warning of ours (always shown)
/venv/lib/python3.11/site-packages/sklearn/linear_model/_logistic.py:599: ConvergenceWarning: lbfgs
STOP: TOTAL NO. OF ITERATIONS REACHED LIMIT

  n_iter_i = _check_optimize_result(
Successfully registered model 'recsys-bundle'.
2026-12-07 05:43:21,863 WARNING apache_beam.io.filesystems: Failed to import GCSFileSystem
(raylet) A worker died or was killed while executing a task
burst 1: 3,161 events appended; windows written
  user u8: user_clicks_1h=25
"""


def test_library_lines_are_told_from_the_projects_own() -> None:
    foreign, project = classify(SAMPLE)
    assert foreign == [
        "/venv/lib/python3.11/site-packages/sklearn/linear_model/_logistic.py:599: "
        "ConvergenceWarning: lbfgs", "STOP: TOTAL NO. OF ITERATIONS REACHED LIMIT", "",
        "  n_iter_i = _check_optimize_result(", "Successfully registered model 'recsys-bundle'.",
        "2026-12-07 05:43:21,863 WARNING apache_beam.io.filesystems: Failed to import "
        "GCSFileSystem", "(raylet) A worker died or was killed while executing a task"]
    assert project == ["2026-12-07 05:32:36,076 INFO recsys_pipelines.etl: ETL "
                       "2026-11-01..2026-11-02: 10 rows"]


@pytest.mark.integration
@pytest.mark.slow
def test_cheap_cli_stages_print_no_library_lines(tmp_path: Path) -> None:
    """generate -> ETL (Prefect) -> batch features (Ray Data) -> Feast apply + materialize:
    at most 2 library lines in all (the demo's budget is 20 for ten stages)."""
    repo = tmp_path / "feature_repo"
    repo.mkdir()
    (repo / "definitions.py").write_text((REPO / "feature_repo" / "definitions.py").read_text())
    config = tmp_path / "settings.yaml"
    config.write_text(yaml.safe_dump({
        "data_dir": str(tmp_path / "data"),
        "feast": {"project": f"out_{uuid.uuid4().hex[:8]}", "online_store": "sqlite",
                  "repo_path": str(repo), "registry_path": str(tmp_path / "registry.db")}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")}
    stages = [["data", "generate", "--events", "3000", "--days", "2", "--users", "100",
               "--items", "200", "--start", "2026-11-01"],
              ["etl", "run", "--start", "2026-11-01", "--end", "2026-11-02"],
              ["features", "compute", "--start", "2026-11-01", "--end", "2026-11-02"]]
    output = ""
    for stage in stages:
        run = subprocess.run([str(RECSYS), "--config", str(config), *stage], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=400)
        assert run.returncode == 0, run.stderr[-2000:]
        output += run.stdout + run.stderr
    foreign, _ = classify(output)
    assert len(foreign) <= 2, "\n".join(foreign)
