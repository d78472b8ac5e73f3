"""Online experiments in a real MLflow store (the session's SQLite one): start, the active tag
serving polls, the audit of each decision on the versions and the experiment's run, stop."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from recsys_core.settings import MlflowSettings, Settings, load_settings
from recsys_platform.experiments import lifecycle, store
from recsys_platform.experiments.definition import ACTIVE_TAG, ExperimentError
from recsys_platform.experiments.stats import Decision, analyse
from tests.fixtures.mlflow_store import MlflowStore
from tests.unit.test_experiment_stats import _rows

pytestmark = [pytest.mark.integration]


def _settings(mlflow_sqlite_store: MlflowStore, tmp_path: Path) -> Settings:
    mlflow = MlflowSettings(tracking_uri=mlflow_sqlite_store.tracking_uri,
                            artifact_location=str(mlflow_sqlite_store.artifact_dir),
                            model_name=f"exp-store-{uuid.uuid4().hex[:6]}")
    return load_settings("local").model_copy(update={"data_dir": tmp_path, "mlflow": mlflow})


def test_start_decide_and_stop_are_recorded(mlflow_sqlite_store: MlflowStore,
                                            tmp_path: Path) -> None:
    settings = _settings(mlflow_sqlite_store, tmp_path)
    name = settings.mlflow.model_name
    client = MlflowClient(settings.mlflow_tracking_uri, settings.mlflow_tracking_uri)
    client.create_registered_model(name)
    for _ in range(2):  # versions need no artifact for the bookkeeping
        client.create_model_version(name, source=str(tmp_path))
    with pytest.raises(ExperimentError, match="no champion"):
        lifecycle.start(settings, "2", why="x")
    client.set_registered_model_alias(name, "champion", "1")
    with pytest.raises(ExperimentError, match="already the champion"):
        lifecycle.start(settings, "1", why="x")

    exp = lifecycle.start(settings, "2", "split", 0.5, why="try v2", who="alice",
                          min_samples=100)
    assert lifecycle.current(settings) == exp
    assert json.loads(client.get_registered_model(name).tags[ACTIVE_TAG])["id"] == exp.id
    with pytest.raises(ExperimentError, match="is running"):
        lifecycle.start(settings, "2", why="again")

    # a decision that keeps it running, then one that promotes
    running = analyse(exp, _rows({"control": 0.1, "treatment": 0.1}, exp=exp))
    with store.client_for(settings) as c:
        store.record_decision(c, settings, exp, Decision("continue", ["not yet"]), running,
                              "flow", "hourly", datetime.now(UTC).isoformat())
        assert lifecycle.current(settings) == exp
        better = analyse(exp, _rows({"control": 0.1, "treatment": 0.3}, exp=exp))
        store.record_decision(c, settings, exp, Decision("promote", ["treatment better"]),
                              better, "flow", "hourly", datetime.now(UTC).isoformat())
    assert lifecycle.current(settings) is None  # replicas stop routing
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"
    v2 = client.get_model_version(name, "2")
    assert v2.tags["experiment.decision"] == "promoted" and v2.tags["experiment.who"] == "flow"
    what = json.loads(v2.tags["experiment.what"])
    assert what["lift"]["ci"][0] > 0 and what["treatment"]["impressions"] > 0
    assert what["lift"]["method"].startswith("delta-method")
    assert v2.tags["promoted_by"] == "flow" and "experiment.ended" in v2.tags
    assert "### Online experiment" in (v2.description or "")
    assert "**promoted** by flow" in (v2.description or "")
    v1 = client.get_model_version(name, "1")
    assert v1.tags["experiment.control_in"] == exp.id
    assert v1.tags["experiment.control_outcome"].startswith("promoted")
    run_id = store.run_of(client, exp.id)
    assert run_id is not None
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["decision"] == "promoted"
    assert run.data.params["min_samples"] == "100"
    assert [m.step for m in client.get_metric_history(run_id, "lift/p_value")] == [1, 2]

    # a second experiment, stopped by hand: the champion stays
    again = lifecycle.start(settings, "1", "shadow", why="old one in shadow", who="bob")
    lifecycle.stop(settings, why="enough", who="bob")
    assert lifecycle.current(settings) is None
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"
    v1 = client.get_model_version(name, "1")
    assert v1.tags["experiment.id"] == again.id and v1.tags["experiment.decision"] == "stopped"
    with pytest.raises(ExperimentError, match="no experiment is running"):
        lifecycle.stop(settings, why="twice")
