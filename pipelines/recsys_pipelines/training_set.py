"""Point-in-time correct training sets through Feast, and their snapshots.

A labelled impression is one row per impression: ``user_id, item_id, event_time, clicked
(0/1), watch_time_ms (NaN unless watched), item_duration_ms``. :func:`build_training_set`
joins each row, as of its ``event_time``, to the features of the ``ranking_v1`` service plus
``user_history`` with Feast's ``get_historical_features``: a feature row is used only when its
``window_end <= event_time`` (and within the view's TTL), so nothing computed after the
impression leaks into it. :func:`write_training_snapshot` stores the frame under
``<data_dir>/training/<snapshot_id>/`` where the id is the content hash.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
from datetime import date, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from feast import FeatureStore

from recsys_pipelines.errors import TrainingSetError
from recsys_platform import features as F
from recsys_platform.settings import Settings

logger = logging.getLogger(__name__)

LABEL_WINDOW = timedelta(hours=1)  # a click/watch counts for an impression within this time
IMPRESSION_COLUMNS: tuple[str, ...] = (
    "user_id", "item_id", "event_time", "clicked", "watch_time_ms", "item_duration_ms",
)
WATCH_TYPES: tuple[str, ...] = ("watch", "skip")  # both carry the watched time
# Stream views are online-only (the Flink job writes Redis; their offline tables stay empty),
# so training reads the batch views of ranking_v1 plus the history.
STREAM_VIEWS: tuple[str, ...] = tuple(g.name for g in F.STREAM_GROUPS)
TRAINING_VIEWS: tuple[str, ...] = (
    *(v for v in F.FEATURE_SERVICES["ranking_v1"] if v not in STREAM_VIEWS), "user_history"
)
_KEY = ["user_id", "item_id", "request_id"]


def label_impressions(events: pd.DataFrame, window: timedelta = LABEL_WINDOW) -> pd.DataFrame:
    """Labels each impression with the later click/watch of the same user, item and request.

    Args:
        events: Clean lake events (``EVENT_SCHEMA``).
        window: How long after the impression a click or watch still counts.

    Returns:
        One row per impression (first per user, item and request), ordered by time:
        :data:`IMPRESSION_COLUMNS`.
    """
    imp = events[events["event_type"] == "impression"].sort_values(["event_time", "event_id"])
    imp = imp.drop_duplicates(_KEY, keep="first")
    base = imp[[*_KEY, "event_time", "item_duration_ms"]].reset_index(drop=True)
    base["_imp"] = np.arange(len(base))

    def within(kind: tuple[str, ...], extra: list[str]) -> pd.DataFrame:
        later = events[events["event_type"].isin(kind)][[*_KEY, "event_time", *extra]]
        joined = base[[*_KEY, "_imp", "event_time"]].merge(
            later, on=_KEY, suffixes=("", "_later"))
        delta = joined["event_time_later"] - joined["event_time"]
        joined = joined[(delta >= pd.Timedelta(0)) & (delta <= window)]
        return joined.sort_values(["_imp", "event_time_later"]).drop_duplicates("_imp")

    clicks = within(("click",), [])
    watches = within(WATCH_TYPES, ["watch_time_ms"])
    out = base.copy()
    out["clicked"] = out["_imp"].isin(clicks["_imp"]).astype(np.int64)
    watched = watches.set_index("_imp")["watch_time_ms"].astype("float64")
    out["watch_time_ms"] = out["_imp"].map(watched).astype("float64")
    out["item_duration_ms"] = out["item_duration_ms"].astype("float64")
    out = out.sort_values(["event_time", "_imp"], kind="stable")
    return out[list(IMPRESSION_COLUMNS)].reset_index(drop=True)


def feature_refs(store: FeatureStore) -> list[str]:
    """``view:feature`` references of :data:`TRAINING_VIEWS` (the ranking service's views)."""
    service = {p.name for p in store.get_feature_service("ranking_v1").feature_view_projections}
    refs: list[str] = []
    for view in TRAINING_VIEWS:
        if view != "user_history" and view not in service:
            continue
        refs += [f"{view}:{f.name}" for f in store.get_feature_view(view).features]
    return refs


def build_training_set(store: FeatureStore, impressions: pd.DataFrame) -> pd.DataFrame:
    """Joins labelled impressions to their batch features as of each impression's time.

    Args:
        store: The platform's Feast store (definitions applied, offline tables written).
        impressions: Output of :func:`label_impressions`.

    Returns:
        The impressions, in their order, with one column per feature of
        :data:`TRAINING_VIEWS`; a feature is null when no row of its view is at or before the
        impression within the view's TTL.

    Raises:
        TrainingSetError: ``impressions`` lacks a required column.
    """
    missing = [c for c in IMPRESSION_COLUMNS if c not in impressions.columns]
    if missing:
        raise TrainingSetError(missing)
    entity_df = impressions.rename(columns={"event_time": "event_timestamp"}).copy()
    entity_df["event_timestamp"] = pd.to_datetime(entity_df["event_timestamp"], utc=True)
    entity_df["_row"] = np.arange(len(entity_df))
    frame = entity_df
    by_view: dict[str, list[str]] = {}
    for ref in feature_refs(store):
        by_view.setdefault(ref.split(":")[0], []).append(ref)
    # One retrieval per view, merged back on the row number: Feast's file (dask) offline
    # store drops an entity row outright when its entity has rows but none inside
    # [t - ttl, t], and a dropped row would also lose the features of the other views.
    for view, refs in by_view.items():
        key = F.ENTITY_KEYS["user" if view.startswith("user") else "item"]
        query = entity_df[[key, "event_timestamp", "_row"]]
        joined = store.get_historical_features(entity_df=query, features=refs).to_df()
        columns = [ref.split(":")[1] for ref in refs]
        frame = frame.merge(joined[["_row", *columns]], on="_row", how="left")
    frame = frame.sort_values("_row").drop(columns="_row").reset_index(drop=True)
    frame = frame.rename(columns={"event_timestamp": "event_time"})
    logger.info("training set: %d rows, %d columns", len(frame), frame.shape[1])
    return frame


def snapshot_id(frame: pd.DataFrame) -> str:
    """Content hash of a training frame (16 hex digits of the SHA-256 of its Parquet bytes)."""
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), buffer)
    return hashlib.sha256(buffer.getvalue()).hexdigest()[:16]


def write_training_snapshot(frame: pd.DataFrame, settings: Settings) -> str:
    """Writes the frame to ``<data_dir>/training/<snapshot_id>/part-0.parquet``, atomically.

    The same frame always gets the same id; writing it again changes nothing.
    """
    sid = snapshot_id(frame)
    root = settings.data_dir / "training"
    target = root / sid
    if (target / "part-0.parquet").is_file():
        return sid
    tmp = root / f".{sid}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp / "part-0.parquet")
    os.replace(tmp, target)
    logger.info("training snapshot %s: %d rows at %s", sid, len(frame), target)
    return sid


def build_snapshot(
    settings: Settings, store: FeatureStore, start: date | None = None, end: date | None = None
) -> tuple[str, int]:
    """Labels the lake's impressions in ``[start, end]``, joins features, writes a snapshot.

    Returns:
        ``(snapshot_id, rows)``.
    """
    from recsys_pipelines.etl import read_lake_events

    impressions = label_impressions(read_lake_events(settings.lake_dir, start, end))
    frame = build_training_set(store, impressions)
    return write_training_snapshot(frame, settings), len(frame)
