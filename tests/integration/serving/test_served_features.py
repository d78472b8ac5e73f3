"""Served features are trained on: parity between what serving gave the model and the training
rows built from its impressions.

Real Ray Serve replica (the session's app), real Redis (the batch pipeline's online store,
Feast layout), real ETL functions (landing -> validated events) and Feast's point-in-time join;
then the training-set builder's :func:`attach_served_features` over the served log.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest

from recsys_core import features as F
from tests.integration.serving.env import ServingEnv, _wait, call

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _known_users(env: ServingEnv, n: int) -> list[str]:
    from recsys_pipelines.etl import read_lake_events

    events = read_lake_events(env.settings.lake_dir)
    clicks = events.loc[events["event_type"] == "click", "user_id"]
    return [str(u) for u in clicks.value_counts().index[:n]]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return bool(a == b)


def test_training_rows_carry_the_features_serving_gave_the_model(
    serving_env: ServingEnv, tmp_path: Any,
) -> None:
    from recsys_pipelines.etl import clean_batch, pseudonymize_users
    from recsys_pipelines.feature_store import load_store
    from recsys_pipelines.sources import read_landing_day
    from recsys_pipelines.training_set import (
        attach_served_features,
        build_training_set,
        join_labels,
        read_served_features,
    )
    from recsys_platform.serving.online_features import RedisUserFeatures, registered_views

    settings = serving_env.settings
    users = _known_users(serving_env, 4)
    requests: dict[str, str] = {}
    shown = 0
    for user in users:
        status, _, body = call(f"{serving_env.url}/recommend", {"user_id": user, "k": 5})
        assert status == 200 and body["items"] and body["source"] == "model", body
        requests[body["request_id"]] = user
        shown += len(body["items"])
    served_dir = settings.landing_dir / "served"

    def logged() -> bool:
        ids = {i for p in served_dir.rglob("served-*.parquet")
               for i in pq.read_table(p, columns=["request_id"]).column(0).to_pylist()}
        return set(requests) <= ids

    _wait(logged, 30, "the impression log flush")

    # What the replica read from Redis for each user (nothing writes these features meanwhile).
    store = load_store(settings)
    reader = RedisUserFeatures(store, settings.redis.url, 5.0,
                               registered_views(store, settings.feast.serving_service, "user"))
    online = {user: reader(user) or {} for user in users}

    # The ETL's own functions: the served impressions' landing partition -> validated events.
    today = datetime.now(UTC).date()
    raw = read_landing_day(settings.landing_dir, today, tmp_path / "quarantine").frame
    events = clean_batch(pseudonymize_users(raw, settings.privacy)).clean
    events = events[events["request_id"].isin(requests)].reset_index(drop=True)
    assert len(events) == shown  # one impression event per item shown
    as_of = pd.Timestamp.now(tz="UTC") + settings.labels.window  # every label window closed
    impressions = join_labels(events, settings.labels.window, as_of,
                              with_request_id=True).impressions
    frame = build_training_set(store, impressions, settings.feast.ranking_service)
    rows = attach_served_features(frame, read_served_features(settings.landing_dir))

    assert len(rows) == len(events) and set(rows["features_source"]) == {"served"}
    for request_id, user in requests.items():
        served = rows[rows["request_id"] == request_id]
        expected = online[user]
        numeric = {k: v for k, v in expected.items()
                   if isinstance(v, int | float) and not isinstance(v, bool)}
        assert any(k in numeric for k in (*F.USER_BATCH.feature_names,
                                          *F.USER_STREAM.feature_names)), expected
        for name, value in numeric.items():  # batch and stream features, as served
            assert all(_same(v, value) for v in served[name]), (name, value, list(served[name]))
        for history in served[F.USER_HISTORY]:
            assert list(history) == list(expected.get(F.USER_HISTORY, []))[:F.HISTORY_LENGTH]
    logged_json = read_served_features(settings.landing_dir).set_index("request_id")
    for request_id, user in requests.items():
        assert json.loads(logged_json.loc[request_id, "user_features"]).keys() == {
            k for k, v in online[user].items()
            if isinstance(v, int | float) and not isinstance(v, bool)}
