"""The monitoring flow on real data: a trained champion, Feast/Redis online features, a served
log. Undrifted data passes; a shifted online feature fails the run naming that feature.

Uses the session's batch pipeline (lake + online store in Redis DB 1) and Ray cluster; trains
one tiny bundle into a SQLite MLflow of this module; writes the served log itself (the same
Parquet layout serving writes) with the champion's own recommendations in two windows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest
import redis

from recsys_core.settings import Settings, load_settings
from tests.fixtures.champion import sqlite_mlflow, train_champion
from tests.fixtures.feast_store import TEST_REDIS_URL, BatchEnv, derive_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DRIFTED = "user_ctr_7d"


@dataclass(frozen=True)
class MonitoredEnv:
    settings: Settings
    champion: str
    users: list[str]


def _write_served(settings: Settings, recs: pd.DataFrame, served_at: datetime, tag: str) -> None:
    from recsys_core.contracts import SERVED_SCHEMA
    from recsys_pipelines.etl import atomic_write_table

    rows = pd.DataFrame({
        "request_id": recs["user_id"] + f"-{tag}", "user_id": recs["user_id"],
        "item_id": recs["item_id"], "position": (recs["rank"] - 1).astype("int32"),
        "score": recs["score"].astype(float), "source": "retrieval",
        "bundle_version": "test", "served_at": pd.Timestamp(served_at).floor("ms"),
    })
    for name in SERVED_SCHEMA.names:  # the experiment/arm/degraded/latency columns: not served
        if name not in rows:
            rows[name] = None
    path = (settings.landing_dir / "served" / f"date={served_at.date().isoformat()}"
            / f"served-{tag}.parquet")
    atomic_write_table(pa.Table.from_pandas(rows, schema=SERVED_SCHEMA, preserve_index=False),
                       path)


@pytest.fixture(scope="module")
def monitored(batch_env: BatchEnv, features_state: Any, ray_cluster: Any,
              tmp_path_factory: pytest.TempPathFactory) -> MonitoredEnv:
    from recsys_models.registry import load_alias
    from recsys_pipelines.etl import read_lake_events
    from recsys_pipelines.monitoring import latest_per_entity

    assert features_state.is_completed()
    root = tmp_path_factory.mktemp("monitoring")
    config_file = derive_config(batch_env.config_file, root / "settings.yaml", {
        "data_dir": str(root / "data"),  # snapshot, served log, textfile; Feast stays shared
        "mlflow": sqlite_mlflow(root, "monitoring-test"),
        # 80 users / 150 items: two samples of one distribution reach PSI ~0.2-0.45 at 10 bins
        # (measured), so this tiny set uses 5 bins and a threshold of 1; the shift below
        # gives > 3.
        "monitoring": {"window_hours": 1.0, "psi_bins": 5, "max_feature_psi": 1.0,
                       "max_score_psi": 1.0},
    })
    settings = load_settings("local", config_file)
    champion = train_champion(settings, read_lake_events(batch_env.settings.lake_dir),
                              why="monitoring test")

    # The champion's recommendations for every user, served in two windows (half each).
    users = latest_per_entity(champion.frame, "user_id").reset_index(drop=True)
    recs = load_alias(settings, "champion").recommend(users, k=10, candidates=50)
    now = datetime.now(UTC)
    ids = sorted(users["user_id"])
    first = set(ids[::2])
    _write_served(settings, recs[recs["user_id"].isin(first)], now - timedelta(minutes=90),
                  "previous")
    _write_served(settings, recs[~recs["user_id"].isin(first)], now - timedelta(minutes=30),
                  "current")
    return MonitoredEnv(settings, champion.outcome.registered.version, ids)


@pytest.fixture
def shifted_online_feature(monitored: MonitoredEnv) -> Iterator[str]:
    """Multiplies one user feature online (Feast write), then restores every key byte-exact."""
    from recsys_core.features import USER_BATCH
    from recsys_pipelines.feature_store import load_store, online_features

    settings = monitored.settings
    client = redis.Redis.from_url(TEST_REDIS_URL)
    keys = list(client.scan_iter(match=f"*{settings.feast.project}".encode(), count=1000))
    saved: dict[bytes, bytes] = {key: client.dump(key) for key in keys}  # type: ignore[misc]
    try:
        store = load_store(settings)
        current = online_features(store, "user", monitored.users, (USER_BATCH.name,))
        current = current.dropna(subset=[DRIFTED])
        current[DRIFTED] = current[DRIFTED] * 3.0 + 0.5
        current["window_end"] = pd.Timestamp(datetime.now(UTC))
        store.write_to_online_store(USER_BATCH.name, current[["user_id", "window_end",
                                                              *USER_BATCH.feature_names]])
        yield DRIFTED
    finally:
        for key, value in saved.items():
            client.restore(key, 0, value, replace=True)
        client.close()


def _run(settings: Settings) -> Any:
    from recsys_platform.flows.monitoring import monitoring_flow

    return monitoring_flow(settings=settings, return_state=True)


def test_undrifted_data_passes_and_lands_in_mlflow_and_prometheus(
        monitored: MonitoredEnv, prefect_harness: None) -> None:
    from mlflow import MlflowClient

    state = _run(monitored.settings)
    assert state.is_completed(), state.message
    report = state.result()
    values = {c["name"]: c["value"] for c in report["checks"]}
    print("undrifted checks:", {k: round(v, 3) for k, v in values.items()})  # noqa: T201
    assert report["breaches"] == [] and report["champion"] == monitored.champion
    assert {f"psi:{DRIFTED}", "psi:item_ctr_7d", "score_psi", "uncovered_catalog",
            "popularity_gini"} <= set(values)
    assert any("stream freshness" in n for n in report["notes"])  # no stream job here
    assert any("serving_metrics_url not set" in n for n in report["notes"])

    client = MlflowClient(monitored.settings.mlflow_tracking_uri)
    run = client.get_run(report["mlflow_run_id"])
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "monitoring" and run.info.status == "FINISHED"
    assert run.data.metrics[f"psi/{DRIFTED}"] == pytest.approx(values[f"psi:{DRIFTED}"])
    assert run.data.metrics["breaches"] == 0
    artifact = Path(client.download_artifacts(run.info.run_id, "monitoring/report.json"))
    assert artifact.read_text().count('"name"') == len(report["checks"])

    text = Path(report["textfile"]).read_text()
    assert f'recsys_monitoring_value{{check="psi:{DRIFTED}"}}' in text
    assert "recsys_monitoring_breaches 0.0" in text


def test_shifted_online_feature_fails_the_run_naming_it(
        monitored: MonitoredEnv, shifted_online_feature: str, prefect_harness: None) -> None:
    from mlflow import MlflowClient

    state = _run(monitored.settings)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    print("drifted:", message)  # noqa: T201
    assert f"feature drift: {shifted_online_feature} PSI" in message
    drifted = [part for part in message.split("; ") if "feature drift" in part]
    assert len(drifted) == 1, message  # only the shifted feature drifted

    client = MlflowClient(monitored.settings.mlflow_tracking_uri)
    experiment = client.get_experiment_by_name("monitoring")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"],
                              max_results=1)
    assert runs[0].info.status == "FAILED"
    assert runs[0].data.metrics[f"psi/{shifted_online_feature}"] > \
        monitored.settings.monitoring.max_feature_psi
