"""The impression log's flush builds its Parquet column by column: the same tables as one dict
per row (the code it replaced, kept here as the reference), across days, empty responses,
per-request fields and the stream's JSON lines."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from recsys_core.contracts import RAW_EVENT_SCHEMA, SERVED_SCHEMA
from recsys_platform.serving.impressions import _REQUEST_FIELDS, ImpressionLogger

DAY = datetime(2026, 12, 6, 23, 59, 59, 123456, tzinfo=UTC)


def reference_rows(records: list[Any]) -> list[dict[str, Any]]:
    """One dict per served item, as the flush built them before."""
    return [
        {"request_id": request_id, "user_id": user_id, "item_id": item_id, "position": pos,
         "score": score, "source": source, "bundle_version": version, "served_at": now,
         "surface": surface, "device": device, **{k: extra.get(k) for k in _REQUEST_FIELDS}}
        for request_id, user_id, items, version, surface, device, now, extra in records
        for pos, (item_id, score, source) in enumerate(items)]


def reference_event(row: dict[str, Any]) -> dict[str, Any]:
    return {"event_id": f"{row['request_id']}-{row['position']}",
            "event_time": row["served_at"].isoformat(timespec="milliseconds").replace(
                "+00:00", "Z"),
            "user_id": row["user_id"], "item_id": row["item_id"], "event_type": "impression",
            "watch_time_ms": None, "item_duration_ms": None, "surface": row["surface"],
            "device": row["device"], "request_id": row["request_id"],
            "model_version": row["bundle_version"]}


def only(folder: Path, pattern: str) -> pa.Table:
    files = sorted(folder.glob(pattern))
    assert len(files) == 1, files
    return pq.read_table(files[0])


def same(written: pa.Table, expected: pa.Table) -> bool:
    """Equal schemas and values, NaN equal to NaN (a score may be NaN)."""
    return (written.schema.remove_metadata() == expected.schema.remove_metadata()
            and json.dumps(written.to_pylist(), default=str)
            == json.dumps(expected.to_pylist(), default=str))


def test_columns_equal_the_row_by_row_tables(tmp_path: Path) -> None:
    records = [
        ("r1", "u1", [("i1", 0.5, "retrieval"), ("i2", float("nan"), "popular")], "3", "feed",
         "ios", DAY, {"latency_ms": 4.5, "user_features": '{"a":1}', "user_history": '["i9"]'}),
        ("r2", "u2", [], "3", "feed", "web", DAY, {}),  # nothing served: no rows
        ("r3", "u1", [("i3", 1.5, "neighbours")], None, "search", "tv",
         DAY + timedelta(seconds=1), {"experiment_id": "e1", "arm": "treatment",
                                      "degraded": "load"}),  # the next day
    ]
    log = ImpressionLogger(tmp_path / "landing", stream_dir=tmp_path / "stream")
    assert log._write_records(records) == 3
    rows = reference_rows(records)
    for day, expected in (("2026-12-06", rows[:2]), ("2026-12-07", rows[2:])):
        served = only(tmp_path / "landing" / "served" / f"date={day}", "*.parquet")
        assert same(served, pa.Table.from_pylist(expected, schema=SERVED_SCHEMA))
        events = only(tmp_path / "landing" / "events" / f"date={day}", "*.parquet")
        reference = [reference_event(r) for r in expected]
        assert same(events, pa.Table.from_pylist(reference, schema=RAW_EVENT_SCHEMA))
        text = next((tmp_path / "stream").glob(f"served-{day}-*.jsonl")).read_text()
        assert [json.loads(line) for line in text.splitlines()] == reference


def test_a_shadow_logger_writes_no_events(tmp_path: Path) -> None:
    log = ImpressionLogger(tmp_path, folder="shadow", events=False)
    records = [("r1", "u1", [("i1", 0.5, "retrieval")], "4", "feed", "ios", DAY, {})]
    assert log._write_records(records) == 1
    assert not (tmp_path / "events").exists()
    shadow = only(tmp_path / "shadow" / "date=2026-12-06", "*.parquet")
    assert same(shadow, pa.Table.from_pylist(reference_rows(records),
                                            schema=SERVED_SCHEMA))
