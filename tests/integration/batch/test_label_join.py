"""A model trained on served impressions: serving's impression log -> later clicks -> ETL flow
-> Feast training set (log and wait) -> a Ray Train run registered in MLflow."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from recsys_pipelines.etl import read_lake_events
from recsys_pipelines.feature_store import load_store
from recsys_pipelines.training_set import build_snapshot, join_labels
from recsys_platform.flows.data import etl_flow, features_flow
from recsys_platform.runtime import ensure_ray
from recsys_platform.serving.impressions import ImpressionLogger
from tests.fixtures.mlflow_store import MlflowStore
from tests.integration.batch.closed_loop import (
    LoopEnv,
    day_range,
    iso,
    land_events,
    make_env,
    served_at,
)

pytestmark = pytest.mark.integration

D1 = datetime(2026, 11, 2, tzinfo=UTC)  # the second generated day
SERVED_CLOSED = D1 + timedelta(hours=6, milliseconds=123)  # window long closed at as_of
SERVED_OPEN = D1 + timedelta(days=1, minutes=30, milliseconds=321)  # window still open
BUNDLE = "7"


def _click(name: str, user: str, item: str, request: str, at: datetime,
           kind: str = "click", watch_ms: int | None = None) -> dict[str, Any]:
    return {"event_id": f"c-{name}", "event_time": iso(at), "user_id": user, "item_id": item,
            "event_type": kind, "watch_time_ms": watch_ms,
            "item_duration_ms": 30_000 if watch_ms else None, "surface": "feed",
            "device": "ios", "request_id": request, "model_version": BUNDLE}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, repo_root: Path,
           mlflow_sqlite_store: MlflowStore, prefect_harness: None, ray_cluster: Any,
           ) -> tuple[LoopEnv, pd.DataFrame]:
    """Four served responses (three early, one late), later clicks for some, ETL + features.

    Returns the environment and the served items with their expected labels.
    """
    root = tmp_path_factory.mktemp("labels")
    env = make_env(root, repo_root, {
        "feast": {"online_store": "sqlite"},
        "mlflow": {"tracking_uri": mlflow_sqlite_store.tracking_uri,
                   "artifact_location": str(mlflow_sqlite_store.artifact_dir),
                   "experiment": "label-join", "model_name": f"labels-{env_tag(root)}"},
    })
    items = env.data.items.sort_values("published_at")["item_id"].tolist()[:20]
    requests = {"A1": ("u1", items[0:5]), "A2": ("u2", items[5:10]),
                "A3": ("u3", items[10:15]), "B": ("u4", items[15:20])}
    log = ImpressionLogger(env.landing)
    rows = []
    for request, (user, served_items) in requests.items():
        moment = SERVED_OPEN if request == "B" else SERVED_CLOSED
        with served_at(moment):
            log.log(f"req-{request}", user, [(i, 1.0 - n / 10, "retrieval")
                                             for n, i in enumerate(served_items)],
                    BUNDLE, "feed", "ios")
            log.flush()
        rows += [{"request_id": f"req-{request}", "user_id": user, "item_id": i,
                  "position": n, "event_time": pd.Timestamp(moment), "clicked": 0,
                  "watch_time_ms": float("nan")} for n, i in enumerate(served_items)]
    expected = pd.DataFrame(rows)
    t = SERVED_CLOSED
    land_events(env.landing, "clicks", [
        _click("1", "u1", items[0], "req-A1", t + timedelta(minutes=5)),
        _click("2", "u1", items[0], "req-A1", t + timedelta(minutes=6), "watch", 12_000),
        _click("3", "u1", items[2], "req-A1", t + timedelta(minutes=10)),
        _click("4", "u1", items[1], "another", t + timedelta(minutes=7)),  # other request
        _click("5", "u2", items[6], "req-A2", t + timedelta(minutes=50)),
        _click("6", "u3", items[13], "req-A3", t + timedelta(minutes=90)),  # too late
        _click("7", "u4", items[15], "req-B", SERVED_OPEN + timedelta(minutes=10)),
    ])
    for item, request, watch in ((items[0], "req-A1", 12_000.0), (items[2], "req-A1", None),
                                 (items[6], "req-A2", None)):
        hit = (expected["item_id"] == item) & (expected["request_id"] == request)
        expected.loc[hit, "clicked"] = 1
        if watch:
            expected.loc[hit, "watch_time_ms"] = watch
    start, end = day_range(env, extra_days=1)
    etl = etl_flow(start=start, end=end, config_file=str(env.config_file))
    assert etl["clean_rows"] > 0
    features_flow(start=start, end=end, config_file=str(env.config_file))
    return env, expected


def env_tag(root: Path) -> str:
    return root.name.replace("_", "-")


def test_served_impressions_pass_the_contract_into_the_lake(
    served: tuple[LoopEnv, pd.DataFrame],
) -> None:
    env, expected = served
    lake = read_lake_events(env.settings.lake_dir)
    got = lake[(lake["event_type"] == "impression")
               & lake["request_id"].isin(expected["request_id"])]
    assert len(got) == len(expected) == 20
    merged = expected.merge(got, on=["request_id", "user_id", "item_id"], suffixes=("", "_l"))
    assert len(merged) == 20
    # Position lives in the event id; the bundle version in model_version; score stays in the
    # served log (landing/served), which the lake schema has no column for.
    assert (merged["event_id"] == merged["request_id"] + "-" + merged["position"].astype(str)).all()
    assert (merged["model_version"] == BUNDLE).all()
    assert (merged["event_time_l"] == merged["event_time"]).all()
    assert set(merged["surface"]) == {"feed"} and set(merged["device"]) == {"ios"}
    quarantine = pd.concat(pd.read_parquet(p) for p in
                           (env.settings.lake_dir / "quarantine" / "events").glob("*/*.parquet"))
    assert not quarantine["request_id"].isin(expected["request_id"]).any()
    served_log = pd.concat(pd.read_parquet(p) for p in (env.landing / "served").rglob("*.parquet"))
    assert sorted(served_log["score"].round(3)) == sorted(
        [round(1.0 - n / 10, 3) for n in range(5)] * 4)


def test_a_model_trains_on_served_impressions_whose_window_closed(
    served: tuple[LoopEnv, pd.DataFrame],
) -> None:
    from recsys_models.train import TrainConfig
    from recsys_models.two_tower import TwoTowerConfig
    from recsys_models.workflow import train_evaluate_register

    env, expected = served
    settings = env.settings
    lake = read_lake_events(settings.lake_dir)
    join = join_labels(lake, settings.labels.window)
    assert join.as_of == pd.Timestamp(SERVED_OPEN + timedelta(minutes=10))
    assert join.pending >= 5  # the late response (and the last generated minutes) wait

    sid, rows = build_snapshot(settings, load_store(settings))
    snapshot = pd.read_parquet(settings.data_dir / "training" / sid)
    assert len(snapshot) == rows == len(join.impressions)
    key = ["user_id", "item_id", "event_time"]
    snapshot["event_time"] = pd.to_datetime(snapshot["event_time"], utc=True)
    served_times = {pd.Timestamp(SERVED_CLOSED), pd.Timestamp(SERVED_OPEN)}
    from_serving = snapshot[snapshot["event_time"].isin(served_times)]
    closed = expected[expected["request_id"] != "req-B"]
    assert sorted(map(tuple, from_serving[key].to_numpy())) == sorted(
        map(tuple, closed[key].to_numpy()))
    labels = closed.merge(from_serving, on=key, suffixes=("", "_snap"))
    assert (labels["clicked_snap"] == labels["clicked"]).all() and labels["clicked"].sum() == 3
    assert labels["watch_time_ms_snap"].fillna(-1).equals(labels["watch_time_ms"].fillna(-1))
    assert from_serving["user_impressions_1d"].notna().any()  # features as of the day before

    cfg = TrainConfig(epochs=1, batch_size=256, two_tower=TwoTowerConfig(dim=16))
    ensure_ray(settings)
    outcome = train_evaluate_register(settings, cfg, snapshot_id=sid, workers=1)
    assert outcome.split.snapshot_id == sid and outcome.registered is not None
    trained_on = outcome.split.train_labels.assign(
        event_time=lambda f: pd.to_datetime(f["event_time"], utc=True))
    learned = closed.merge(trained_on, on=key, suffixes=("", "_train"))
    assert len(learned) == len(closed)  # every closed served impression is a training row
    assert (learned["clicked_train"] == learned["clicked"]).all()
    from mlflow import MlflowClient

    run = MlflowClient(settings.mlflow_tracking_uri).get_run(outcome.registered.run_id)
    assert run.data.params["snapshot_id"] == sid
