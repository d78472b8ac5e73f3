"""Writes every response as impression events to the raw landing area.

Two outputs, both written atomically (a hidden temp name, then a rename):

- ``landing/events/date=YYYY-MM-DD/served-<stamp>-<pid>-<n>.parquet``: impression events in the
  raw event contract, which the ETL ingests and joins with later clicks and watches;
- ``landing/served/date=YYYY-MM-DD/...parquet`` (``recsys_core.contracts.SERVED_SCHEMA``): the
  full response (position, score, source, bundle version, and per request the online
  experiment and arm it was served in, its degraded stages, its latency and the user features
  and history the model was given, which the training-set builder uses as served), and with
  ``stream_dir`` set, the same impressions as newline-JSON for the stream job.

A shadow experiment's rankings, which no user saw, go through a second logger with
``folder="shadow", events=False``: ``landing/shadow/`` only, never impression events.

Responses are buffered and written by a flusher thread, never on the request path. With
``wal_dir`` set, :meth:`ImpressionLogger.log` first appends the response as one JSON line to a
write-ahead segment (one ``write`` per response, before the response leaves), so a process
killed with ``kill -9`` loses nothing it answered: the flusher seals the segment, writes its
rows as Parquet and only then deletes it, and any logger starting on the same folder turns the
segments a dead process left into Parquet (:meth:`ImpressionLogger.recover`). A segment is
held with an exclusive ``flock`` for as long as its owner lives, so live replicas sharing the
folder never take each other's. (Durable against the process dying, not the machine: the
lines sit in the OS page cache until the flusher writes the Parquet.)
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import pyarrow as pa

from recsys_core.atomic import atomic_write_lines
from recsys_core.contracts import RAW_EVENT_SCHEMA, SERVED_SCHEMA
from recsys_core.features import USER_HISTORY
from recsys_pipelines.etl import atomic_write_table

logger = logging.getLogger(__name__)

_REQUEST_FIELDS = ("experiment_id", "arm", "degraded", "latency_ms", "user_features",
                   USER_HISTORY)

# (request_id, user_id, items, version, surface, device, served_at, per-request fields)
_Record = tuple[str, str, list[tuple[str, float, str]], str | None, str, str, datetime,
                dict[str, Any]]


def _wal_line(record: _Record) -> bytes:
    request_id, user_id, items, version, surface, device, now, extra = record
    return (json.dumps([request_id, user_id, items, version, surface, device,
                        now.isoformat(), extra], separators=(",", ":")) + "\n").encode()


def _wal_record(line: bytes) -> _Record:
    request_id, user_id, items, version, surface, device, now, *extra = json.loads(line)
    return (request_id, user_id, [(i, float(s), src) for i, s, src in items], version, surface,
            device, datetime.fromisoformat(now), extra[0] if extra else {})


def _served_columns(records: list[_Record]) -> dict[str, list[Any]]:
    """``SERVED_SCHEMA``'s columns of ``records``: one row per served item."""
    columns: dict[str, list[Any]] = {name: [] for name in SERVED_SCHEMA.names}
    per_request = ("request_id", "user_id", "bundle_version", "served_at", *_REQUEST_FIELDS)
    for request_id, user_id, items, version, _surface, _device, now, extra in records:
        n = len(items)
        ids, scores, sources = zip(*items, strict=True)
        columns["item_id"].extend(ids)
        columns["position"].extend(range(n))
        columns["score"].extend(scores)
        columns["source"].extend(sources)
        values = (request_id, user_id, version, now, *(extra.get(k) for k in _REQUEST_FIELDS))
        for name, value in zip(per_request, values, strict=True):
            columns[name].extend([value] * n)
    return columns


def _event_columns(records: list[_Record]) -> dict[str, list[Any]]:
    """``RAW_EVENT_SCHEMA``'s columns of ``records``: one impression event per served item."""
    columns: dict[str, list[Any]] = {name: [] for name in RAW_EVENT_SCHEMA.names}
    for request_id, user_id, items, version, surface, device, now, _extra in records:
        n = len(items)
        columns["event_id"].extend([f"{request_id}-{pos}" for pos in range(n)])
        columns["item_id"].extend([item for item, _, _ in items])
        event_time = now.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        for name, value in (("event_time", event_time), ("user_id", user_id),
                            ("event_type", "impression"), ("watch_time_ms", None),
                            ("item_duration_ms", None), ("surface", surface),
                            ("device", device), ("request_id", request_id),
                            ("model_version", version)):
            columns[name].extend([value] * n)
    return columns


