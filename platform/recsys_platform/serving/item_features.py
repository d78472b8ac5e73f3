"""Request-sized item features: the candidates a request has, not a snapshot of the catalog.

- :class:`ItemFeatureCache`: the features of the <= ``serving.candidates`` items of one
  request, from ONE pipelined ``HMGET`` of Feast's Redis layout for the items it does not hold
  (:func:`redis_item_fetch`; Feast's ``get_online_features`` for other online stores,
  :func:`feast_item_fetch`), behind a bounded LRU whose entries live ``ttl_s``: an item whose
  features change in Redis is served with the new values within ``ttl_s``. The ranker's
  numeric inputs and the diversity metadata (``creator_id``, ``category``) come from the same
  read (:class:`ItemRows`).
- :class:`ColdStartLists`: trending, fresh and popular, read from the small sorted sets the
  pipelines keep (:mod:`recsys_pipelines.cold_start`) every ``ttl_s``; ``O(list)`` per refresh.

Nothing here reads the whole catalog; a replica's item memory is the LRU's ``capacity`` rows.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd

from recsys_core.features import ITEM_KEY
from recsys_pipelines.cold_start import LIST_NAMES, LIST_SIZE
from recsys_platform.serving.online_features import (
    ITEM_VIEWS,
    RedisHashReader,
    feature_refs,
)

logger = logging.getLogger(__name__)

# ids -> one row per id: (value, its number) per feature, (None, 0.0) where absent
Fetch = Callable[[Sequence[str]], list[tuple[tuple[Any, float], ...]]]
_ABSENT: tuple[Any, float] = (None, 0.0)
_META = ("creator_id", "category")


def _number(value: Any) -> float:
    """``pd.to_numeric(errors="coerce").fillna(0)`` of one value."""
    if value is None or isinstance(value, list | tuple | bool):
        return 0.0
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0.0
    return 0.0 if number != number else number


_DOUBLE = struct.Struct("<d")


def _varint(blob: bytes) -> int:
    value = shift = 0
    for byte in blob[1:]:
        value |= (byte & 0x7F) << shift
        shift += 7
    return value - (1 << 64) if value >= 1 << 63 else value


@lru_cache(maxsize=262_144)
def _decode(blob: bytes | None) -> tuple[Any, float]:
    """One serialized Feast value -> (its Python value, its number); counts and ids repeat, so
    each distinct blob is decoded once. ``double_val`` and ``int64_val`` are read directly,
    every other type through Feast's own type map (same values: the serving tests compare
    with ``get_online_features``)."""
    if not blob:
        return _ABSENT
    if len(blob) == 9 and blob[0] == 0x29:  # field 5 (double_val), fixed64
        number = _DOUBLE.unpack_from(blob, 1)[0]
        return number, 0.0 if number != number else number
    if blob[0] == 0x20 and blob[-1] < 0x80 and all(b >= 0x80 for b in blob[1:-1]):
        value = _varint(blob)  # field 4 (int64_val), one varint
        return value, float(value)
    from feast.protos.feast.types.Value_pb2 import Value
    from feast.type_map import feast_value_type_to_python_type

    proto = Value()
    proto.ParseFromString(blob)
    value = feast_value_type_to_python_type(proto)
    return value, _number(value)


@dataclass(frozen=True)
class _Entry:
    expires: float
    values: tuple[Any, ...]  # in the cache's ``names`` order, None where absent
    numbers: np.ndarray  # (len(names),) float64: ``_number`` of each value
    meta: tuple[str, str]  # (creator_id, category), "" where absent


class _Metadata(Mapping[str, tuple[str, str]]):
    """``item -> (creator_id, category)`` of one request's rows, looked up only for the items
    diversity actually reaches (k plus the skipped ones), never built for all 500."""

    def __init__(self, rows: ItemRows) -> None:
        self._rows = rows

    def __getitem__(self, item_id: str) -> tuple[str, str]:
        entry = self._rows.entry(item_id)
        if entry is None:
            raise KeyError(item_id)
        return entry.meta

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows.by_id)

    def __len__(self) -> int:
        return len(self._rows.by_id)


class ItemRows:
    """The features of one request's candidates (a read-only view of cache entries, aligned
    with the ids they were read for).

    Example:
        >>> rows = cache.rows(["i1", "i2"])
        >>> rows.metadata["i1"]  # (creator_id, category)
        >>> rows.numeric(["i1", "i2"], ("item_ctr_7d",))  # (2, 1) raw floats
    """

    def __init__(self, names: tuple[str, ...], ids: Sequence[str],
                 entries: Sequence[_Entry | None]) -> None:
        self.names = names
        self._ids, self._entries = ids, entries
        self._by_id: dict[str, _Entry] | None = None
        self.metadata: Mapping[str, tuple[str, str]] = _Metadata(self)

    @classmethod
    def empty(cls) -> ItemRows:
        return cls((), [], [])

    def __len__(self) -> int:
        return len(self.by_id)

    @property
    def by_id(self) -> dict[str, _Entry]:
        if self._by_id is None:
            self._by_id = {i: e for i, e in zip(self._ids, self._entries, strict=True)
                           if e is not None}
        return self._by_id

    def entry(self, item_id: str) -> _Entry | None:
        return self.by_id.get(item_id)

    def values(self, item_id: str) -> dict[str, Any]:
        """One item's features (absent ones left out); ``{}`` for an item not read."""
        entry = self.entry(item_id)
        if entry is None:
            return {}
        return {n: v for n, v in zip(self.names, entry.values, strict=True) if v is not None}

    def numeric(self, item_ids: Sequence[str], names: Sequence[str]) -> np.ndarray:
        """(n, len(names)) float64 of the named features, 0 where absent or not numeric."""
        column = {n: i for i, n in enumerate(self.names)}
        cols = np.array([column.get(n, -1) for n in names], dtype=np.int64)
        out = np.zeros((len(item_ids), len(names)), dtype=np.float64)
        if not len(item_ids) or not (cols >= 0).any():
            return out
        if list(item_ids) == list(self._ids):  # the request's own order: no id lookups
            entries: Sequence[_Entry | None] = self._entries
        else:
            entries = [self.entry(i) for i in item_ids]
        zeros = np.zeros(len(self.names))
        # concatenate + reshape: ~8x faster than np.stack for 500 short rows
        table = np.concatenate([e.numbers if e is not None else zeros for e in entries]
                               ).reshape(len(entries), len(self.names))
        known = cols >= 0
        out[:, known] = table[:, cols[known]]
        return out

    def frame(self, item_ids: Sequence[str]) -> pd.DataFrame:
        """Rows of ``item_ids`` indexed by ``item_id`` (missing items: NaN rows)."""
        data = [list(e.values) if (e := self.entry(i)) is not None else [None] * len(self.names)
                for i in item_ids]
        return pd.DataFrame(data, columns=list(self.names),
                            index=pd.Index(list(item_ids), name=ITEM_KEY))


