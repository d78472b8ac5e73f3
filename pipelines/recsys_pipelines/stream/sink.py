"""The batched Redis writer behind the stream job (plain Python, testable without Flink).

Each call gets a batch of sink rows of one feature group, in arrival order: window rows (one
per entity and window end) and, for late events within the allowed lateness, one row per
event (``late_event_id`` set). It writes them in at most two round trips:

1. for entities not seen since the job started, read what Redis holds: the stored window end
   (``_ts:<view>``), the recent items (users) and the late events kept for the entity;
2. one pipeline that writes, per entity, only its newest window row of the batch (last writer
   wins per entity and window end: a replayed window rewrites the same bytes, an older one is
   skipped), plus the recent items, the late events and the job's counters.

Late events within the allowed lateness are kept per entity (a Redis hash keyed by
``event_id``, so a replay cannot add one twice, expiring after the longest window plus the
lateness); every window row written afterwards adds the kept events that its windows cover
(``window_end - w < event_time <= window_end``), and a late event also rewrites the entity's
stored row at once when that row's windows cover it (known after a restart only from the
entity's next window on).

Recent items: the newest :data:`HISTORY_LENGTH` *distinct* items the user engaged with, newest
first (ties: newer ``event_id`` first), like the batch ``user_history``. They are kept per user
as ``time_ms|event_id|item_id`` entries (a Redis string, idempotent to rewrite); the feature of
a window is the entries with ``time <= window_end``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import redis

from recsys_core import online_layout
from recsys_core.features import HISTORY_LENGTH, ITEM_TRENDING, USER_RECENT_ITEMS, ratio
from recsys_pipelines import cold_start
from recsys_pipelines.stream.sql import (
    EVENTS_COLUMN,
    LATE_EVENT_COLUMN,
    RECENT_COLUMN,
    RECENT_FIELD_SEP,
    RECENT_SEP,
    WindowPlan,
)

logger = logging.getLogger(__name__)

WRITTEN_TTL_S = 86_400  # how long the per-window first-write times are kept (freshness)
CACHE_ENTITIES = 200_000  # entities whose Redis state is remembered between batches

Entry = tuple[int, str, str]  # (event epoch ms, event_id, item_id) of one engagement
LateEvent = tuple[int, tuple[int, ...]]  # (event epoch ms, contribution per aggregate)


@dataclass(frozen=True)
class SinkConfig:
    """Where and how the sink writes. Plain values: it is pickled into the Flink worker."""

    redis_url: str
    project: str  # Feast project: the suffix of every entity key
    key_prefix: str  # prefix of the job's own keys (recent items, late events, counters)
    serialization_version: int = online_layout.SERIALIZATION_VERSION
    allowed_lateness_ms: int = 300_000  # how long after its windows a late event is kept
    run_id: str = ""  # one per submitted job: its writers of a group share their memory

    @property
    def metrics_key(self) -> str:
        return f"{self.key_prefix}:stream:metrics"

    def written_key(self, view: str) -> str:
        return f"{self.key_prefix}:stream:written:{view}"

    def recent_key(self, user_id: str) -> str:
        return f"{self.key_prefix}:stream:recent-items:{user_id}"

    def late_key(self, view: str, entity_id: str) -> str:
        return f"{self.key_prefix}:stream:late:{view}:{entity_id}"


@dataclass(frozen=True)
class WriteResult:
    rows: int  # sink rows received
    written: int  # entity rows written to the online store
    stale: int  # window rows older than what the store holds (skipped)
    late: int = 0  # late events applied


@dataclass
class _Entity:
    """What the writer knows of one entity (read from Redis once, then kept up to date)."""

    end_ms: int  # newest window end in the store (0: none)
    pure: tuple[int, ...] | None = None  # that row's window aggregates, late events excluded
    recent: list[Entry] = field(default_factory=list)  # newest first, distinct items
    late: dict[str, LateEvent] = field(default_factory=dict)  # event_id -> event


class _Shared:
    """The memory of one group's writers in one job run. Flink plans the window rows and the
    late rows of a group as two Python operators (the UDF call is pushed below the UNION);
    in thread mode both run in the TaskManager's one interpreter and share this, under a
    lock, so that a late event meets the window values it must be added to."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entities: dict[str, _Entity] = {}
        self.users = 0


