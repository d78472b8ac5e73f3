"""`recsys privacy forget`: after it, nothing of the user remains in any file or Redis key, other
users are untouched, and the next training set leaves the user out even when data arrives late.

The user's data is seeded with the real pipeline, pseudonymization on: landing events (Parquet
and newline JSON), a quarantined row, the users snapshot, ETL flow -> lake, features flow ->
offline tables + Feast's Redis hash, the stream job's recent-items key, and serving's
impression log with the raw id and with the pseudonym.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest
import redis
from typer.testing import CliRunner

from recsys_core.online_layout import entity_key
from recsys_core.privacy import AUDIT_LOG, pseudonymize
from recsys_pipelines.etl import read_lake_events
from recsys_pipelines.feature_store import load_store
from recsys_pipelines.generator import GeneratedData
from recsys_pipelines.stream.sink import SinkConfig
from recsys_pipelines.training_set import build_snapshot
from recsys_platform.flows.data import etl_flow, features_flow
from recsys_platform.serving.impressions import ImpressionLogger
from tests.fixtures.feast_store import TEST_REDIS_URL, delete_project_keys
from tests.integration.batch.closed_loop import (
    LoopEnv,
    day_range,
    iso,
    land_events,
    make_env,
    served_at,
)

pytestmark = pytest.mark.integration

TARGET = "zq-forget-4711"  # replaces generated user u3 everywhere
OTHER = "u5"
KEY = "forget-test-key"
P_TARGET, P_OTHER = pseudonymize(TARGET, KEY), pseudonymize(OTHER, KEY)


def _with_target(data: GeneratedData) -> GeneratedData:
    events = data.events.copy()
    assert (events["user_id"] == "u3").sum() > 10
    events.loc[events["user_id"] == "u3", "user_id"] = TARGET
    bad = events[events["user_id"] == TARGET].head(1).assign(event_id="bad-target",
                                                             event_type="bogus")
    users = data.users.copy()
    users.loc[users["user_id"] == "u3", "user_id"] = TARGET
    return dataclasses.replace(data, events=pd.concat([events, bad], ignore_index=True),
                               users=users)


def _stream_dir(env: LoopEnv) -> Path:
    return Path(env.settings.path(env.settings.flink.stream_dir))


def _keys_of_env(env: LoopEnv, client: redis.Redis) -> list[bytes]:
    prefix = env.settings.redis.key_prefix
    return [*client.scan_iter(match=f"*{env.project}".encode(), count=1000),
            *client.scan_iter(match=f"{prefix}:*".encode(), count=1000)]


def mentions(env: LoopEnv, needles: tuple[str, ...]) -> dict[str, list[str]]:
    """Every file under the environment root and every Redis key of its project or prefix
    that holds one of ``needles`` (in a Parquet value, in the bytes, in a key or value)."""
    found: dict[str, list[str]] = {}
    for path in sorted(env.root.rglob("*")):
        if not path.is_file():
            continue
        hit = any(n.encode() in path.read_bytes() for n in needles)
        if path.suffix == ".parquet":
            frame = pq.read_table(path).to_pandas()
            hit = hit or any(frame[c].astype(str).str.contains(n, regex=False).any()
                             for c in frame.columns for n in needles)
        if hit:
            found.setdefault("files", []).append(str(path.relative_to(env.root)))
    client = redis.Redis.from_url(TEST_REDIS_URL)
    try:
        for key in _keys_of_env(env, client):
            kind = client.type(key)
            if kind == b"hash":
                values = [b for kv in client.hgetall(key).items() for b in kv]
            elif kind == b"zset":
                values = list(client.zrange(key, 0, -1))
            else:
                values = [client.get(key) or b""]
            if any(n.encode() in blob for n in needles for blob in (key, *values)):
                found.setdefault("redis", []).append(repr(key[:40]))
    finally:
        client.close()
    return found


def _other_users(env: LoopEnv) -> dict[str, Any]:
    lake = read_lake_events(env.settings.lake_dir)
    client = redis.Redis.from_url(TEST_REDIS_URL)
    try:
        online = client.hgetall(entity_key("user_id", P_OTHER, env.project, 3))
        sink = SinkConfig(TEST_REDIS_URL, env.project, env.settings.redis.key_prefix)
        recent = client.zrange(sink.recent_key(P_OTHER), 0, -1)
    finally:
        client.close()
    kept = lake[lake["user_id"] != P_TARGET]
    return {"lake_rows": len(kept), "lake_ids": sorted(kept["event_id"]),
            "online_fields": len(online), "recent": sorted(recent)}


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory, repo_root: Path, prefect_harness: None,
           ray_cluster: Any) -> Iterator[LoopEnv]:
    root = tmp_path_factory.mktemp("forget")
    prefix = f"recsys_forget_{uuid.uuid4().hex[:8]}"
    env = make_env(root, repo_root, {"privacy": {"pseudonymize": True, "key": KEY},
                                     "redis": {"key_prefix": prefix}},
                   edit=_with_target, jsonl=True)
    try:
        start, end = day_range(env)
        etl_flow(start=start, end=end, config_file=str(env.config_file))
        features_flow(start=start, end=end, config_file=str(env.config_file))
        log = ImpressionLogger(env.landing, stream_dir=_stream_dir(env))
        for request, user in (("r-raw", TARGET), ("r-pseudo", P_TARGET), ("r-other", OTHER)):
            log.log(request, user, [("i1", 0.9, "retrieval"), ("i2", 0.8, "popular")], "3",
                    "feed", "web")
        log.flush()
        sink = SinkConfig(TEST_REDIS_URL, env.project, prefix)
        client = redis.Redis.from_url(TEST_REDIS_URL)  # what the stream job keeps per user
        for user in (P_TARGET, P_OTHER):
            client.zadd(sink.recent_key(user), {"1700000000000|e1|i1": 1.7e12})
        client.close()
        yield env
    finally:
        delete_project_keys(TEST_REDIS_URL, env.project)
        client = redis.Redis.from_url(TEST_REDIS_URL)
        keys = list(client.scan_iter(match=f"{prefix}:*"))
        if keys:
            client.delete(*keys)
        client.close()


def test_forget_removes_the_user_everywhere_and_keeps_them_out_of_training(
    seeded: LoopEnv,
) -> None:
    from recsys_platform.cli import app

    env = seeded
    needles = (TARGET, P_TARGET)
    before = mentions(env, needles)
    places = " ".join(before["files"])
    for where in ("landing/events", "landing/served", "landing/stream", "landing/catalog",
                  "lake/events", "lake/quarantine", "lake/catalog", "feature_repo/data"):
        assert where in places, (where, before)  # the scan sees the user before forgetting
    assert len(before["redis"]) == 2  # Feast's hash and the stream job's recent items
    lake = read_lake_events(env.settings.lake_dir)
    assert not lake["user_id"].eq(TARGET).any() and lake["user_id"].eq(P_TARGET).any()
    others = _other_users(env)
    assert others["online_fields"] > 0 and others["recent"]

    result = CliRunner().invoke(app, ["--config", str(env.config_file), "privacy", "forget",
                                      TARGET, "--who", "pytest"])
    assert result.exit_code == 0, result.output
    assert "lake" in result.output and "online store" in result.output

    assert mentions(env, needles) == {}
    assert _other_users(env) == others
    audit = json.loads((env.settings.data_dir / AUDIT_LOG).read_text().splitlines()[-1])
    assert audit["who"] == "pytest" and audit["at"]
    removed = audit["removed"]
    assert removed["online store"] == 2 and removed["quarantine"] >= 1
    assert all(removed[p] > 0 for p in ("landing", "impression log", "lake",
                                        "offline features"))

    # Data that arrives after the forget (a buffered impression log, a late click) reaches
    # the lake again, but the next training set leaves the user out.
    moment = datetime(2026, 11, 2, 12, tzinfo=UTC)
    with served_at(moment):
        late = ImpressionLogger(env.landing)
        late.log("r-late", TARGET, [("i1", 0.5, "retrieval")], "3", "feed", "web")
        late.flush()
    land_events(env.landing, "late-click", [{
        "event_id": "late-click", "event_time": iso(moment + timedelta(minutes=1)),
        "user_id": TARGET, "item_id": "i1", "event_type": "click", "request_id": "r-late"}])
    start, end = day_range(env)
    etl_flow(start=start, end=end, config_file=str(env.config_file))
    assert read_lake_events(env.settings.lake_dir)["user_id"].eq(P_TARGET).sum() == 2
    sid, rows = build_snapshot(env.settings, load_store(env.settings))
    snapshot = pd.read_parquet(env.settings.data_dir / "training" / sid)
    assert rows == len(snapshot) > 0 and P_TARGET not in set(snapshot["user_id"])
    assert P_OTHER in set(snapshot["user_id"])

    # Named by the pseudonym this time: the late rows go as well.
    from recsys_pipelines.forget import forget_user

    again = forget_user(env.settings, P_TARGET, who="pytest")
    assert again.removed["lake"] == 2 and again.tombstone == audit["tombstone"]
    assert mentions(env, needles) == {}
