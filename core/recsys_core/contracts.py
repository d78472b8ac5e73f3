"""Data contracts: the raw event, the item catalog and users, plus their validators.

Every stage imports its schemas from here. Raw events arrive as logs (timestamps are ISO-8601
strings, anything may be null); :func:`validate_events` splits them into typed clean rows and
rejected rows that carry a ``reason`` each, so nothing is dropped silently.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from recsys_core.errors import ContractError
from recsys_core.features import USER_HISTORY

EVENT_TYPES: tuple[str, ...] = ("impression", "click", "watch", "like", "share", "skip")
SURFACES: tuple[str, ...] = ("feed", "search", "related", "notification")
DEVICES: tuple[str, ...] = ("ios", "android", "web", "tv")
TIMESTAMP = pa.timestamp("ms", tz="UTC")

# Identifiers (event, user, item, request, model version): what serving accepts in a request
# and the ETL accepts in the lake. No path separators, whitespace or control characters.
MAX_ID_LENGTH = 128
ID_CHARS = "A-Z a-z 0-9 _ . : @ -"
ID_PATTERN = rf"^[A-Za-z0-9_][A-Za-z0-9_.:@-]{{0,{MAX_ID_LENGTH - 1}}}$"

# As events land in the raw area: event_time is the producer's ISO-8601 string.
RAW_EVENT_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.string()),
        pa.field("event_time", pa.string()),
        pa.field("user_id", pa.string()),
        pa.field("item_id", pa.string()),
        pa.field("event_type", pa.string()),
        pa.field("watch_time_ms", pa.int64()),
        pa.field("item_duration_ms", pa.int64()),
        pa.field("surface", pa.string()),
        pa.field("device", pa.string()),
        pa.field("request_id", pa.string()),
        pa.field("model_version", pa.string()),
    ]
)

# After validation, in the lake.
EVENT_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("event_time", TIMESTAMP, nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("event_type", pa.string(), nullable=False),
        pa.field("watch_time_ms", pa.int64()),
        pa.field("item_duration_ms", pa.int64()),
        pa.field("surface", pa.string()),
        pa.field("device", pa.string()),
        pa.field("request_id", pa.string()),
        pa.field("model_version", pa.string()),
    ]
)

ITEM_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=False),
        pa.field("creator_id", pa.string(), nullable=False),
        pa.field("tags", pa.list_(pa.string())),
        pa.field("duration_ms", pa.int64()),
        pa.field("published_at", TIMESTAMP, nullable=False),
        pa.field("title", pa.string()),
        pa.field("updated_at", TIMESTAMP, nullable=False),
    ]
)

USER_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("signup_at", TIMESTAMP, nullable=False),
        pa.field("country", pa.string()),
        pa.field("age_bucket", pa.string()),
        pa.field("updated_at", TIMESTAMP, nullable=False),
    ]
)

# The served-impression log (``landing/served/date=.../*.parquet``): one row per served item,
# written by serving, read by monitoring, experiment analysis and the training-set builder.
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
        # Per request (repeated on its rows); null in files written before they existed.
        pa.field("experiment_id", pa.string()),  # the online experiment it was served in
        pa.field("arm", pa.string()),  # control | treatment
        pa.field("degraded", pa.string()),  # comma-separated stages that fell back
        pa.field("latency_ms", pa.float64()),  # request start to response built, in-process
        # The features the model was given for the user, as served: a JSON object of the
        # numeric online features (batch and stream views) and a JSON list of the history.
        pa.field("user_features", pa.string()),
        pa.field(USER_HISTORY, pa.string()),
    ]
)

# Rejection reasons, stable strings that dashboards and tests count on.
REASON_MISSING = "missing {column}"
REASON_BAD_TIME = "event_time is not an ISO-8601 timestamp"
REASON_BAD_TYPE = "event_type not in " + "|".join(EVENT_TYPES)
REASON_NEGATIVE_WATCH = "watch_time_ms is negative"
REASON_NEGATIVE_DURATION = "item_duration_ms is negative"
REASON_BAD_ID = "{column} is not an id (1-" + str(MAX_ID_LENGTH) + " of " + ID_CHARS + ")"
REASON_BAD_SURFACE = "surface not in " + "|".join(SURFACES)
REASON_BAD_DEVICE = "device not in " + "|".join(DEVICES)
# Checked on every event, wherever it came from (producers, the served-impression log).
_ID_COLUMNS = ("event_id", "user_id", "item_id")
_OPTIONAL_ID_COLUMNS = ("request_id", "model_version")


def _require(frame: pd.DataFrame, schema: pa.Schema, contract: str) -> None:
    missing = [name for name in schema.names if name not in frame.columns]
    if missing:
        raise ContractError(contract, missing)


def _empty_string(series: pd.Series) -> pd.Series:
    return series.isna() | (series.astype("string").str.len() == 0)


def _not_id(series: pd.Series, optional: bool = False) -> pd.Series:
    """True where a value is not an id (nulls count as ids when ``optional``)."""
    text = series.astype("string")
    bad = ~text.str.fullmatch(ID_PATTERN).fillna(False).astype(bool)
    return bad & series.notna() if optional else bad


def _not_in(series: pd.Series, allowed: tuple[str, ...]) -> pd.Series:
    """True where a non-null value is outside ``allowed``."""
    return series.notna() & ~series.isin(allowed)


def validate_events(raw: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Splits raw events into valid, typed rows and rejected rows with a reason per row.

    The first failing check names the reason; checks run in a fixed order so that counts are
    reproducible. Ids must match :data:`ID_PATTERN`, ``surface``/``device`` (when set) the
    contract's vocabularies: served impressions are held to the same rules as every event.

    Args:
        raw: Events with the columns of :data:`RAW_EVENT_SCHEMA` (extra columns are kept).

    Returns:
        ``(valid, rejected)``. ``valid`` has ``event_time`` as UTC timestamps; ``rejected`` keeps
        the raw columns plus ``reason``. ``len(valid) + len(rejected) == len(raw)``.

    Raises:
        ContractError: A required column is missing altogether.
    """
    _require(raw, RAW_EVENT_SCHEMA, "raw event")
    frame = raw.reset_index(drop=True)
    reason = pd.Series(pd.NA, index=frame.index, dtype="string")

    def flag(mask: pd.Series | np.ndarray, text: str) -> None:
        hit = pd.Series(mask, index=frame.index) & reason.isna()
        reason[hit] = text

    for column in ("event_id", "user_id", "item_id", "event_type"):
        flag(_empty_string(frame[column]), REASON_MISSING.format(column=column))
    times = pd.to_datetime(frame["event_time"], errors="coerce", utc=True, format="ISO8601")
    flag(times.isna(), REASON_BAD_TIME)
    flag(~frame["event_type"].isin(EVENT_TYPES), REASON_BAD_TYPE)
    flag(frame["watch_time_ms"].fillna(0) < 0, REASON_NEGATIVE_WATCH)
    flag(frame["item_duration_ms"].fillna(0) < 0, REASON_NEGATIVE_DURATION)
    for column in _ID_COLUMNS:
        flag(_not_id(frame[column]), REASON_BAD_ID.format(column=column))
    for column in _OPTIONAL_ID_COLUMNS:
        flag(_not_id(frame[column], optional=True), REASON_BAD_ID.format(column=column))
    flag(_not_in(frame["surface"], SURFACES), REASON_BAD_SURFACE)
    flag(_not_in(frame["device"], DEVICES), REASON_BAD_DEVICE)

    bad = reason.notna()
    rejected = frame[bad].copy()
    rejected["reason"] = reason[bad].astype(str)
    valid = frame[~bad].copy()
    valid["event_time"] = times[~bad].dt.as_unit("ms")
    for column in ("watch_time_ms", "item_duration_ms"):
        valid[column] = valid[column].astype("Int64")
    return valid.reset_index(drop=True), rejected.reset_index(drop=True)


