"""Writes every response as impression events to the raw landing area.

Two outputs, both written atomically (a hidden temp name, then a rename):

- ``landing/events/date=YYYY-MM-DD/served-<stamp>-<pid>-<n>.parquet``: impression events in the
  raw event contract, which the ETL ingests and joins with later clicks and watches;
- ``landing/served/date=YYYY-MM-DD/...parquet``: the full response (position, score, source,
  bundle version), and with ``stream_dir`` set, the same impressions as newline-JSON for the
  stream job.

Responses are buffered and written by a flusher thread, never on the request path.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from recsys_pipelines.etl import atomic_write_table
from recsys_platform.atomic import atomic_write_lines
from recsys_platform.contracts import RAW_EVENT_SCHEMA

logger = logging.getLogger(__name__)

SERVED_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string()),
        pa.field("user_id", pa.string()),
        pa.field("item_id", pa.string()),
        pa.field("position", pa.int32()),
        pa.field("score", pa.float64()),
        pa.field("source", pa.string()),
        pa.field("bundle_version", pa.string()),
        pa.field("served_at", pa.timestamp("ms", tz="UTC")),
    ]
)


_Record = tuple[str, str, list[tuple[str, float, str]], str | None, str, str, datetime]


def _atomic_parquet(rows: list[dict[str, Any]], schema: pa.Schema, path: Path) -> None:
    atomic_write_table(pa.Table.from_pylist(rows, schema=schema), path)


class ImpressionLogger:
    """Buffers served responses and writes them as impression events, off the request path.

    :meth:`log` only appends one record to a buffer (microseconds); the flusher thread started
    by :meth:`start` expands records into rows and writes the files every ``interval_s`` or as
    soon as ``flush_every`` rows are waiting. Without a started thread, :meth:`log` flushes
    inline when the buffer is full.
    """

    def __init__(self, landing_dir: Path, stream_dir: Path | None = None,
                 flush_every: int = 1000) -> None:
        self._landing = landing_dir
        self._stream = stream_dir
        self._flush_every = flush_every
        self._served: list[_Record] = []
        self._rows = 0
        self._lock = threading.Lock()
        self._files = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, interval_s: float = 5.0) -> None:
        """Flushes in a daemon thread every ``interval_s`` (or when full) until :meth:`stop`."""

        def loop() -> None:
            while not self._stop.is_set():
                self._wake.wait(interval_s)
                self._wake.clear()
                try:
                    self.flush()
                except OSError as exc:  # rows stay buffered for the next try
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
            bundle_version: str | None, surface: str, device: str) -> None:
        """Records one response: ``items`` are ``(item_id, score, source)`` in served order."""
        record = (request_id, user_id, items, bundle_version, surface, device, datetime.now(UTC))
        with self._lock:
            self._served.append(record)
            self._rows += len(items)
            full = self._rows >= self._flush_every
        if full:
            if self._thread is not None and self._thread.is_alive():
                self._wake.set()
            else:
                self.flush()

    def flush(self) -> int:
        """Writes buffered rows; returns how many were written."""
        with self._lock:
            records, self._served, self._rows = self._served, [], 0
            self._files += 1
            n = self._files
        rows = [
            {"request_id": request_id, "user_id": user_id, "item_id": item_id, "position": pos,
             "score": score, "source": source, "bundle_version": version, "served_at": now,
             "surface": surface, "device": device}
            for request_id, user_id, items, version, surface, device, now in records
            for pos, (item_id, score, source) in enumerate(items)
        ]
        if not rows:
            return 0
        try:
            self._write(rows, f"{int(time.time() * 1000)}-{os.getpid()}-{n}")
        except Exception:
            with self._lock:  # nothing is lost: the records go back to the buffer
                self._served[:0] = records
                self._rows += len(rows)
            raise
        return len(rows)

    def _write(self, rows: list[dict[str, Any]], stamp: str) -> None:
        by_day: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_day.setdefault(row["served_at"].date().isoformat(), []).append(row)
        for day, day_rows in by_day.items():
            events = [self._event(r) for r in day_rows]
            _atomic_parquet(events, RAW_EVENT_SCHEMA,
                            self._landing / "events" / f"date={day}" / f"served-{stamp}.parquet")
            _atomic_parquet(day_rows, SERVED_SCHEMA,
                            self._landing / "served" / f"date={day}" / f"served-{stamp}.parquet")
            if self._stream is not None:
                self._write_jsonl(events, self._stream / f"served-{day}-{stamp}.jsonl")

    @staticmethod
    def _event(row: dict[str, Any]) -> dict[str, Any]:
        return {
            "event_id": f"{row['request_id']}-{row['position']}",
            "event_time": row["served_at"].isoformat(timespec="milliseconds").replace(
                "+00:00", "Z"),
            "user_id": row["user_id"],
            "item_id": row["item_id"],
            "event_type": "impression",
            "watch_time_ms": None,
            "item_duration_ms": None,
            "surface": row["surface"],
            "device": row["device"],
            "request_id": row["request_id"],
            "model_version": row["bundle_version"],
        }

    @staticmethod
    def _write_jsonl(events: list[dict[str, Any]], path: Path) -> None:
        atomic_write_lines(path, (json.dumps(event) + "\n" for event in events))
