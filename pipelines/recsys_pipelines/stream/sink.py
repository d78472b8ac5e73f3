"""The batched Redis writer behind the stream job (plain Python, testable without Flink).

Each call gets a batch of window rows (one per entity and window end) and writes them in two
round trips: read the stored window end of every entity, then one MULTI/EXEC transaction
that writes the rows that are not older than what is stored (last writer wins per entity and
window end: a replayed window rewrites the same bytes, an older one is skipped), the
recent-items sorted sets and the job's counters.

Recent items: each user row carries the items engaged with in the window's last slide as
``time|event_id|item_id`` members. They go into a sorted set per user (``ZADD`` is
idempotent, so replays cannot duplicate them) trimmed to ``HISTORY_LENGTH``; the Feast
feature is the newest ``HISTORY_LENGTH`` item ids with ``time <= window_end``, newest first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pandas as pd
import redis

from recsys_pipelines.stream import layout
from recsys_pipelines.stream.sql import (
    EVENTS_COLUMN,
    RECENT_COLUMN,
    RECENT_FIELD_SEP,
    RECENT_SEP,
    WindowPlan,
)
from recsys_platform.features import HISTORY_LENGTH, USER_RECENT_ITEMS, ratio

logger = logging.getLogger(__name__)

WRITTEN_TTL_S = 86_400  # how long the per-window first-write times are kept (freshness)


@dataclass(frozen=True)
class SinkConfig:
    """Where and how the sink writes. Plain values: it is pickled into the Flink worker."""

    redis_url: str
    project: str  # Feast project: the suffix of every entity key
    key_prefix: str  # prefix of the job's own keys (recent-items sets, counters)
    serialization_version: int = 3  # Feast entity_key_serialization_version

    @property
    def metrics_key(self) -> str:
        return f"{self.key_prefix}:stream:metrics"

    def written_key(self, view: str) -> str:
        return f"{self.key_prefix}:stream:written:{view}"

    def recent_key(self, user_id: str) -> str:
        return f"{self.key_prefix}:stream:recent:{user_id}"


@dataclass(frozen=True)
class WriteResult:
    rows: int
    written: int
    stale: int


def _ms(value: Any) -> int:
    return int(pd.Timestamp(value).as_unit("ms").value // 1_000_000) if not isinstance(
        value, int) else value


def _event_ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


def parse_recent(text: str | None) -> list[tuple[int, str]]:
    """``time|event_id|item_id;...`` -> ``[(epoch_ms, member), ...]``."""
    if not text:
        return []
    out = []
    for member in text.split(RECENT_SEP):
        if member:
            out.append((_event_ms(member.split(RECENT_FIELD_SEP, 1)[0]), member))
    return out


def newest_items(members: Sequence[tuple[int, str]], until_ms: int) -> list[str]:
    """Item ids of the ``HISTORY_LENGTH`` newest members at or before ``until_ms``."""
    eligible = sorted((m for m in members if m[0] <= until_ms), reverse=True)
    return [m.rsplit(RECENT_FIELD_SEP, 1)[1] for _, m in eligible[:HISTORY_LENGTH]]


class FeatureWriter:
    """Writes window rows of one feature group into Feast's Redis layout.

    Example:
        >>> writer = FeatureWriter(SinkConfig(url, "recsys", "recsys"), window_plan(USER_STREAM,
        ...                        recent_items=True))
        >>> writer.write(frame)  # columns: user_id, window_end, aggregates, recent
    """

    def __init__(self, config: SinkConfig, plan: WindowPlan,
                 client: redis.Redis | None = None) -> None:
        self.config = config
        self.plan = plan
        self.view = plan.group.name
        self.client = client or redis.Redis.from_url(config.redis_url)
        self.names = plan.aggregate_names + [r.name for r in plan.group.ratios]
        if plan.recent_items:
            self.names.append(USER_RECENT_ITEMS)
        self._keys: dict[str, bytes] = {}

    def _key(self, entity_id: str) -> bytes:
        key = self._keys.get(entity_id)
        if key is None:
            if len(self._keys) > 200_000:
                self._keys.clear()
            key = layout.entity_key(self.plan.key, entity_id, self.config.project,
                                    self.config.serialization_version)
            self._keys[entity_id] = key
        return key

    def _values(self, row: dict[str, Any]) -> list[Any]:
        values: list[Any] = [int(row[n]) for n in self.plan.aggregate_names]
        for r in self.plan.group.ratios:
            values.append(ratio(row[r.numerator], row[r.denominator]))
        return values

    def write(self, frame: pd.DataFrame) -> WriteResult:
        """Writes a batch of window rows; returns how many were written and skipped.

        Args:
            frame: One row per (entity, window_end): the entity key column, ``window_end``
                (timestamp or epoch ms), the group's aggregates and, for user groups,
                ``recent``.
        """
        if frame.empty:
            return WriteResult(0, 0, 0)
        key_col = self.plan.key
        ends = frame["window_end"]
        end_ms = (ends.astype("int64") if ends.dtype.kind in "iu"
                  else pd.to_datetime(ends).astype("datetime64[ms]").astype("int64"))
        rows = frame.assign(_end_ms=end_ms.to_numpy()).sort_values("_end_ms", kind="stable")
        records = rows.to_dict("records")
        entities = list(dict.fromkeys(str(r[key_col]) for r in records))
        ts_field = layout.timestamp_field(self.view)

        with self.client.pipeline(transaction=False) as pipe:
            for entity in entities:
                pipe.hget(self._key(entity), ts_field)  # type: ignore[arg-type]
            if self.plan.recent_items:
                for entity in entities:
                    pipe.zrevrange(self.config.recent_key(entity), 0, HISTORY_LENGTH - 1,
                                   withscores=True)
            replies = pipe.execute()
        stored = {e: layout.decode_timestamp_ms(r) for e, r in zip(entities, replies,
                                                                   strict=False)}
        recent: dict[str, list[tuple[int, str]]] = {}
        if self.plan.recent_items:
            for entity, members in zip(entities, replies[len(entities):], strict=True):
                recent[entity] = [(int(s), m.decode()) for m, s in members]

        written = stale = 0
        now_ms = int(time.time() * 1000)
        ends_written: set[int] = set()
        events_in = 0
        with self.client.pipeline(transaction=True) as tx:
            for row in records:
                entity, window_end = str(row[key_col]), int(row["_end_ms"])
                events_in += int(row.get(EVENTS_COLUMN) or 0)
                new_members = parse_recent(row.get(RECENT_COLUMN)) if self.plan.recent_items \
                    else []
                if new_members:
                    recent[entity] = list(dict.fromkeys(recent[entity] + new_members))
                    key = self.config.recent_key(entity)
                    tx.zadd(key, {m: s for s, m in new_members})
                    tx.zremrangebyrank(key, 0, -(HISTORY_LENGTH + 1))
                if window_end < stored[entity]:
                    stale += 1
                    continue
                stored[entity] = window_end
                values = self._values(row)
                if self.plan.recent_items:
                    values.append(newest_items(recent[entity], window_end))
                tx.hset(self._key(entity),  # type: ignore[arg-type]
                        mapping=layout.row_mapping(self.view, self.names, values, window_end))
                written += 1
                ends_written.add(window_end)
            metrics = self.config.metrics_key
            tx.hincrby(metrics, f"{self.view}:rows_written", written)
            tx.hincrby(metrics, f"{self.view}:rows_stale", stale)
            if events_in:
                tx.hincrby(metrics, f"{self.view}:events_in", events_in)
            if ends_written:
                newest = max(ends_written)
                tx.hset(metrics, mapping={
                    f"{self.view}:last_write_ms": now_ms,
                    f"{self.view}:last_window_end_ms": newest,
                    f"{self.view}:event_time_lag_ms": now_ms - newest,
                })
                written_key = self.config.written_key(self.view)
                for end in ends_written:
                    tx.hsetnx(written_key, str(end), str(now_ms))
                tx.expire(written_key, WRITTEN_TTL_S)
            tx.execute()
        return WriteResult(len(records), written, stale)
