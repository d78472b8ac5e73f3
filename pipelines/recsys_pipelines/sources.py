"""Raw sources of the ETL: landing event partitions and the catalog/users snapshots.

Events arrive as ``landing/events/date=YYYY-MM-DD/*.parquet`` or ``*.jsonl`` (one JSON object
per line); the date is the day the rows *landed*, not their event time. A JSON line that is not
an event object (garbage, wrong JSON types) becomes a row carrying its reason in
:data:`READ_ERROR`, which the ETL quarantines on its own; the file's other lines are kept. A
Parquet file that cannot be decoded is moved to the quarantine whole, with its reason beside
it, and the rest of the partition is read (:func:`read_landing_day`).

The item catalog and user profiles come from a database: a SQL table (PostgreSQL in
``services``, SQLite works too) or, in ``local``, the Parquet snapshot the generator wrote.
Both are read incrementally: only rows with ``updated_at`` past a stored watermark.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from recsys_core.atomic import atomic_write_text
from recsys_core.contracts import RAW_EVENT_SCHEMA
from recsys_pipelines.errors import LandingPartitionError

logger = logging.getLogger(__name__)

LANDING_DATE = "landing_date"  # column added to every raw row: the partition it came from
READ_ERROR = "_read_error"  # why a landed line is not an event (null for readable rows)
JSONL_SUFFIXES = (".jsonl", ".json")
MAX_READ_ERROR_CHARS = 200
_INT_FIELDS = {f.name for f in RAW_EVENT_SCHEMA if pa.types.is_integer(f.type)}
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


@dataclass
class QuarantinedFile:
    """A landing file that could not be read at all, moved out of the landing area."""

    source: str  # where it landed
    path: str  # where it is now (``<quarantine>/files/landing_date=D/<name>``)
    reason: str


@dataclass
class LandingRead:
    """One landing partition: its rows (bad JSON lines carry :data:`READ_ERROR`) and the
    files that were quarantined whole."""

    frame: pd.DataFrame
    quarantined_files: list[QuarantinedFile] = field(default_factory=list)


def _line_event(line: bytes) -> tuple[dict[str, Any], str | None]:
    """One JSON line as raw-contract fields, plus why it is not an event (None when it is)."""
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return {}, "not UTF-8"
    except (json.JSONDecodeError, RecursionError) as exc:
        return {}, f"not JSON ({getattr(exc, 'msg', 'nested too deep')})"
    if not isinstance(record, dict):
        return {}, f"not a JSON object (a JSON {type(record).__name__})"
    row: dict[str, Any] = {}
    problem = None
    for name in RAW_EVENT_SCHEMA.names:
        value = record.get(name)
        if name in _INT_FIELDS and isinstance(value, float) and value.is_integer():
            value = int(value)
        ok = value is None or (isinstance(value, int) and not isinstance(value, bool)
                               if name in _INT_FIELDS else isinstance(value, str))
        if ok:
            row[name] = value
        elif problem is None:
            wanted = "an integer" if name in _INT_FIELDS else "a string"
            problem = f"{name} is a JSON {type(value).__name__}, not {wanted}"
    return row, problem


def read_jsonl_events(path: Path) -> pd.DataFrame:
    """Reads a JSON-lines landing file line by line: every non-empty line is one row.

    Returns:
        Raw-contract columns plus :data:`READ_ERROR`, ``"<file> line <n>: <why>"`` for a line
        that is not an event object (its fields are whatever could be salvaged), else null.
    """
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not line.strip():
            continue
        row, problem = _line_event(line)
        reason = None if problem is None else f"{path.name} line {number}: {problem}"
        rows.append({**row, READ_ERROR: reason[:MAX_READ_ERROR_CHARS] if reason else None})
    frame = pd.DataFrame(rows, columns=[*RAW_EVENT_SCHEMA.names, READ_ERROR])
    typed = pa.Table.from_pandas(frame[RAW_EVENT_SCHEMA.names], schema=RAW_EVENT_SCHEMA,
                                 preserve_index=False).to_pandas()
    typed[READ_ERROR] = frame[READ_ERROR].astype("object").where(frame[READ_ERROR].notna(), None)
    return typed


def quarantine_file(path: Path, quarantine_dir: Path, day: date, reason: str) -> QuarantinedFile:
    """Moves an unreadable landing file to ``quarantine_dir/files/landing_date=D/`` and writes
    ``<name>.reason.json`` beside it (re-running the ETL then no longer trips over it)."""
    folder = quarantine_dir / "files" / f"landing_date={day.isoformat()}"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / path.name
    n = 1
    while target.exists():  # a file of the same name was quarantined before
        target = folder / f"{path.stem}.{n}{path.suffix}"
        n += 1
    shutil.move(str(path), target)
    moved = QuarantinedFile(str(path), str(target), reason)
    note = {**asdict(moved), "quarantined_at": datetime.now(UTC).isoformat()}
    atomic_write_text(target.with_name(target.name + ".reason.json"), json.dumps(note, indent=2))
    logger.error("landing file %s cannot be read (%s): moved to %s", path, reason, target)
    return moved


def read_landing_day(landing_dir: Path, day: date, quarantine_dir: Path | None = None
                     ) -> LandingRead:
    """Reads one landing partition (Parquet and JSON-lines files) plus ``landing_date``.

    A missing partition is an empty frame (nothing has landed yet). A Parquet file that
    cannot be decoded is moved to ``quarantine_dir`` with its reason and the partition's other
    files are read; without ``quarantine_dir`` it raises. Plain I/O errors (a file system that
    went away) always raise, so that the caller's retries apply.

    Raises:
        LandingPartitionError: A file cannot be decoded and there is no ``quarantine_dir``.
        OSError: A file cannot be read at all.
    """
    folder = landing_partition(landing_dir, day)
    files = sorted(p for p in folder.glob("*")
                   if p.is_file() and not p.name.startswith(".")
                   and (p.suffix == ".parquet" or p.suffix in JSONL_SUFFIXES))
    frames = []
    moved: list[QuarantinedFile] = []
    for path in files:
        if path.suffix in JSONL_SUFFIXES:
            frames.append(read_jsonl_events(path))
            continue
        try:
            table = pq.read_table(path, schema=RAW_EVENT_SCHEMA)
        except pa.ArrowException as exc:  # not Parquet, truncated, wrong column types
            if quarantine_dir is None:
                raise LandingPartitionError(path, exc) from exc
            reason = f"unreadable Parquet: {type(exc).__name__}: {exc}"[:MAX_READ_ERROR_CHARS]
            moved.append(quarantine_file(path, quarantine_dir, day, reason))
            continue
        frames.append(table.to_pandas())
    if frames:
        frame = pd.concat(frames, ignore_index=True)
    else:
        frame = RAW_EVENT_SCHEMA.empty_table().to_pandas()
    if READ_ERROR not in frame.columns:
        frame[READ_ERROR] = None
    frame[READ_ERROR] = frame[READ_ERROR].astype("object").where(frame[READ_ERROR].notna(), None)
    frame[LANDING_DATE] = day
    logger.debug("read %d raw rows from %s", len(frame), folder)
    return LandingRead(frame, moved)


def read_landing_partition(landing_dir: Path, day: date) -> pd.DataFrame:
    """The rows of one landing partition (:func:`read_landing_day` without a quarantine).

    Raises:
        LandingPartitionError: A file in the partition is not readable Parquet.
    """
    return read_landing_day(landing_dir, day).frame


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
