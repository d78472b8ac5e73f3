"""The ETL's work on Ray: the same plain functions of :mod:`recsys_pipelines.etl`, executed as
Ray tasks and Ray Data stages so a run scales out with the cluster (``ray.address``).

1. **read**: one Ray task per landing day (:func:`~recsys_pipelines.sources.read_landing_day`,
   unreadable files moved to the quarantine, user ids pseudonymized), each row tagged with its
   landing order (day, position) and a bucket, a hash of its ``event_id``;
2. **clean**: ``groupby(bucket).map_groups``: every copy of an ``event_id`` is in one bucket, so
   :func:`~recsys_pipelines.etl.clean_rows` on a bucket's rows, in landing order, keeps and
   rejects exactly the rows it would on the whole input (validation is per row);
3. **write**: ``groupby(part).map_groups``: one group per event-date partition and per landing
   day's quarantine, written with :func:`~recsys_pipelines.etl.write_event_partition` and
   :func:`~recsys_pipelines.etl.write_quarantine` (rows sorted as the in-process path sorts
   them, dtypes made canonical), so the lake is byte-identical to the in-process ETL's
   (``tests/integration/batch/test_etl_ray.py``).

Only counts come back to the driver.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from recsys_core.contracts import EVENT_SCHEMA, RAW_EVENT_SCHEMA, TIMESTAMP
from recsys_core.settings import PrivacySettings
from recsys_pipelines import etl, sources

logger = logging.getLogger(__name__)

SEQ, POS, BUCKET, PART = "_landing_seq", "_landing_pos", "_bucket", "_part"
EVENT_TIME = "_event_time"  # the parsed time of a clean row (its raw text stays in event_time)
READ_RETRIES = 3
OUT_OF_RANGE = "out_of_range"  # the part of clean rows whose event date is outside the run
_READ_SCHEMA = (RAW_EVENT_SCHEMA.append(pa.field(sources.READ_ERROR, pa.string()))
                .append(pa.field(sources.LANDING_DATE, pa.date32()))
                .append(pa.field(SEQ, pa.int64())).append(pa.field(POS, pa.int64()))
                .append(pa.field(BUCKET, pa.int64())))
_CLEANED_SCHEMA = (RAW_EVENT_SCHEMA.append(pa.field(sources.LANDING_DATE, pa.date32()))
                   .append(pa.field("reason", pa.string()))
                   .append(pa.field(EVENT_TIME, TIMESTAMP))
                   .append(pa.field(SEQ, pa.int64())).append(pa.field(POS, pa.int64()))
                   .append(pa.field(PART, pa.string())))
_COUNTS_SCHEMA = pa.schema([pa.field(PART, pa.string()), pa.field("reason", pa.string()),
                            pa.field("rows", pa.int64())])


@dataclass
class RayEtlCounts:
    """What a run on Ray read and wrote (the driver's :func:`etl.summarize_counts` input)."""

    input_rows: int
    valid_rows: int  # clean events, in or outside the range
    duplicates: int
    reasons: Counter[str]
    partitions: dict[str, int]  # event date -> rows written (every date of the range)
    quarantined_files: list[sources.QuarantinedFile] = field(default_factory=list)


def _bucket(event_ids: pd.Series, buckets: int) -> np.ndarray:
    hashed = pd.util.hash_pandas_object(event_ids.fillna(""), index=False).to_numpy()
    return (hashed % np.uint64(buckets)).astype(np.int64)


def read_day(landing_dir: Path, day: date, seq: int, quarantine_dir: Path,
             privacy: PrivacySettings, buckets: int
             ) -> tuple[pa.Table, tuple[int, list[sources.QuarantinedFile]]]:
    """One landing day's raw rows tagged with landing order and bucket; their number and the
    files moved to the quarantine."""
    read = sources.read_landing_day(landing_dir, day, quarantine_dir)
    frame = etl.pseudonymize_users(read.frame, privacy).reset_index(drop=True)
    frame[SEQ] = seq
    frame[POS] = np.arange(len(frame), dtype=np.int64)
    frame[BUCKET] = _bucket(frame["event_id"], buckets)
    table = pa.Table.from_pandas(frame[_READ_SCHEMA.names], schema=_READ_SCHEMA,
                                 preserve_index=False)
    return table, (table.num_rows, read.quarantined_files)


def clean_bucket(raw: pd.DataFrame, start: date, end: date) -> pa.Table:
    """:func:`etl.clean_rows` of one bucket; every row tagged with the part it is written to."""
    raw = raw.sort_values([SEQ, POS], kind="stable").drop(columns=[BUCKET])
    unique, quarantine, _ = etl.clean_rows(raw)
    dates = etl.event_dates(unique)
    events = unique.rename(columns={"event_time": EVENT_TIME})
    events["event_time"] = None
    events["reason"] = None
    events[PART] = [f"events/{d.isoformat()}" if start <= d <= end else OUT_OF_RANGE
                    for d in dates]
    quarantine[EVENT_TIME] = pd.NaT
    quarantine[PART] = [f"quarantine/{d.isoformat()}" for d in quarantine[sources.LANDING_DATE]]
    frame = pd.concat([events, quarantine], ignore_index=True)
    return pa.Table.from_pandas(frame[_CLEANED_SCHEMA.names], schema=_CLEANED_SCHEMA,
                                preserve_index=False)


def write_part(rows: pd.DataFrame, lake_dir: Path) -> pa.Table:
    """Writes one part (an event date's partition or a landing day's quarantine); returns
    its row count per quarantine reason."""
    part = str(rows[PART].iloc[0])
    if part == OUT_OF_RANGE:
        return pa.table({PART: [part], "reason": [""], "rows": [len(rows)]}, _COUNTS_SCHEMA)
    kind, day = part.split("/")
    if kind == "events":
        events = rows.drop(columns=["event_time"]).rename(columns={EVENT_TIME: "event_time"})
        written = etl.write_event_partition(events, lake_dir, date.fromisoformat(day))
        return pa.table({PART: [part], "reason": [""], "rows": [written]}, _COUNTS_SCHEMA)
    ordered = rows.sort_values([SEQ, POS], kind="stable")
    etl.write_quarantine(ordered, lake_dir, date.fromisoformat(day))
    reasons = ordered["reason"].value_counts()
    return pa.table({PART: [part] * len(reasons), "reason": reasons.index.astype(str).tolist(),
                     "rows": reasons.to_numpy(np.int64)}, _COUNTS_SCHEMA)


def run_etl(landing_dir: Path, lake_dir: Path, landing_days: list[date], start: date,
            end: date, privacy: PrivacySettings, buckets: int | None = None) -> RayEtlCounts:
    """Validates, deduplicates and partitions the landing days on the connected Ray cluster.

    Args:
        landing_dir: Raw source folder. lake_dir: the lake (shared with every Ray node).
        landing_days: Landing partitions to read, in landing order.
        start: First event date written. end: last event date written.
        privacy: Pseudonymization of user ids (before anything reaches the lake).
        buckets: ``event_id`` hash buckets (default: twice the cluster's CPUs).

    Returns:
        The counts of the run; every event date of ``[start, end]`` and every landing day
        has its partition written, empty ones included.
    """
    import ray
    import ray.data

    buckets = buckets or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    reader = ray.remote(read_day).options(  # I/O errors retried, as the flow's read tasks
        num_returns=2, max_retries=READ_RETRIES, retry_exceptions=[OSError])
    reads: list[Any] = [reader.remote(landing_dir, day, seq, lake_dir / "quarantine", privacy,
                                      buckets) for seq, day in enumerate(landing_days)]
    tables = [refs[0] for refs in reads]  # (table, (rows, moved files)) per day
    read = ray.get([refs[1] for refs in reads])
    input_rows = sum(n for n, _ in read)
    moved = [f for _, files in read for f in files]
    counts = _COUNTS_SCHEMA.empty_table().to_pandas()
    if input_rows:
        raw = ray.data.from_arrow_refs(tables)
        cleaned = raw.groupby(BUCKET).map_groups(
            lambda rows: clean_bucket(rows, start, end), batch_format="pandas")
        counts = cleaned.groupby(PART).map_groups(
            lambda rows: write_part(rows, lake_dir), batch_format="pandas").to_pandas()
    written = counts[counts[PART].str.startswith("events/")]
    partitions = {p.removeprefix("events/"): int(n) for p, n in zip(written[PART],
                                                                   written["rows"], strict=True)}
    for day in sources.days(start, end):  # dates without events: an empty partition
        if day.isoformat() not in partitions:
            partitions[day.isoformat()] = etl.write_event_partition(
                pd.DataFrame(columns=EVENT_SCHEMA.names),
                lake_dir, day)
    quarantined = counts[counts[PART].str.startswith("quarantine/")]
    for day in landing_days:  # landing days without rejected rows: an empty quarantine
        if f"quarantine/{day.isoformat()}" not in set(quarantined[PART]):
            etl.write_quarantine(pd.DataFrame(columns=etl.QUARANTINE_SCHEMA.names), lake_dir,
                                 day)
    reasons: Counter[str] = Counter()
    for reason, n in zip(quarantined["reason"], quarantined["rows"], strict=True):
        reasons[str(reason)] += int(n)
    out_of_range = int(counts.loc[counts[PART] == OUT_OF_RANGE, "rows"].sum())
    return RayEtlCounts(
        input_rows=input_rows, valid_rows=sum(partitions.values()) + out_of_range,
        duplicates=reasons.get(etl.REASON_DUPLICATE, 0), reasons=reasons,
        partitions=dict(sorted(partitions.items())), quarantined_files=moved)