_SHARED: dict[tuple[str, str, str, str], _Shared] = {}
_SHARED_LOCK = threading.Lock()


def _event_ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


def parse_recent(text: str | None) -> list[Entry]:
    """``time|event_id|item_id;...`` (ISO times, from the SQL) -> entries."""
    if not text:
        return []
    out = []
    for member in text.split(RECENT_SEP):
        if member:
            iso, event_id, item = member.split(RECENT_FIELD_SEP, 2)
            out.append((_event_ms(iso), event_id, item))
    return out


def merge_recent(kept: Sequence[Entry], new: Iterable[Entry]) -> list[Entry]:
    """The newest engagement of each item, newest first (ties: newer ``event_id`` first),
    at most :data:`HISTORY_LENGTH` items: the batch ``user_history`` rule."""
    latest: dict[str, Entry] = {}
    for entry in (*kept, *new):
        seen = latest.get(entry[2])
        if seen is None or entry[:2] > seen[:2]:
            latest[entry[2]] = entry
    ordered = sorted(latest.values(), key=lambda e: (e[0], e[1]), reverse=True)
    return ordered[:HISTORY_LENGTH]


def items_until(entries: Sequence[Entry], until_ms: int) -> list[str]:
    """Item ids of the kept entries at or before ``until_ms``, newest first."""
    return [item for ms, _, item in entries if ms <= until_ms]


def encode_recent(entries: Sequence[Entry]) -> str:
    return RECENT_SEP.join(f"{ms}{RECENT_FIELD_SEP}{e}{RECENT_FIELD_SEP}{i}"
                           for ms, e, i in entries)


def decode_recent(raw: bytes | None) -> list[Entry]:
    if not raw:
        return []
    out = []
    for member in raw.decode().split(RECENT_SEP):
        ms, event_id, item = member.split(RECENT_FIELD_SEP, 2)
        out.append((int(ms), event_id, item))
    return out


def _encode_late(event: LateEvent) -> str:
    return f"{event[0]}|" + ",".join(str(v) for v in event[1])


def _decode_late(raw: bytes) -> LateEvent:
    ms, values = raw.decode().split("|", 1)
    return int(ms), tuple(int(v) for v in values.split(","))


def _end_ms(values: pd.Series) -> np.ndarray:
    if values.dtype.kind in "iu":
        return values.to_numpy(dtype="int64")
    return pd.to_datetime(values).to_numpy(dtype="datetime64[ms]").astype("int64")