class _Segment:
    """One write-ahead file, exclusively locked by its owner until it is deleted."""

    def __init__(self, path: Path, handle: IO[bytes]) -> None:
        self.path, self.handle = path, handle

    @classmethod
    def create(cls, folder: Path, owner: str, seq: int) -> _Segment:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"wal-{owner}-{seq:06d}.jsonl"
        handle = open(path, "ab", buffering=0)  # noqa: SIM115 - held until delete()
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return cls(path, handle)

    @classmethod
    def take(cls, path: Path) -> _Segment | None:
        """The segment of a dead owner (None while its owner still holds the lock)."""
        try:
            handle = open(path, "rb+", buffering=0)  # noqa: SIM115
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return None
        return cls(path, handle)

    def append(self, line: bytes) -> None:
        self.handle.write(line)  # unbuffered: one write(2), in the OS before the response

    def records(self) -> list[_Record]:
        records = []
        for n, line in enumerate(self.path.read_bytes().splitlines(), start=1):
            try:
                records.append(_wal_record(line))
            except (ValueError, TypeError) as exc:  # a line torn by the kill
                logger.warning("impression WAL %s line %d unreadable, skipped: %s",
                               self.path.name, n, exc)
        return records

    def delete(self) -> None:
        self.path.unlink(missing_ok=True)
        self.handle.close()


