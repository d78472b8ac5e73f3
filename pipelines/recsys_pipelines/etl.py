"""ETL logic: raw landing rows -> validated, deduplicated, date-partitioned lake.

Plain functions; the Prefect flow in :mod:`recsys_platform.flows.data` only wires them.

Lake layout (under ``settings.lake_dir``)::

    events/date=YYYY-MM-DD/part-0.parquet                 clean events, by EVENT date (UTC)
    quarantine/events/landing_date=YYYY-MM-DD/part-0.parquet   rejected rows + ``reason``
    quarantine/files/landing_date=YYYY-MM-DD/<file>        unreadable landing files, moved here
                                                           with ``<file>.reason.json``
    catalog/items.parquet, catalog/users.parquet           upserted snapshots
    catalog/_watermarks.json                               ``updated_at`` read so far
    quarantine/{items,users}/since=<watermark>.parquet     rejected snapshot rows

Every write replaces a whole file atomically (temp file, then rename), so re-running the same
dates gives byte-identical partitions. Late events (landed the day after their event date) are
picked up because a run reads landing partitions up to ``lookahead_days`` past its range end
and keeps rows by event date.

With ``settings.privacy.pseudonymize`` on, :func:`pseudonymize_users` replaces every
``user_id`` by its keyed pseudonym (:mod:`recsys_core.privacy`) as the rows are read, before
validation: clean partitions, the quarantine and the users snapshot never hold a raw id.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from recsys_core.atomic import atomic_path
from recsys_core.contracts import (
    EVENT_SCHEMA,
    ITEM_SCHEMA,
    RAW_EVENT_SCHEMA,
    USER_SCHEMA,
    split_duplicates,
    to_table,
    validate_events,
    validate_items,
    validate_users,
)
from recsys_core.privacy import pseudonymize_series
from recsys_core.settings import PrivacySettings
from recsys_pipelines.errors import DateRangeError
from recsys_pipelines.sources import LANDING_DATE, READ_ERROR, QuarantinedFile, days

logger = logging.getLogger(__name__)

REASON_DUPLICATE = "duplicate event_id"
QUARANTINE_SCHEMA = RAW_EVENT_SCHEMA.append(pa.field(LANDING_DATE, pa.date32())).append(
    pa.field("reason", pa.string())
)
_ROW = "_raw_row"
SNAPSHOT_SCHEMAS: dict[str, tuple[pa.Schema, str]] = {
    "items": (ITEM_SCHEMA, "item_id"),
    "users": (USER_SCHEMA, "user_id"),
}


@dataclass
class CleanBatch:
    """The outcome of validating and deduplicating one batch of raw rows."""

    clean: pd.DataFrame  # EVENT_SCHEMA columns, one row per event_id
    quarantine: pd.DataFrame  # QUARANTINE_SCHEMA columns, one row per rejected raw row
    duplicates: int


@dataclass
class EtlResult:
    """Counts of one ETL run. ``input == clean + quarantined + out_of_range``."""

    start: str
    end: str
    landing_partitions: list[str]
    input_rows: int
    clean_rows: int
    quarantined_rows: int
    out_of_range_rows: int  # valid rows whose event date is outside [start, end]
    duplicates: int
    reasons: dict[str, int] = field(default_factory=dict)
    partitions: dict[str, int] = field(default_factory=dict)  # event date -> rows written
    # Landing files that could not be read at all: moved to the quarantine, not counted above.
    quarantined_files: list[dict[str, str]] = field(default_factory=list)


def check_range(start: date, end: date) -> None:
    """Raises :class:`DateRangeError` when ``start`` is after ``end``."""
    if start > end:
        raise DateRangeError(start, end)


def pseudonymize_users(frame: pd.DataFrame, privacy: PrivacySettings) -> pd.DataFrame:
    """Replaces ``user_id`` by its keyed pseudonym when ``privacy.pseudonymize`` is on.

    Nulls and empty ids stay as they are (validation rejects them); ids that already are
    pseudonyms are kept, so pseudonymized input (the stream, serving) passes unchanged.
    """
    if not privacy.pseudonymize or "user_id" not in frame.columns or frame.empty:
        return frame
    out = frame.copy()
    out["user_id"] = pseudonymize_series(out["user_id"], privacy.key)
    return out


def clean_rows(raw: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """:func:`clean_batch` keeping every column of ``raw``, extra ones included (the Ray path
    carries its ordering keys through it).

    Returns:
        ``(unique, quarantine, duplicates)``: the valid rows, one per ``event_id`` (typed as
        :func:`~recsys_core.contracts.validate_events` types them), and the rejected raw
        rows with ``reason``, both in landing order.
    """
    raw = raw.sort_values(LANDING_DATE, kind="stable").reset_index(drop=True)
    raw[_ROW] = range(len(raw))
    unreadable = (raw[READ_ERROR].notna() if READ_ERROR in raw.columns
                  else pd.Series(False, index=raw.index))
    unread = raw[unreadable].copy()
    unread["reason"] = unread[READ_ERROR] if len(unread) else pd.Series(dtype=str)
    valid, rejected = validate_events(raw[~unreadable])
    unique, dups = split_duplicates(valid)
    dup_rows = raw.loc[raw[_ROW].isin(dups[_ROW])].copy()
    dup_rows["reason"] = REASON_DUPLICATE
    quarantine = pd.concat([unread, rejected, dup_rows], ignore_index=True)
    quarantine = quarantine.sort_values(_ROW, kind="stable")
    return unique, quarantine.reset_index(drop=True), len(dups)


def clean_batch(raw: pd.DataFrame) -> CleanBatch:
    """Validates raw rows against the contract and drops repeated ``event_id`` s.

    The copy that landed first is kept (rows are ordered by landing date, then file order);
    every other raw row ends in the quarantine with its reason.

    Args:
        raw: Raw rows with :data:`RAW_EVENT_SCHEMA` columns plus ``landing_date``.

    Rows whose :data:`~recsys_pipelines.sources.READ_ERROR` is set (a landed line that is not
    an event) go to the quarantine with that reason before any other check.

    Returns:
        Clean events and quarantined raw rows; together they account for every input row.
    """
    unique, quarantine, duplicates = clean_rows(raw)
    return CleanBatch(
        clean=unique[EVENT_SCHEMA.names].reset_index(drop=True),
        quarantine=quarantine[QUARANTINE_SCHEMA.names].reset_index(drop=True),
        duplicates=duplicates,
    )


def event_dates(events: pd.DataFrame) -> pd.Series:
    """The UTC calendar date of each event: the lake partition it belongs to."""
    return events["event_time"].dt.tz_convert(UTC).dt.date


def atomic_write_table(table: pa.Table, path: Path) -> None:
    """Writes Parquet to a hidden temp file next to ``path``, then renames it into place."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def event_partition(lake_dir: Path, day: date) -> Path:
    return lake_dir / "events" / f"date={day.isoformat()}" / "part-0.parquet"