def split_duplicates(events: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keeps the first occurrence of each ``event_id``; returns ``(unique, duplicates)``."""
    dup = events.duplicated(subset="event_id", keep="first")
    return events[~dup].reset_index(drop=True), events[dup].reset_index(drop=True)


def _validate_required(
    frame: pd.DataFrame, schema: pa.Schema, contract: str, required: Sequence[str]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    _require(frame, schema, contract)
    frame = frame.reset_index(drop=True)
    reason = pd.Series(pd.NA, index=frame.index, dtype="string")
    for column in required:
        hit = _empty_string(frame[column]) & reason.isna()
        reason[hit] = REASON_MISSING.format(column=column)
    bad = reason.notna()
    rejected = frame[bad].copy()
    rejected["reason"] = reason[bad].astype(str)
    return frame[~bad].reset_index(drop=True), rejected.reset_index(drop=True)


def validate_items(items: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Splits catalog rows into valid rows and rejected rows with a reason per row."""
    required = ("item_id", "category", "creator_id", "published_at", "updated_at")
    return _validate_required(items, ITEM_SCHEMA, "item catalog", required)


def validate_users(users: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Splits user rows into valid rows and rejected rows with a reason per row."""
    return _validate_required(users, USER_SCHEMA, "users", ("user_id", "signup_at", "updated_at"))


def to_table(frame: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    """Converts a frame to an Arrow table with exactly the contract's columns and types."""
    _require(frame, schema, "table")
    return pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)