class ImpressionLogger:
    """Buffers served responses and writes them as impression events, off the request path.

    :meth:`log` only appends one record to a buffer (microseconds); the flusher thread started
    by :meth:`start` expands records into rows and writes the files every ``interval_s`` or as
    soon as ``flush_every`` rows are waiting. Without a started thread, :meth:`log` flushes
    inline when the buffer is full.
    """

    def __init__(self, landing_dir: Path, stream_dir: Path | None = None,
                 flush_every: int = 1000, wal_dir: Path | None = None,
                 folder: str = "served", events: bool = True) -> None:
        self._landing = landing_dir
        self._folder = folder  # landing/<folder>/ holds the full responses
        self._events = events  # False: no impression events (shadow rankings nobody saw)
        self._stream = stream_dir
        self._flush_every = flush_every
        self._served: list[_Record] = []
        self._rows = 0
        self._lock = threading.Lock()
        self._flushing = threading.Lock()  # one flush (and its segments) at a time
        self._files = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._wal_dir = wal_dir
        self._owner = uuid.uuid4().hex[:12]
        self._seq = 0
        self._segment: _Segment | None = None
        self._sealed: list[_Segment] = []  # their records are buffered, not yet in Parquet
        self.wal_errors = 0  # appends that failed (the response was only buffered in memory)

    def _new_segment(self) -> _Segment | None:
        if self._wal_dir is None:
            return None
        self._seq += 1
        return _Segment.create(self._wal_dir, self._owner, self._seq)

    def recover(self) -> int:
        """Writes the write-ahead segments of dead loggers as Parquet; returns the rows.

        Segments whose owner is alive (it holds their lock) are left alone.
        """
        if self._wal_dir is None or not self._wal_dir.is_dir():
            return 0
        rows = 0
        with self._flushing:
            for path in sorted(self._wal_dir.glob("wal-*.jsonl")):
                if path.name.startswith(f"wal-{self._owner}-"):
                    continue
                segment = _Segment.take(path)
                if segment is None:
                    continue
                try:
                    records = segment.records()
                    if records:
                        rows += self._write_records(records)
                except Exception:
                    segment.handle.close()  # unlocked: the next recovery tries again
                    raise
                segment.delete()
                logger.warning("recovered %d responses a stopped replica had not flushed (%s)",
                               len(records), path.name)
        return rows

    def start(self, interval_s: float = 5.0, recover_every: int = 12) -> None:
        """Flushes in a daemon thread every ``interval_s`` (or when full) until :meth:`stop`.

        First, and then every ``recover_every`` flushes, writes what dead loggers left in the
        write-ahead folder (:meth:`recover`).
        """
        self.recover()

        def loop() -> None:
            n = 0
            while not self._stop.is_set():
                self._wake.wait(interval_s)
                self._wake.clear()
                n += 1
                try:
                    self.flush()
                    if n % recover_every == 0:
                        self.recover()
                except OSError as exc:  # rows stay buffered (and in the WAL) for the next try
                    logger.error("impression log flush failed: %s", exc)

        self._thread = threading.Thread(target=loop, name="impression-log", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.flush()

    def log(self, request_id: str, user_id: str, items: list[tuple[str, float, str]],
            bundle_version: str | None, surface: str, device: str, *,
            experiment_id: str | None = None, arm: str | None = None, degraded: str = "",
            latency_ms: float | None = None, user_features: str | None = None,
            user_history: str | None = None) -> None:
        """Records one response: ``items`` are ``(item_id, score, source)`` in served order;
        ``experiment_id``/``arm`` name the online experiment arm that served it;
        ``user_features``/``user_history`` (JSON) what the model was given for the user."""
        extra = {k: v for k, v in (("experiment_id", experiment_id), ("arm", arm),
                                   ("degraded", degraded), ("latency_ms", latency_ms),
                                   ("user_features", user_features),
                                   (USER_HISTORY, user_history))
                 if v not in (None, "")}
        record = (request_id, user_id, items, bundle_version, surface, device,
                  datetime.now(UTC), extra)
        with self._lock:
            if self._wal_dir is not None:
                try:
                    if self._segment is None:
                        self._segment = self._new_segment()
                    assert self._segment is not None
                    self._segment.append(_wal_line(record))
                except OSError as exc:  # never fail the response: it stays in the buffer
                    self.wal_errors += 1
                    logger.error("impression WAL append failed (response kept in memory "
                                 "only): %s", exc)
            self._served.append(record)
            self._rows += len(items)
            full = self._rows >= self._flush_every
        if full:
            if self._thread is not None and self._thread.is_alive():
                self._wake.set()
            else:
                self.flush()

    def flush(self) -> int:
        """Writes buffered rows; returns how many were written.

        The write-ahead segment of the flushed records is sealed with them and deleted only
        once their Parquet files are in place; on failure both stay for the next flush.
        """
        with self._flushing:
            with self._lock:
                records, self._served, self._rows = self._served, [], 0
                if self._segment is not None:
                    self._sealed.append(self._segment)
                    self._segment = None  # the next log() opens a new one
                sealed, self._sealed = self._sealed, []
            try:
                written = self._write_records(records)
            except Exception:
                with self._lock:  # nothing is lost: the records go back to the buffer
                    self._served[:0] = records
                    self._rows += sum(len(r[2]) for r in records)
                    self._sealed[:0] = sealed
                raise
            for segment in sealed:
                segment.delete()
            return written

    def _write_records(self, records: list[_Record]) -> int:
        with self._lock:
            self._files += 1
            n = self._files
        by_day: dict[str, list[_Record]] = {}
        for record in records:
            if record[2]:  # a response with no items has no rows
                by_day.setdefault(record[6].date().isoformat(), []).append(record)
        stamp = f"{int(time.time() * 1000)}-{os.getpid()}-{self._owner}-{n}"
        rows = 0
        for day, day_records in by_day.items():
            rows += self._write_day(day, day_records, stamp)
        return rows

    def _write_day(self, day: str, records: list[_Record], stamp: str) -> int:
        """Writes one day's rows column by column (a flusher thread holds the replica's GIL
        while it builds them: per-row dicts took ~3x as long, and every request admitted
        meanwhile waited for it)."""
        served = _served_columns(records)
        if self._events:  # first: a failed write below re-sends events, which the ETL dedupes
            events = _event_columns(records)
            atomic_write_table(pa.Table.from_pydict(events, schema=RAW_EVENT_SCHEMA),
                               self._landing / "events" / f"date={day}"
                               / f"served-{stamp}.parquet")
        atomic_write_table(pa.Table.from_pydict(served, schema=SERVED_SCHEMA),
                           self._landing / self._folder / f"date={day}"
                           / f"{self._folder}-{stamp}.parquet")
        if self._events and self._stream is not None:
            names = list(events)
            self._write_jsonl([dict(zip(names, row, strict=True))
                               for row in zip(*events.values(), strict=True)],
                              self._stream / f"served-{day}-{stamp}.jsonl")
        return len(served["item_id"])

    @staticmethod
    def _write_jsonl(events: list[dict[str, Any]], path: Path) -> None:
        atomic_write_lines(path, (json.dumps(event) + "\n" for event in events))
