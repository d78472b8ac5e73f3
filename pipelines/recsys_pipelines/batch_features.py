"""Batch features from the lake, as of each day end, with Ray Data.

For every day ``d`` in the requested range the feature timestamp is the day end
``t = midnight after d`` (UTC), stored as ``window_end``. A windowed aggregate over ``w`` days
covers events with ``t - w < event_time <= t`` exactly as :mod:`recsys_core.features`
defines it. Because every batch window is a whole number of days, an event belongs to the
day bucket ``b`` with ``midnight(b) < event_time <= midnight(b + 1)`` and a ``w``-day window at
day ``d`` is the sum of buckets ``d - w + 1 .. d``.

Ray Data does the scan and the heavy aggregation (daily partial counts/sums per entity, which
shrinks events by orders of magnitude); the sliding windows are cumulative sums over the
small daily table. One row per entity per day from the entity's first event on.

Output: one Parquet file per view and day, ``<repo>/data/<view>/<YYYY-MM-DD>.parquet``, the
offline store of the Feast repository (see ``feature_repo/``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from recsys_core import features as F
from recsys_core.contracts import ITEM_SCHEMA
from recsys_pipelines.errors import EmptyLakeError
from recsys_pipelines.etl import atomic_write_table
from recsys_pipelines.sources import days

logger = logging.getLogger(__name__)

DAY_MS = 86_400_000
EPOCH = date(1970, 1, 1)
_BUCKET = "_day"


@dataclass(frozen=True)
class _Base:
    """The window-free part of an aggregate: what is counted or summed per day."""

    event_types: tuple[str, ...]
    kind: str
    column: str | None

    @property
    def name(self) -> str:
        what = self.column if self.kind == "sum" else "n"
        return f"_{self.kind}_{what}_{'_'.join(self.event_types)}"


def _base(agg: F.Aggregate) -> _Base:
    return _Base(agg.event_types, agg.kind, agg.column)


def day_end(day: date) -> pd.Timestamp:
    """The feature timestamp of ``day``: the midnight (UTC) that ends it."""
    return pd.Timestamp(datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=1))


def _day_index(day: date) -> int:
    return (day - EPOCH).days


def bucket_of(event_time: pd.Series) -> np.ndarray:
    """Day bucket of each event: ``b`` with ``midnight(b) < t <= midnight(b + 1)``."""
    ms = pd.to_datetime(event_time, utc=True).dt.as_unit("ms").astype("int64").to_numpy()
    return (ms - 1) // DAY_MS  # (ms - 1) puts an event at exactly midnight in the day it ends


def _partials(batch: pd.DataFrame, keys: Sequence[str], bases: Sequence[_Base]) -> pd.DataFrame:
    """Sums of each base per ``(_kind, _id, _day)`` within one batch (map-side combine).

    Every event contributes once per entity key; ``_kind`` names the key.
    """
    day = bucket_of(batch["event_time"])
    values: dict[str, np.ndarray] = {}
    for base in bases:
        hit = batch["event_type"].isin(base.event_types).to_numpy()
        if base.kind == "count":
            values[base.name] = hit.astype(np.int64)
        else:
            assert base.column is not None
            column = batch[base.column].fillna(0).to_numpy(dtype=np.int64)
            values[base.name] = np.where(hit, column, 0)
    frames = [pd.DataFrame({"_kind": key, "_id": batch[key].to_numpy(), _BUCKET: day, **values})
              for key in keys]
    stacked = pd.concat(frames, ignore_index=True)
    return stacked.groupby(["_kind", "_id", _BUCKET], as_index=False, sort=False).sum()


def daily_partials(ds: Any, keys: Sequence[str], bases: Sequence[_Base]) -> dict[str, pd.DataFrame]:
    """Ray Data: per (entity, day bucket) sums of every base, for each entity key.

    Args:
        ds: A Ray dataset of lake events.
        keys: Entity key columns (``user_id``, ``item_id``).
        bases: What to count or sum.

    Returns:
        For each key, a frame with columns key, ``_day`` and one column per base.
    """
    names = [b.name for b in bases]
    # Map-side combine in the Ray tasks; the combined partials (entities x days, orders of
    # magnitude fewer rows than events) are summed once more on the driver. A Ray hash
    # shuffle of the raw contributions was far slower on a small cluster.
    combined = ds.map_batches(
        _partials, batch_format="pandas", batch_size=None,
        fn_kwargs={"keys": keys, "bases": bases},  # type: ignore[arg-type]
    ).to_pandas()
    daily = combined.groupby(["_kind", "_id", _BUCKET], as_index=False, sort=False)[names].sum()
    return {key: daily[daily["_kind"] == key].drop(columns="_kind").rename(columns={"_id": key})
            for key in keys}


def _engaged_only(batch: pd.DataFrame) -> pd.DataFrame:
    return batch[batch["event_type"].isin(F.ENGAGEMENT_TYPES)]


def _first_days(daily: pd.DataFrame, key: str) -> pd.Series:
    return daily.groupby(key)[_BUCKET].min()


def windowed_features(
    daily: pd.DataFrame, key: str, group: F.FeatureGroup, out_days: list[date]
) -> pd.DataFrame:
    """Sliding-window aggregates and ratios as of each day end in ``out_days``.

    Args:
        daily: Output of :func:`daily_partials` for the group's entity.
        key: Entity key column.
        group: The feature group (windowed aggregates + ratios).
        out_days: Days to emit rows for.

    Returns:
        One row per entity and day from the entity's first event on: key, ``window_end``,
        ``group.feature_names``.
    """
    entities = np.sort(daily[key].unique())
    row = np.searchsorted(entities, daily[key].to_numpy())
    lo = _day_index(out_days[0]) - max(a.window.days for a in group.aggregates)
    n_days = _day_index(out_days[-1]) - lo + 1
    col = daily[_BUCKET].to_numpy() - lo
    keep = (col >= 0) & (col < n_days)
    first = _first_days(daily, key).reindex(entities).to_numpy()
    frames = []
    cumulative: dict[str, np.ndarray] = {}
    for base in {_base(a) for a in group.aggregates}:
        dense = np.zeros((entities.size, n_days + 1), dtype=np.int64)  # column 0: before lo
        np.add.at(dense, (row[keep], col[keep] + 1), daily[base.name].to_numpy()[keep])
        cumulative[base.name] = np.cumsum(dense, axis=1)
    for day in out_days:
        d = _day_index(day) - lo + 1
        alive = first <= _day_index(day)
        values: dict[str, np.ndarray] = {}
        for agg in group.aggregates:
            cs = cumulative[_base(agg).name]
            values[agg.name] = (cs[:, d] - cs[:, max(d - agg.window.days, 0)])[alive]
        for r in group.ratios:
            num = values[r.numerator].astype(np.float64)
            den = values[r.denominator].astype(np.float64)
            values[r.name] = np.divide(num, den, out=np.zeros_like(num), where=den != 0)
        frame = pd.DataFrame({key: entities[alive], F.WINDOW_END: day_end(day)})
        frames.append(frame.assign(**{name: values[name] for name in group.feature_names}))
    return pd.concat(frames, ignore_index=True)


def _recent_distinct(items: np.ndarray, stop: int, length: int) -> list[str]:
    seen: dict[str, None] = {}
    for item in items[:stop][::-1]:
        if item not in seen:
            seen[item] = None
            if len(seen) == length:
                break
    return list(seen)


def top_categories(
    engaged: pd.DataFrame, bucket: np.ndarray, out_days: list[date]
) -> dict[tuple[str, int], list[str]]:
    """Per (user, day index): the most engaged categories over the last 30 days, ties by name."""
    window = timedelta(days=30).days
    daily = (engaged.assign(_day=bucket).groupby(["user_id", "_cat", "_day"]).size()
             .rename("n").reset_index())
    out: dict[tuple[str, int], list[str]] = {}
    for day in out_days:
        d = _day_index(day)
        recent = daily[(daily["_day"] > d - window) & (daily["_day"] <= d)]
        counts = recent.groupby(["user_id", "_cat"], as_index=False)["n"].sum()
        counts = counts.sort_values(["user_id", "n", "_cat"], ascending=[True, False, True])
        top = counts.groupby("user_id").head(F.TOP_CATEGORIES)
        for user, cats in top.groupby("user_id", sort=False)["_cat"]:
            out[(str(user), d)] = [str(c) for c in cats]
    return out


def user_history(
    engaged: pd.DataFrame, users_first: pd.Series, out_days: list[date], categories: pd.Series
) -> pd.DataFrame:
    """History and top categories of each user as of each day end.

    ``user_history``: the last :data:`HISTORY_LENGTH` distinct items the user engaged with
    (click/watch/like/share), newest first. ``user_top_categories``: the
    :data:`TOP_CATEGORIES` categories with most engagements in the last 30 days, ties by name.
    """
    engaged = engaged.sort_values(["user_id", "event_time", "event_id"], kind="stable")
    engaged = engaged.assign(_cat=engaged["item_id"].map(categories).fillna("unknown"))
    bucket = bucket_of(engaged["event_time"])
    tops = top_categories(engaged, bucket, out_days)
    by_user = engaged.groupby("user_id", sort=False).indices
    items_all = engaged["item_id"].to_numpy()
    rows: list[tuple[str, pd.Timestamp, list[str], list[str]]] = []
    for user, first in users_first.items():
        idx = by_user.get(user)
        items = items_all[idx] if idx is not None else items_all[:0]
        b = bucket[idx] if idx is not None else bucket[:0]
        for day in out_days:
            d = _day_index(day)
            if first > d:
                continue
            stop = int(np.searchsorted(b, d, side="right"))
            history = _recent_distinct(items, stop, F.HISTORY_LENGTH)
            rows.append((str(user), day_end(day), history, tops.get((str(user), d), [])))
    return pd.DataFrame(
        rows, columns=[F.USER_KEY, F.WINDOW_END, F.USER_HISTORY, F.USER_TOP_CATEGORIES]
    )


def item_metadata(items: pd.DataFrame, out_days: list[date]) -> pd.DataFrame:
    """Catalog metadata and age of every published item as of each day end."""
    frames = []
    for day in out_days:
        t = day_end(day)
        live = items[items["published_at"] <= t]
        age = (t - live["published_at"]).dt.total_seconds() / 86_400.0
        frame = live[[F.ITEM_KEY, *F.ITEM_METADATA]].assign(
            **{F.WINDOW_END: t, F.ITEM_AGE_DAYS: age.to_numpy(dtype=np.float64)}
        )
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def lake_files(lake_dir: Path, start: date, end: date, lookback_days: int) -> list[str]:
    """Event partitions that can hold events of the windows ending on ``start..end``."""
    wanted = days(start - timedelta(days=lookback_days), end + timedelta(days=1))
    paths = [lake_dir / "events" / f"date={d.isoformat()}" / "part-0.parquet" for d in wanted]
    return [str(p) for p in paths if p.is_file() and pq.read_metadata(p).num_rows > 0]


@dataclass
class FeatureTables:
    """The computed offline tables, one frame per Feast feature view."""

    frames: dict[str, pd.DataFrame]

    @property
    def rows(self) -> dict[str, int]:
        return {name: len(frame) for name, frame in self.frames.items()}


def compute_features(lake_dir: Path, start: date, end: date) -> FeatureTables:
    """Computes every batch view as of each day end in ``[start, end]`` (Ray must be up).

    Raises:
        EmptyLakeError: No clean events in the lake for the range and its windows.
    """
    out_days = days(start, end)
    lookback = max(a.window.days for g in F.BATCH_GROUPS for a in g.aggregates)
    files = lake_files(lake_dir, start, end, lookback)
    if not files:
        raise EmptyLakeError(lake_dir, start, end)
    last_bucket = _day_index(end)
    import ray.data

    columns = sorted({"event_id", "event_time", "event_type", F.USER_KEY, F.ITEM_KEY}
                     | {a.column for g in F.BATCH_GROUPS for a in g.aggregates if a.column})
    ds = ray.data.read_parquet(files, columns=columns).materialize()  # read once, used twice
    bases = sorted({_base(a) for g in F.BATCH_GROUPS for a in g.aggregates},
                   key=lambda b: b.name)
    keys = [F.ENTITY_KEYS[g.entity] for g in F.BATCH_GROUPS]
    partials = daily_partials(ds, keys, bases)
    frames: dict[str, pd.DataFrame] = {}
    firsts: dict[str, pd.Series] = {}
    for group in F.BATCH_GROUPS:
        key = F.ENTITY_KEYS[group.entity]
        daily = partials[key]
        daily = daily[daily[_BUCKET] <= last_bucket]
        firsts[group.entity] = _first_days(daily, key)
        frames[group.name] = windowed_features(daily, key, group, out_days)
    engaged = ds.map_batches(_engaged_only, batch_format="pandas").to_pandas()
    engaged = engaged[bucket_of(engaged["event_time"]) <= last_bucket]
    items = read_catalog(lake_dir)
    categories = items.set_index(F.ITEM_KEY)["category"]
    frames[F.USER_HISTORY_VIEW] = user_history(engaged, firsts["user"], out_days, categories)
    frames[F.ITEM_METADATA_VIEW] = item_metadata(items, out_days)
    tables = FeatureTables(frames)
    logger.info("batch features %s..%s: %s", start, end, tables.rows)
    return tables


def read_catalog(lake_dir: Path) -> pd.DataFrame:
    """The item catalog snapshot the ETL keeps in the lake (empty if not synced yet)."""
    path = lake_dir / "catalog" / "items.parquet"
    if not path.is_file():
        logger.warning("no item catalog at %s: item metadata will be empty", path)
        return ITEM_SCHEMA.empty_table().to_pandas()
    return pq.read_table(path, schema=ITEM_SCHEMA).to_pandas()


# Offline table schemas: one per Feast view (stream views get empty tables until pushed).
def view_schemas() -> dict[str, pa.Schema]:
    """Arrow schema of the offline table behind each feature view."""
    ts = pa.field(F.WINDOW_END, pa.timestamp("ms", tz="UTC"))
    user, item = pa.field(F.USER_KEY, pa.string()), pa.field(F.ITEM_KEY, pa.string())
    strings = pa.list_(pa.string())

    def windowed(group: F.FeatureGroup) -> list[pa.Field]:
        fields = [pa.field(a.name, pa.int64()) for a in group.aggregates]
        return fields + [pa.field(r.name, pa.float64()) for r in group.ratios]

    return {
        F.USER_BATCH.name: pa.schema([user, ts, *windowed(F.USER_BATCH)]),
        F.ITEM_BATCH.name: pa.schema([item, ts, *windowed(F.ITEM_BATCH)]),
        F.USER_HISTORY_VIEW: pa.schema(
            [user, ts, pa.field(F.USER_HISTORY, strings), pa.field(F.USER_TOP_CATEGORIES, strings)]
        ),
        F.ITEM_METADATA_VIEW: pa.schema(
            [item, ts, *(ITEM_SCHEMA.field(name) for name in F.ITEM_METADATA),
             pa.field(F.ITEM_AGE_DAYS, pa.float64())]
        ),
        F.USER_STREAM.name: pa.schema(
            [user, ts, *windowed(F.USER_STREAM), pa.field(F.USER_RECENT_ITEMS, strings)]
        ),
        F.ITEM_TRENDING.name: pa.schema([item, ts, *windowed(F.ITEM_TRENDING)]),
    }


def write_feature_tables(tables: FeatureTables, data_dir: Path) -> dict[str, int]:
    """Writes each view's rows as one file per day (atomic replace); returns files written.

    Stream views, which the Flink job fills online, get an empty offline table so that
    historical retrieval through the feature services works before anything is pushed.
    """
    schemas = view_schemas()
    written: dict[str, int] = {}
    for name, frame in tables.frames.items():
        schema = schemas[name]
        folder = data_dir / name
        for stamp, part in frame.groupby(F.WINDOW_END, sort=True):
            day = (pd.Timestamp(stamp) - timedelta(days=1)).date()
            table = pa.Table.from_pandas(part[schema.names], schema=schema, preserve_index=False)
            atomic_write_table(table, folder / f"{day.isoformat()}.parquet")
            written[name] = written.get(name, 0) + 1
    for group in F.STREAM_GROUPS:
        path = data_dir / group.name / "none.parquet"
        if not path.is_file():
            atomic_write_table(schemas[group.name].empty_table(), path)
    return written
