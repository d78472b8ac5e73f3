"""Pure ETL logic: validation accounting, dedupe, partitioning, idempotent writes."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pandas as pd
import pytest

from recsys_core.contracts import RAW_EVENT_SCHEMA
from recsys_pipelines import etl
from recsys_pipelines.errors import DateRangeError
from recsys_pipelines.sources import LANDING_DATE, read_landing_partition


def _raw(rows: list[dict[str, object]]) -> pd.DataFrame:
    base = {name: None for name in RAW_EVENT_SCHEMA.names}
    frame = pd.DataFrame([{**base, **row} for row in rows])
    for column in ("watch_time_ms", "item_duration_ms"):
        frame[column] = frame[column].astype("Int64")
    return frame


def _event(event_id: str, when: str, landed: date, **extra: object) -> dict[str, object]:
    return {"event_id": event_id, "event_time": when, "user_id": "u1", "item_id": "i1",
            "event_type": "impression", LANDING_DATE: landed, **extra}


D1, D2 = date(2026, 11, 1), date(2026, 11, 2)


def test_every_raw_row_is_either_clean_or_quarantined_with_a_reason() -> None:
    raw = _raw([
        _event("e1", "2026-11-01T10:00:00Z", D1),
        _event("e2", "not a time", D1),
        _event("e3", "2026-11-01T11:00:00Z", D1, user_id=None),
        _event("e1", "2026-11-01T10:00:00Z", D2),  # re-sent a day later
    ])
    batch = etl.clean_batch(raw)
    assert list(batch.clean["event_id"]) == ["e1"]
    assert len(batch.clean) + len(batch.quarantine) == len(raw)
    assert sorted(batch.quarantine["reason"]) == sorted(
        ["event_time is not an ISO-8601 timestamp", "missing user_id", etl.REASON_DUPLICATE])
    # The copy that landed first is kept; the later copy is quarantined under its landing day.
    dup = batch.quarantine[batch.quarantine["reason"] == etl.REASON_DUPLICATE]
    assert list(dup[LANDING_DATE]) == [D2]


def test_clean_rows_are_split_by_event_date_not_landing_date() -> None:
    raw = _raw([_event("e1", "2026-11-01T23:59:59Z", D2), _event("e2", "2026-11-02T00:00:00Z", D2)])
    by_date = etl.split_by_event_date(etl.clean_batch(raw).clean, D1, D2)
    assert list(by_date[D1]["event_id"]) == ["e1"] and list(by_date[D2]["event_id"]) == ["e2"]


def test_a_reversed_range_is_rejected_with_the_dates() -> None:
    with pytest.raises(DateRangeError, match="2026-11-02..2026-11-01"):
        etl.check_range(D2, D1)


def test_writing_a_partition_twice_gives_the_same_bytes(tmp_path: Path) -> None:
    raw = _raw([_event(f"e{i}", f"2026-11-01T0{i}:00:00Z", D1) for i in range(5)])
    clean = etl.clean_batch(raw).clean
    etl.write_event_partition(clean, tmp_path, D1)
    first = etl.lake_checksums(tmp_path)
    etl.write_event_partition(clean.iloc[::-1], tmp_path, D1)  # input order does not matter
    assert etl.lake_checksums(tmp_path) == first
    assert len(etl.read_lake_events(tmp_path, D1, D1)) == 5


def test_a_missing_landing_partition_reads_as_empty(tmp_path: Path) -> None:
    frame = read_landing_partition(tmp_path, D1)
    assert frame.empty and set(RAW_EVENT_SCHEMA.names) <= set(frame.columns)


def test_snapshot_upsert_keeps_the_newest_row_and_advances_the_watermark(tmp_path: Path) -> None:
    def users(rows: list[tuple[str, str]]) -> pd.DataFrame:
        stamps = pd.to_datetime([t for _, t in rows], utc=True).as_unit("ms")
        return pd.DataFrame({"user_id": [u for u, _ in rows], "signup_at": stamps,
                             "country": "US", "age_bucket": "18-24", "updated_at": stamps})

    sync, mark = etl.upsert_snapshot("users", users([("u1", "2026-11-01"), ("u2", "2026-11-02")]),
                                     tmp_path, None)
    assert sync.total == 2 and mark == pd.Timestamp("2026-11-02", tz="UTC")
    sync, mark = etl.upsert_snapshot("users", users([("u1", "2026-11-03")]), tmp_path, mark)
    assert sync.total == 2 and mark == pd.Timestamp("2026-11-03", tz="UTC")
    lake = pd.read_parquet(tmp_path / "catalog" / "users.parquet")
    assert lake.set_index("user_id").loc["u1", "updated_at"] == pd.Timestamp("2026-11-03",
                                                                             tz="UTC")


def test_a_sql_catalog_is_read_incrementally_by_updated_at(tmp_path: Path) -> None:
    import sqlalchemy as sa

    from recsys_pipelines.sources import SnapshotSource, read_snapshot_since

    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    stamps = pd.to_datetime(["2026-11-01", "2026-11-03"], utc=True)
    users = pd.DataFrame({"user_id": ["u1", "u2"], "signup_at": stamps, "country": "US",
                          "age_bucket": "18-24", "updated_at": stamps})
    engine = sa.create_engine(url)
    users.to_sql("users", engine, index=False)
    engine.dispose()
    source = SnapshotSource("sql", url, "users")
    assert len(read_snapshot_since(source, None)) == 2
    changed = read_snapshot_since(source, pd.Timestamp("2026-11-02", tz="UTC").to_pydatetime())
    assert list(changed["user_id"]) == ["u2"]
    assert str(changed["updated_at"].dt.tz) == "UTC"


def test_pseudonymization_replaces_user_ids_only_when_enabled() -> None:
    from recsys_core.privacy import pseudonymize
    from recsys_core.settings import PrivacySettings

    raw = pd.DataFrame({"user_id": ["u1", None, "", pseudonymize("u2", "k")], "n": [1, 2, 3, 4]})
    assert etl.pseudonymize_users(raw, PrivacySettings()).equals(raw)  # off by default
    out = etl.pseudonymize_users(raw, PrivacySettings(pseudonymize=True, key="k"))
    assert out["user_id"].tolist() == [pseudonymize("u1", "k"), None, "",
                                       pseudonymize("u2", "k")]
    assert raw["user_id"][0] == "u1"  # the input frame is not modified