class ItemReadError(Exception):
    """The item read failed; ``rows`` holds what the cache still had (stale rows included)."""

    def __init__(self, rows: ItemRows, cause: BaseException) -> None:
        super().__init__(f"item feature read failed: {type(cause).__name__}: {cause}")
        self.rows = rows


class ItemFeatureCache:
    """A bounded LRU of item feature rows in front of one pipelined read per request.

    A row is served for at most ``ttl_s``; when the cache is full, the rows read longest ago
    are dropped first. Rows a request uses after ``refresh_after`` x
    ``ttl_s`` are still served, and re-read by a background thread (one pipelined read of
    every such row at a time), so items requests keep using never expire on the request path;
    only items the cache does not hold (or let expire) are read by the request itself.

    Args:
        fetch: Reads the rows of the ids it gets (one round trip; raises on failure).
        names: The feature names of ``fetch``'s rows, in order.
        ttl_s: How long a row is served at most before it is read again.
        capacity: Rows kept at most.
        refresh_after: Fraction of ``ttl_s`` after which a used row is re-read in the
            background (>= 1: never, rows are only read on the request path).
    """

    def __init__(self, fetch: Fetch, names: Sequence[str], ttl_s: float = 30.0,
                 capacity: int = 100_000, clock: Callable[[], float] = time.monotonic,
                 refresh_after: float = 0.5) -> None:
        if capacity < 1 or ttl_s <= 0:
            raise ValueError(f"item cache needs capacity >= 1 and ttl_s > 0, got {capacity}, "
                             f"{ttl_s}")
        self.names = tuple(names)
        self._fetch, self._ttl_s, self._capacity, self._clock = fetch, ttl_s, capacity, clock
        self._refresh_s = ttl_s * (1.0 - refresh_after) if refresh_after < 1 else -1.0
        self._entries: dict[str, _Entry] = {}  # insertion order: oldest read first
        self._lock = threading.Lock()
        self._due: set[str] = set()  # rows to re-read in the background
        self._down_until = 0.0  # no reads before this (clock) time: the last one failed
        self.retry_after_s = 1.0
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        meta = [self.names.index(n) if n in self.names else -1 for n in _META]
        self._meta_cols = meta
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _entry(self, row: Sequence[tuple[Any, float]], expires: float) -> _Entry:
        values, numbers = zip(*row, strict=True) if row else ((), ())
        creator, category = (values[c] if c >= 0 else None for c in self._meta_cols)
        return _Entry(expires, values, np.array(numbers, dtype=np.float64),
                      ("" if creator is None else str(creator),
                       "" if category is None else str(category)))

    def _store(self, ids: list[str]) -> dict[str, _Entry]:
        fetched = self._fetch(ids)
        expires = self._clock() + self._ttl_s
        new = {item: self._entry(row, expires) for item, row in zip(ids, fetched, strict=True)}
        with self._lock:
            entries = self._entries
            for item, entry in new.items():
                entries.pop(item, None)  # re-inserted last: eviction is oldest-read first
                entries[item] = entry
            while len(entries) > self._capacity:
                del entries[next(iter(entries))]
        return new

    def rows(self, item_ids: Sequence[str]) -> ItemRows:
        """The rows of ``item_ids`` (absent items: rows of ``None``).

        Raises:
            ItemReadError: The read of the items the cache does not hold failed, or failed
                less than ``retry_after_s`` ago (then Redis is not tried: a dead Redis costs
                one timeout per ``retry_after_s``, not one per request). It carries the rows
                the cache still has, expired ones included (stale beats nothing).
        """
        now = self._clock()
        ids = list(item_ids)
        got: list[_Entry | None] = list(map(self._entries.get, ids))  # reads take no lock
        missing: list[str] = []
        refresh_before = now + self._refresh_s
        due = []
        for item, entry in zip(ids, got, strict=True):
            if entry is None or entry.expires <= now:
                missing.append(item)
            elif entry.expires < refresh_before:
                due.append(item)
        if due:
            with self._lock:
                self._due.update(due)
            self._wake_refresher()
        self.misses += len(missing)
        self.hits += len(ids) - len(missing)
        if missing:
            if now < self._down_until:
                raise ItemReadError(ItemRows(self.names, ids, got),
                                    RuntimeError("item reads paused after a failure"))
            try:
                new = self._store(list(dict.fromkeys(missing)))
            except Exception as exc:
                self._down_until = self._clock() + self.retry_after_s
                raise ItemReadError(ItemRows(self.names, ids, got), exc) from exc
            got = [new.get(i, e) for i, e in zip(ids, got, strict=True)]
        return ItemRows(self.names, ids, got)

    def refresh_due(self) -> int:
        """Re-reads the rows marked for a background refresh; returns how many."""
        with self._lock:
            ids, self._due = list(self._due), set()
        if self._clock() < self._down_until:
            return 0
        for start in range(0, len(ids), 1_000):
            self._store(ids[start:start + 1_000])
        return len(ids)

    def _wake_refresher(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._refresh_loop, name="item-refresh",
                                            daemon=True)
            self._thread.start()
        self._wake.set()

    def _refresh_loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            try:
                self.refresh_due()
            except Exception as exc:  # the rows expire and are read by requests instead
                logger.warning("background item refresh failed: %s", exc)
            time.sleep(0.05)  # batch the rows that come due meanwhile into one read


