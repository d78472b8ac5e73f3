"""The stream writer keeps the trending cold-start list that serving reads (real Redis, DB 3)."""

from __future__ import annotations

import uuid

import pandas as pd
import pytest
import redis

from recsys_core.features import ITEM_TRENDING
from recsys_pipelines import cold_start
from recsys_pipelines.stream.sink import FeatureWriter, SinkConfig
from recsys_pipelines.stream.sql import window_plan

pytestmark = pytest.mark.integration
URL = "redis://127.0.0.1:6379/3"
HOUR_MS = 3_600_000


def _rows(end_ms: int, clicks: dict[str, int]) -> pd.DataFrame:
    return pd.DataFrame({"item_id": list(clicks), "window_end": [end_ms] * len(clicks),
                         "item_impressions_1h": [10 * c + 1 for c in clicks.values()],
                         "item_clicks_1h": list(clicks.values()),
                         "events_in_slide": [1] * len(clicks)})


def test_trending_follows_the_windows_and_drops_stale_items() -> None:
    project = f"trend_{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(URL)
    writer = FeatureWriter(SinkConfig(URL, project, "recsys_test"), window_plan(ITEM_TRENDING),
                           client=client)
    try:
        start = 1_800_000_000_000
        writer.write(_rows(start, {"a": 5, "b": 9, "c": 0}))
        lists = cold_start.read_lists(client, "recsys_test", project)
        assert lists["trending"] == ["b", "a", "c"]  # clicks first, impressions break ties
        writer.write(_rows(start + HOUR_MS // 2, {"a": 20}))
        assert cold_start.read_lists(client, "recsys_test", project)["trending"][0] == "a"
        writer.write(_rows(start + 3 * HOUR_MS, {"d": 1}))  # b and c: older than the TTL
        assert cold_start.read_lists(client, "recsys_test", project)["trending"] == ["d"]
    finally:
        writer.close()
        keys = list(client.scan_iter(match=f"*{project}".encode()))
        if keys:
            redis.Redis.from_url(URL).delete(*keys)