def canonical(frame: pd.DataFrame, schema: pa.Schema) -> pd.DataFrame:
    """``schema``'s columns with one pandas dtype per Arrow type (nullable ``Int64``, ``object``
    strings and dates, UTC timestamps in the schema's unit), whatever path built the frame:
    Parquet's pandas metadata records the dtypes, so equal rows give equal bytes."""
    out = {}
    for f in schema:
        column = frame[f.name]
        if pa.types.is_integer(f.type):
            column = column.astype("Int64")
        elif pa.types.is_timestamp(f.type):
            column = pd.to_datetime(column, utc=True).dt.as_unit(f.type.unit)
        else:
            column = column.astype(object).where(column.notna(), None)
        out[f.name] = column
    return pd.DataFrame(out, index=frame.index)


def write_event_partition(events: pd.DataFrame, lake_dir: Path, day: date) -> int:
    """Replaces the lake partition of ``day`` with ``events`` (all of that event date).

    Rows are sorted by ``(event_time, event_id)`` so that the same input gives the same bytes.
    Returns the number of rows written.
    """
    ordered = canonical(events, EVENT_SCHEMA).sort_values(["event_time", "event_id"],
                                                          kind="stable")
    path = event_partition(lake_dir, day)
    atomic_write_table(to_table(ordered, EVENT_SCHEMA), path)
    for stale in path.parent.glob("*.parquet"):  # earlier layouts with more parts
        if stale != path:
            stale.unlink()
    return len(ordered)


def write_quarantine(quarantine: pd.DataFrame, lake_dir: Path, landing_day: date) -> int:
    """Replaces the quarantine partition of one landing day; returns the rows written."""
    rows = canonical(quarantine[quarantine[LANDING_DATE] == landing_day], QUARANTINE_SCHEMA)
    path = lake_dir / "quarantine" / "events" / f"landing_date={landing_day.isoformat()}"
    table = pa.Table.from_pandas(rows, schema=QUARANTINE_SCHEMA, preserve_index=False)
    atomic_write_table(table, path / "part-0.parquet")
    return len(rows)


def summarize(
    start: date,
    end: date,
    landing_days: list[date],
    input_rows: int,
    batch: CleanBatch,
    partitions: dict[str, int],
    quarantined_files: list[QuarantinedFile] | None = None,
) -> EtlResult:
    """Builds the run's counts; logs them, including each quarantine reason."""
    return summarize_counts(start, end, landing_days, input_rows, len(batch.clean),
                            batch.duplicates, Counter(batch.quarantine["reason"]), partitions,
                            quarantined_files)