def redis_item_fetch(store: Any, url: str, timeout_s: float, views: Sequence[str] = ITEM_VIEWS
                     ) -> tuple[Fetch, list[str]]:
    """A :data:`Fetch` of the item ``views``' features from Feast's Redis layout (ONE pipeline
    for up to 1,000 items), and its feature names."""
    reader = RedisHashReader(store, url, timeout_s, ITEM_KEY, views)

    def fetch(ids: Sequence[str]) -> list[tuple[tuple[Any, float], ...]]:
        raw = reader.fetch([reader.key(i) for i in ids])
        return [tuple(map(_decode, reply)) for reply in raw]  # one C-level pass per item

    return fetch, list(reader.names)


def feast_item_fetch(store: Any, views: Sequence[str] = ITEM_VIEWS) -> tuple[Fetch, list[str]]:
    """A :data:`Fetch` through Feast's ``get_online_features`` (any online store)."""
    refs = feature_refs(store, views)
    names = [r.split(":", 1)[1] for r in refs]

    def fetch(ids: Sequence[str]) -> list[tuple[tuple[Any, float], ...]]:
        values = store.get_online_features(
            features=refs, entity_rows=[{ITEM_KEY: i} for i in ids]).to_dict()
        rows = zip(*(values[n] for n in names), strict=True) if names else (() for _ in ids)
        return [tuple((v, _number(v)) for v in row) for row in rows]

    return fetch, names