class FeatureWriter:
    """Writes sink rows of one feature group into Feast's Redis layout.

    Example:
        >>> writer = FeatureWriter(SinkConfig(url, "recsys", "recsys"), window_plan(USER_STREAM,
        ...                        recent_items=True))
        >>> writer.write(frame)  # columns: user_id, window_end, aggregates, ..., late_event_id
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
        ms = timedelta(milliseconds=1)
        self.windows_ms = [int(a.window / ms) for a in plan.group.aggregates]
        self.size_ms = int(plan.size / ms)
        index = {n: i for i, n in enumerate(plan.aggregate_names)}
        self.ratio_idx = [(index[r.numerator], index[r.denominator]) for r in plan.group.ratios]
        self.fields = [online_layout.feature_field(self.view, n) for n in self.names]
        self.ts_field = online_layout.timestamp_field(self.view)
        self.late_ttl_s = (self.size_ms + config.allowed_lateness_ms) // 1000 + 3_600
        # The trending view also keeps the trending cold-start list (a small sorted set).
        self._trending = (self.names.index("item_clicks_1h"),
                          self.names.index("item_impressions_1h")) \
            if self.view == ITEM_TRENDING.name else None
        self._pruned_until_ms = 0
        self._keys: dict[str, bytes] = {}
        self._shared_id = (config.redis_url, config.project, config.run_id, self.view)
        with _SHARED_LOCK:
            self._shared = _SHARED.setdefault(self._shared_id, _Shared())
            self._shared.users += 1
        self._entities = self._shared.entities

    def close(self) -> None:
        """Closes the Redis client; the last writer of a run frees the shared memory."""
        self.client.close()
        with _SHARED_LOCK:
            self._shared.users -= 1
            if self._shared.users <= 0:
                _SHARED.pop(self._shared_id, None)

    def _key(self, entity_id: str) -> bytes:
        key = self._keys.get(entity_id)
        if key is None:
            if len(self._keys) > CACHE_ENTITIES:
                self._keys.clear()
            key = online_layout.entity_key(self.plan.key, entity_id, self.config.project,
                                    self.config.serialization_version)
            self._keys[entity_id] = key
        return key

    def _load(self, entity_ids: list[str]) -> None:
        """Reads the Redis state of entities this writer has not seen yet (one round trip)."""
        missing = [e for e in entity_ids if e not in self._entities]
        if not missing:
            return
        if len(self._entities) + len(missing) > CACHE_ENTITIES:
            self._entities.clear()  # forget (late events: applied from the next window on)
        with self.client.pipeline(transaction=False) as pipe:
            for entity in missing:
                pipe.hget(self._key(entity), self.ts_field)  # type: ignore[arg-type]
                pipe.hgetall(self.config.late_key(self.view, entity))
                if self.plan.recent_items:
                    pipe.get(self.config.recent_key(entity))
            replies = pipe.execute()
        step = 3 if self.plan.recent_items else 2
        for i, entity in enumerate(missing):
            ts, late, *rest = replies[i * step:(i + 1) * step]
            self._entities[entity] = _Entity(
                end_ms=online_layout.decode_timestamp_ms(ts),
                late={k.decode(): _decode_late(v) for k, v in late.items()},
                recent=decode_recent(rest[0]) if rest else [],
            )

    def _values(self, state: _Entity, end_ms: int) -> list[Any]:
        """The features of the entity's stored row: window aggregates plus covered late
        events, ratios, recent items."""
        assert state.pure is not None
        values = list(state.pure)
        for ms, contribution in state.late.values():
            for i, w in enumerate(self.windows_ms):
                if end_ms - w < ms <= end_ms:
                    values[i] += contribution[i]
        out: list[Any] = values
        out += [ratio(values[n], values[d]) for n, d in self.ratio_idx]
        if self.plan.recent_items:
            out.append(items_until(state.recent, end_ms))
        return out

    def write(self, frame: pd.DataFrame) -> WriteResult:
        """Writes a batch of sink rows; returns what was written, skipped and applied.

        Args:
            frame: Sink rows in arrival order: the entity key column, ``window_end``
                (timestamp or epoch ms; the event time on late rows), the group's
                aggregates (an event's contribution on late rows), ``events_in_slide``,
                ``recent`` for user groups and ``late_event_id``.
        """
        if frame.empty:
            return WriteResult(0, 0, 0)
        with self._shared.lock:
            return self._write(frame)

    def _write(self, frame: pd.DataFrame) -> WriteResult:
        keys = frame[self.plan.key].astype(str).tolist()
        ends = _end_ms(frame["window_end"]).tolist()
        aggs = list(zip(*(frame[n].fillna(0).astype("int64").tolist()
                          for n in self.plan.aggregate_names), strict=True))
        events = frame[EVENTS_COLUMN].fillna(0).astype("int64").tolist()
        late_ids = frame[LATE_EVENT_COLUMN].tolist() if LATE_EVENT_COLUMN in frame \
            else [None] * len(keys)
        recent = frame[RECENT_COLUMN].tolist() if self.plan.recent_items \
            else [None] * len(keys)
        self._load(list(dict.fromkeys(keys)))

        dirty: set[str] = set()  # entities whose stored row is rewritten
        window_ends: set[int] = set()  # window ends written from window rows
        recent_dirty: set[str] = set()
        late_new: dict[str, dict[str, LateEvent]] = {}
        stale = late_applied = events_in = 0
        for entity, end, agg, n, late_id, members in zip(keys, ends, aggs, events, late_ids,
                                                          recent, strict=True):
            state = self._entities[entity]
            if members:
                state.recent = merge_recent(state.recent, parse_recent(members))
                recent_dirty.add(entity)
            if late_id is not None:  # a late event within the allowed lateness
                late_applied += 1
                if late_id not in state.late:
                    state.late[late_id] = (end, agg)
                    late_new.setdefault(entity, {})[late_id] = (end, agg)
                # The stored row changes if its windows cover the event, or (recent items
                # reach back further than any window) if the event was an engagement.
                if state.pure is not None and end <= state.end_ms and (
                        members or end > state.end_ms - self.size_ms):
                    dirty.add(entity)
                continue
            events_in += n
            if end < state.end_ms:
                stale += 1
                continue
            state.end_ms, state.pure = end, agg
            dirty.add(entity)
            window_ends.add(end)
        self._flush(dirty, recent_dirty, late_new, window_ends,
                    (stale, late_applied, events_in))
        return WriteResult(len(keys), len(dirty), stale, late_applied)

    def _flush(self, dirty: set[str], recent_dirty: set[str],
               late_new: dict[str, dict[str, LateEvent]], window_ends: set[int],
               counts: tuple[int, int, int]) -> None:
        stale, late_applied, events_in = counts
        now_ms = int(time.time() * 1000)
        metrics = self.config.metrics_key
        trending: list[tuple[str, float, int]] = []
        with self.client.pipeline(transaction=False) as pipe:
            for entity in dirty:
                state = self._entities[entity]
                end = state.end_ms
                mapping: dict[str | bytes, bytes] = {
                    self.ts_field: online_layout.encode_timestamp(end)}
                values = self._values(state, end)
                for name_field, value in zip(self.fields, values, strict=True):
                    mapping[name_field] = online_layout.encode_value(value)
                if self._trending is not None:
                    clicks, impressions = (values[i] for i in self._trending)
                    trending.append((entity, cold_start.trending_score(clicks, impressions),
                                     end))
                pipe.hset(self._key(entity), mapping=mapping)  # type: ignore[arg-type]
                # Late events older than every future window are no longer needed.
                for event_id in [k for k, (ms, _) in state.late.items()
                                 if ms <= end - self.size_ms]:
                    del state.late[event_id]
            if trending:
                cold_start.trending_updates(pipe, self.config.key_prefix, self.config.project,
                                            trending)
            for entity in recent_dirty:
                pipe.set(self.config.recent_key(entity),
                         encode_recent(self._entities[entity].recent))
            for entity, added in late_new.items():
                key = self.config.late_key(self.view, entity)
                pipe.hset(key, mapping={k: _encode_late(v) for k, v in added.items()})
                pipe.expire(key, self.late_ttl_s)
            pipe.hincrby(metrics, f"{self.view}:rows_written", len(dirty))
            pipe.hincrby(metrics, f"{self.view}:rows_stale", stale)
            if late_applied:
                pipe.hincrby(metrics, f"{self.view}:late_applied", late_applied)
            if events_in:
                pipe.hincrby(metrics, f"{self.view}:events_in", events_in)
            if window_ends:
                newest = max(window_ends)
                pipe.hset(metrics, mapping={
                    f"{self.view}:last_write_ms": now_ms,
                    f"{self.view}:last_window_end_ms": newest,
                    f"{self.view}:event_time_lag_ms": now_ms - newest,
                })
                written_key = self.config.written_key(self.view)
                for end in window_ends:
                    pipe.hsetnx(written_key, str(end), str(now_ms))
                pipe.expire(written_key, WRITTEN_TTL_S)
            pipe.execute()
        if self._trending is not None and window_ends and max(window_ends) > \
                self._pruned_until_ms:
            self._pruned_until_ms = max(window_ends)
            cold_start.prune_trending(self.client, self.config.key_prefix, self.config.project,
                                      self._pruned_until_ms)