def summarize_counts(
    start: date,
    end: date,
    landing_days: list[date],
    input_rows: int,
    valid_rows: int,
    duplicates: int,
    reasons: Counter[str],
    partitions: dict[str, int],
    quarantined_files: list[QuarantinedFile] | None = None,
) -> EtlResult:
    """:func:`summarize` from counts: ``valid_rows`` clean events in or outside the range,
    ``reasons`` the quarantined rows per reason."""
    clean_rows = sum(partitions.values())
    result = EtlResult(
        start=start.isoformat(),
        end=end.isoformat(),
        landing_partitions=[d.isoformat() for d in landing_days],
        input_rows=input_rows,
        clean_rows=clean_rows,
        quarantined_rows=sum(reasons.values()),
        out_of_range_rows=valid_rows - clean_rows,
        duplicates=duplicates,
        reasons=dict(sorted(reasons.items())),
        partitions=partitions,
        quarantined_files=[asdict(f) for f in quarantined_files or []],
    )
    if result.quarantined_files:
        logger.error("ETL %s..%s: %d unreadable landing files moved to the quarantine: %s",
                     result.start, result.end, len(result.quarantined_files),
                     ", ".join(f["source"] for f in result.quarantined_files))
    logger.info(
        "ETL %s..%s: %d raw rows -> %d clean, %d quarantined (%s), %d outside the range",
        result.start, result.end, input_rows, clean_rows, result.quarantined_rows,
        ", ".join(f"{k}: {v}" for k, v in result.reasons.items()) or "none",
        result.out_of_range_rows,
    )
    return result


def split_by_event_date(clean: pd.DataFrame, start: date, end: date) -> dict[date, pd.DataFrame]:
    """Clean events of each date in ``[start, end]`` (an empty frame for a date without any)."""
    dates = event_dates(clean)
    return {day: clean[dates == day] for day in days(start, end)}


def lake_checksums(lake_dir: Path) -> dict[str, str]:
    """SHA-256 of every event partition file, keyed by partition name."""
    return {
        path.parent.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted((lake_dir / "events").glob("date=*/*.parquet"))
    }


def read_lake_events(
    lake_dir: Path, start: date | None = None, end: date | None = None
) -> pd.DataFrame:
    """Reads clean events of the lake partitions in ``[start, end]`` (all when not given)."""
    files = []
    for path in sorted((lake_dir / "events").glob("date=*/part-0.parquet")):
        day = date.fromisoformat(path.parent.name.removeprefix("date="))
        if (start is None or day >= start) and (end is None or day <= end):
            files.append(path)
    if not files:
        return EVENT_SCHEMA.empty_table().to_pandas()
    return pa.concat_tables([pq.read_table(f, schema=EVENT_SCHEMA) for f in files]).to_pandas()


@dataclass
class SnapshotSync:
    """What syncing one snapshot did."""

    name: str
    read: int
    rejected: int
    total: int  # rows in the lake snapshot after the upsert
    watermark: str | None


def upsert_snapshot(
    name: str, changed: pd.DataFrame, lake_dir: Path, since: datetime | None
) -> tuple[SnapshotSync, datetime | None]:
    """Validates changed snapshot rows and upserts them into ``lake/catalog/<name>.parquet``.

    The newest ``updated_at`` per id wins. Rejected rows go to the quarantine with a reason.

    Returns:
        What happened, and the new watermark (the largest ``updated_at`` seen, or ``since``).
    """
    schema, key = SNAPSHOT_SCHEMAS[name]
    target = lake_dir / "catalog" / f"{name}.parquet"
    if changed.empty:
        total = pq.read_metadata(target).num_rows if target.is_file() else 0
        return SnapshotSync(name, 0, 0, total, since.isoformat() if since else None), since
    validate = validate_items if name == "items" else validate_users
    valid, rejected = validate(changed)
    if len(rejected):
        tag = since.isoformat().replace(":", "-") if since else "start"
        path = lake_dir / "quarantine" / name / f"since={tag}.parquet"
        atomic_write_table(pa.Table.from_pandas(rejected, preserve_index=False), path)
        logger.warning("%d %s rows quarantined: %s", len(rejected), name,
                       dict(Counter(rejected["reason"])))
    frames = [valid[schema.names]]
    if target.is_file():
        frames.insert(0, pq.read_table(target, schema=schema).to_pandas())
    merged = pd.concat(frames, ignore_index=True).sort_values(["updated_at", key], kind="stable")
    merged = merged.drop_duplicates(key, keep="last").sort_values(key, kind="stable")
    atomic_write_table(to_table(merged, schema), target)
    newest: datetime | None = (
        valid["updated_at"].max().to_pydatetime() if len(valid) else None
    )
    candidates = [m for m in (since, newest) if m is not None]
    new_mark: datetime | None = max(candidates) if candidates else None
    sync = SnapshotSync(name, len(changed), len(rejected), len(merged),
                        new_mark.isoformat() if new_mark else None)
    logger.info("snapshot %s: %d changed rows read, %d rejected, %d in the lake",
                name, sync.read, sync.rejected, sync.total)
    return sync, new_mark