class ColdStartLists:
    """Trending, fresh and popular, re-read every ``ttl_s`` from the pipelines' sorted sets.

    A failed read keeps the previous lists. ``on_refresh`` callbacks run with the new lists
    before they are published (the factory indexes the new items among them).
    """

    def __init__(self, read: Callable[[], dict[str, list[str]]], ttl_s: float = 30.0) -> None:
        self._read, self._ttl_s = read, ttl_s
        self._lists: dict[str, list[str]] = {name: [] for name in LIST_NAMES}
        self._loaded_at: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_refresh: list[Callable[[dict[str, list[str]]], None]] = []

    @property
    def lists(self) -> dict[str, list[str]]:
        return self._lists

    @property
    def has_features(self) -> bool:
        """False when the pipelines have written no list (online store empty or flushed)."""
        return any(self._lists.values())

    def refresh(self) -> bool:
        try:
            lists = {name: list(members)[:LIST_SIZE] for name, members in self._read().items()}
        except Exception as exc:
            logger.warning("cold-start list refresh failed, keeping the old lists: %s", exc)
            return False
        for callback in self.on_refresh:
            try:
                callback(lists)
            except Exception as exc:
                logger.warning("cold-start list callback failed: %s", exc)
        self._lists = {name: lists.get(name, []) for name in LIST_NAMES}  # atomic swap
        self._loaded_at = time.monotonic()
        return True

    def age_s(self) -> float | None:
        return None if self._loaded_at is None else time.monotonic() - self._loaded_at

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.wait(self._ttl_s):
                self.refresh()

        self._thread = threading.Thread(target=loop, name="cold-start-lists", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()


class FeastFeatureSource:
    """The serving :class:`~recsys_platform.serving.recommender.FeatureSource` over Feast:
    one user's features, its candidates' item rows and the cold-start lists."""

    def __init__(self, user_reader: Callable[[str], dict[str, Any] | None],
                 items: ItemFeatureCache, lists: ColdStartLists) -> None:
        self._user = user_reader
        self.items = items
        self.lists = lists

    def user_features(self, user_id: str) -> dict[str, Any] | None:
        return self._user(user_id)

    def item_rows(self, item_ids: Sequence[str]) -> ItemRows:
        return self.items.rows(item_ids)

    def cold_start_lists(self) -> dict[str, list[str]]:
        return self.lists.lists

    def has_item_features(self) -> bool:
        return self.lists.has_features
