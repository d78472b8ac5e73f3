"""Raw sources of the ETL: landing event partitions and the catalog/users snapshots.

Events arrive as ``landing/events/date=YYYY-MM-DD/*.parquet`` (the date is the day the rows
*landed*, not their event time). The item catalog and user profiles come from a database: a
SQL table (PostgreSQL in ``services``, SQLite works too) or, in ``local``, the Parquet snapshot
the generator wrote. Both are read incrementally: only rows with ``updated_at`` past a stored
watermark.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Literal

import pandas as pd
import pyarrow.parquet as pq

from recsys_pipelines.errors import LandingPartitionError
from recsys_platform.atomic import atomic_write_text
from recsys_platform.contracts import RAW_EVENT_SCHEMA

logger = logging.getLogger(__name__)

LANDING_DATE = "landing_date"  # column added to every raw row: the partition it came from
Snapshot = Literal["items", "users"]


def days(start: date, end: date) -> list[date]:
    """Every day from ``start`` to ``end``, both inclusive."""
    return [start + timedelta(days=n) for n in range((end - start).days + 1)]


def landing_partition(landing_dir: Path, day: date) -> Path:
    return landing_dir / "events" / f"date={day.isoformat()}"


def landing_days_to_read(
    landing_dir: Path, start: date, end: date, lookahead_days: int
) -> list[date]:
    """Landing partitions that exist for ``start .. end + lookahead_days`` (late rows land late)."""
    wanted = days(start, end + timedelta(days=lookahead_days))
    return [d for d in wanted if landing_partition(landing_dir, d).is_dir()]


def concat_raw(frames: list[pd.DataFrame], landing_dir: Path, fallback: date) -> pd.DataFrame:
    """One raw frame of several partitions; a typed empty frame when there are none."""
    frames = [f for f in frames if not f.empty]
    if not frames:
        return read_landing_partition(landing_dir, fallback).iloc[0:0]
    return pd.concat(frames, ignore_index=True)


def read_landing_partition(landing_dir: Path, day: date) -> pd.DataFrame:
    """Reads one landing partition as raw strings plus a ``landing_date`` column.

    A missing partition is an empty frame (nothing has landed yet); an unreadable one raises.

    Raises:
        LandingPartitionError: A file in the partition is not readable Parquet.
    """
    folder = landing_partition(landing_dir, day)
    files = sorted(p for p in folder.glob("*.parquet") if not p.name.startswith("."))
    frames = []
    for path in files:
        try:
            table = pq.read_table(path, schema=RAW_EVENT_SCHEMA)
        except Exception as exc:  # noqa: BLE001 - any read failure is a bad partition
            raise LandingPartitionError(path, exc) from exc
        frames.append(table.to_pandas())
    if frames:
        frame = pd.concat(frames, ignore_index=True)
    else:
        frame = RAW_EVENT_SCHEMA.empty_table().to_pandas()
    frame[LANDING_DATE] = day
    logger.debug("read %d raw rows from %s", len(frame), folder)
    return frame


@dataclass(frozen=True)
class SnapshotSource:
    """Where a catalog snapshot comes from: a Parquet file or a SQL table.

    Example:
        >>> SnapshotSource.parquet(Path("data/landing/catalog/items.parquet"))
        >>> SnapshotSource("sql", "postgresql+psycopg://postgres@127.0.0.1/recsys", "items")
    """

    kind: Literal["parquet", "sql"]
    location: str  # file path, or SQLAlchemy URL
    table: str = ""  # SQL table name when kind == "sql"

    @classmethod
    def parquet(cls, path: Path) -> SnapshotSource:
        return cls("parquet", str(path))


def default_snapshot_sources(
    landing_dir: Path, sql_url: str | None = None
) -> dict[str, SnapshotSource]:
    """The catalog and users sources: SQL tables ``items``/``users`` or the landing snapshots."""
    if sql_url:
        return {name: SnapshotSource("sql", sql_url, name) for name in ("items", "users")}
    return {
        name: SnapshotSource.parquet(landing_dir / "catalog" / f"{name}.parquet")
        for name in ("items", "users")
    }


def read_snapshot_since(source: SnapshotSource, watermark: datetime | None) -> pd.DataFrame:
    """Reads rows whose ``updated_at`` is after ``watermark`` (all rows when it is None).

    Returns:
        The rows, with ``updated_at`` as UTC timestamps; empty when nothing changed.
    """
    if source.kind == "parquet":
        path = Path(source.location)
        if not path.is_file():
            logger.warning("snapshot %s does not exist yet; nothing to read", path)
            return pd.DataFrame()
        filters = None if watermark is None else [("updated_at", ">", pd.Timestamp(watermark))]
        frame = pq.read_table(path, filters=filters).to_pandas()
    else:
        import sqlalchemy as sa

        engine = sa.create_engine(source.location)
        try:
            query = sa.text(f"SELECT * FROM {source.table}")  # noqa: S608 - name from config
            params: dict[str, object] = {}
            if watermark is not None:
                query = sa.text(f"SELECT * FROM {source.table} WHERE updated_at > :watermark")
                params = {"watermark": watermark}
            with engine.connect() as conn:
                frame = pd.read_sql(query, conn, params=params)
        finally:
            engine.dispose()
    for column in ("updated_at", "published_at", "signup_at"):
        if column in frame.columns:
            frame[column] = pd.to_datetime(frame[column], utc=True).dt.as_unit("ms")
    if watermark is not None and not frame.empty:
        # Again in pandas: SQLite compares timestamps as text, which is not always right.
        frame = frame[frame["updated_at"] > pd.Timestamp(watermark)].reset_index(drop=True)
    return frame


def read_watermarks(path: Path) -> dict[str, datetime]:
    """The stored ``updated_at`` watermark of each snapshot (empty before the first run)."""
    if not path.is_file():
        return {}
    raw = json.loads(path.read_text())
    return {name: datetime.fromisoformat(value) for name, value in raw.items()}


def write_watermarks(path: Path, marks: dict[str, datetime]) -> None:
    """Stores watermarks atomically (temp file, then rename)."""
    atomic_write_text(path, json.dumps({k: v.isoformat() for k, v in sorted(marks.items())},
                                       indent=2))
