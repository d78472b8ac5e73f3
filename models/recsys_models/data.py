"""Training data: snapshot discovery, Ray Data loading and feature encoding.

A training snapshot is a directory ``<data_dir>/training/<snapshot_id>/*.parquet`` with one row
per impression (the batch pipeline builds it from Feast's point-in-time join). Every model input
comes out of :func:`encode_rows` / :func:`encode_catalog` as a dict of numpy arrays, so the same
code feeds Ray Data batches during training and pandas frames at serving time.

Ids become embedding-table rows (:mod:`recsys_models.hashing`): hashed into fixed bucket
spaces (row 0 is reserved), or, with a vocabulary cap set, frequent training ids get rows of
their own and the rest share a hashed tail; a new user or item never breaks the model.
Categories use a small vocabulary learned from the catalog.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recsys_core.features import HISTORY_LENGTH, ITEM_BATCH, USER_BATCH, USER_HISTORY
from recsys_models.errors import SnapshotNotFoundError
from recsys_models.hashing import (
    CREATOR_SALT,
    ITEM_SALT,
    TAG_SALT,
    USER_SALT,
    IdCodes,
    build_vocabulary,
    hash_ids,
    hash_lists,
)

logger = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]
MAX_TAGS = 4
STATIC_ITEM_DENSE = 2  # leading item_dense columns known at index time: log duration, log age
ROW_COLUMNS: tuple[str, ...] = (
    "user_id", "item_id", "event_time", "clicked", "watch_time_ms", USER_HISTORY,
    "category", "creator_id", "tags", "duration_ms", "item_age_days",
)


@dataclass(frozen=True)
class EncoderSpec:
    """How raw columns become model inputs; saved inside every bundle.

    Example:
        >>> spec = EncoderSpec.from_catalog(items, columns=list(rows.columns))
        >>> batch = encode_rows(rows, spec)
    """

    user_buckets: int = 50_000  # user-id embedding rows (hashed, or vocabulary + hashed tail)
    item_buckets: int = 100_000  # item-id embedding rows (also used for the history)
    creator_buckets: int = 10_000
    tag_buckets: int = 5_000
    categories: tuple[str, ...] = ()  # vocabulary; index 0 is "unknown"
    user_features: tuple[str, ...] = ()  # numeric user features present in the snapshot
    item_features: tuple[str, ...] = ()  # numeric item features present in the snapshot
    history_length: int = HISTORY_LENGTH
    use_item_age: bool = True  # off when item embeddings must not depend on the query time
    # Tables sized to the data (with_vocabularies): > 0, the N ids most frequent in the
    # training rows (seen at least vocab_min_count times) get rows of their own, and the id
    # table becomes 1 + vocabulary + tail_buckets rows (the tail: rarer and new ids, hashed).
    item_vocab_cap: int = 0
    user_vocab_cap: int = 0
    vocab_min_count: int = 2
    tail_buckets: int = 4_096
    item_vocab: tuple[str, ...] = ()  # rows 1..V of the item table, most frequent first
    user_vocab: tuple[str, ...] = ()

    @property
    def item_dense_dim(self) -> int:
        return STATIC_ITEM_DENSE + len(self.item_features)  # duration, age, item features

    @cached_property
    def item_codes(self) -> IdCodes:
        """Item ids (catalog and histories) to rows of the item tables."""
        return IdCodes(self.item_vocab, self.item_buckets, ITEM_SALT)

    @cached_property
    def user_codes(self) -> IdCodes:
        """User ids to rows of the user-id tables."""
        return IdCodes(self.user_vocab, self.user_buckets, USER_SALT)

    def with_vocabularies(self, rows: pd.DataFrame) -> EncoderSpec:
        """The spec with id tables sized from training ``rows`` (``user_id``, ``item_id``)
        where a vocabulary cap is set; unchanged otherwise."""
        changes: dict[str, Any] = {}
        if self.item_vocab_cap:
            vocab = build_vocabulary(rows["item_id"], self.item_vocab_cap, self.vocab_min_count)
            changes |= {"item_vocab": vocab, "item_buckets": 1 + len(vocab) + self.tail_buckets}
        if self.user_vocab_cap:
            vocab = build_vocabulary(rows["user_id"], self.user_vocab_cap, self.vocab_min_count)
            changes |= {"user_vocab": vocab, "user_buckets": 1 + len(vocab) + self.tail_buckets}
        return replace(self, **changes) if changes else self

    def table_sizes(self) -> dict[str, int]:
        """Rows of the id tables and how many of them are vocabulary (for MLflow and logs)."""
        return {"item_table_rows": self.item_buckets, "item_vocabulary": len(self.item_vocab),
                "user_table_rows": self.user_buckets, "user_vocabulary": len(self.user_vocab)}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderSpec:
        data = dict(data)
        for key in ("categories", "user_features", "item_features", "item_vocab", "user_vocab"):
            data[key] = tuple(data.get(key, ()))
        return cls(**data)

    @classmethod
    def from_catalog(
        cls, items: pd.DataFrame, columns: list[str] | None = None, **overrides: Any
    ) -> EncoderSpec:
        """Builds the spec: category vocabulary from the catalog, features from the columns."""
        cats = tuple(sorted(items["category"].dropna().astype(str).unique()))
        cols = set(columns or [])
        user = tuple(n for n in USER_BATCH.feature_names if n in cols)
        item = tuple(n for n in ITEM_BATCH.feature_names if n in cols)
        return cls(categories=cats, user_features=user, item_features=item, **overrides)


@dataclass
class CategoryIndex:
    """Vocabulary lookup built from a spec (kept out of the frozen spec for speed)."""

    spec: EncoderSpec
    lookup: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.lookup = {c: i + 1 for i, c in enumerate(self.spec.categories)}

    def encode(self, values: pd.Series) -> np.ndarray:
        return values.astype(object).map(self.lookup).fillna(0).to_numpy(np.int64)


def signed_log(x: np.ndarray) -> np.ndarray:
    """``sign(x) * log1p(|x|)``: one squashing for every count, sum and duration."""
    return (np.sign(x) * np.log1p(np.abs(x))).astype(np.float32)


def _numeric(frame: pd.DataFrame, names: tuple[str, ...]) -> np.ndarray:
    if not names:
        return np.zeros((len(frame), 0), dtype=np.float32)
    cols = [
        pd.to_numeric(frame[n], errors="coerce").fillna(0.0).to_numpy(np.float64)
        if n in frame.columns else np.zeros(len(frame))
        for n in names
    ]
    return signed_log(np.stack(cols, axis=1))


def encode_users(frame: pd.DataFrame, spec: EncoderSpec) -> Batch:
    """User-tower inputs: ``user_hash`` (n,), ``history`` (n, H), ``user_num`` (n, U)."""
    history = frame[USER_HISTORY] if USER_HISTORY in frame.columns else pd.Series(
        [[]] * len(frame), index=frame.index)
    return {
        "user_hash": spec.user_codes.encode(frame["user_id"].to_numpy()),
        "history": spec.item_codes.encode_lists(history, spec.history_length),
        "user_num": _numeric(frame, spec.user_features),
    }


def encode_items(
    frame: pd.DataFrame, spec: EncoderSpec, known: np.ndarray | None = None
) -> Batch:
    """Item-tower inputs from item metadata (one row per item or per impression).

    Args:
        frame: ``item_id, category, creator_id, tags, duration_ms`` and ``item_age_days``
            (numeric item features optional).
        spec: The encoder spec.
        known: Optional boolean mask; rows marked False get id bucket 0 (cold start: the item
            tower then embeds the item from its metadata alone).

    Returns:
        ``item_hash`` (n,), ``category`` (n,), ``creator`` (n,), ``tags`` (n, MAX_TAGS),
        ``item_dense`` (n, 2 + I): the ``STATIC_ITEM_DENSE`` metadata columns, then the numeric
        item features (ranker only: the item tower never reads them, see ``ItemTower``).
    """
    item_hash = spec.item_codes.encode(frame["item_id"].to_numpy())
    if known is not None:
        item_hash = np.where(known, item_hash, 0)
    zeros = pd.Series(np.zeros(len(frame)), index=frame.index)
    duration = pd.to_numeric(frame.get("duration_ms", zeros), errors="coerce")
    age = pd.to_numeric(frame.get("item_age_days", zeros) if spec.use_item_age else zeros,
                        errors="coerce")
    dense = np.stack(
        [
            signed_log(np.nan_to_num(np.asarray(duration, dtype=np.float64)) / 1000.0),
            signed_log(np.clip(np.nan_to_num(np.asarray(age, dtype=np.float64)), 0, None)),
        ],
        axis=1,
    ).astype(np.float32)
    return {
        "item_hash": item_hash,
        "category": CategoryIndex(spec).encode(frame["category"]),
        "creator": hash_ids(frame["creator_id"].to_numpy(), spec.creator_buckets, CREATOR_SALT),
        "tags": hash_lists(frame["tags"], MAX_TAGS, spec.tag_buckets, TAG_SALT),
        "item_dense": np.concatenate([dense, _numeric(frame, spec.item_features)], axis=1),
    }


def encode_rows(
    frame: pd.DataFrame,
    spec: EncoderSpec,
    log_q: dict[str, float] | None = None,
    default_log_q: float = 0.0,
) -> Batch:
    """Encodes impression rows for training: user + item inputs, labels and logQ.

    Labels: ``clicked`` (n,) float; ``watch_log`` (n,) = log1p(watch seconds) with ``watch_mask``
    1.0 where watch time is known (NaN means unknown, as in MovieLens). ``log_q`` is the log of
    the item's share of training positives (the sampling probability of in-batch negatives).
    ``row_key`` identifies the row (a hash of user, item and time) for diagnostics.
    """
    batch = encode_users(frame, spec) | encode_items(frame, spec)
    watch = pd.to_numeric(frame["watch_time_ms"], errors="coerce").to_numpy(np.float64)
    mask = ~np.isnan(watch)
    batch["clicked"] = pd.to_numeric(frame["clicked"]).fillna(0).to_numpy(np.float32)
    batch["watch_log"] = np.where(mask, np.log1p(np.nan_to_num(watch) / 1000.0), 0.0).astype(
        np.float32)
    batch["watch_mask"] = mask.astype(np.float32)
    lookup = log_q or {}
    batch["log_q"] = (
        frame["item_id"].map(lookup).fillna(default_log_q).to_numpy(np.float32)
    )
    key = frame["user_id"].astype(str) + "|" + frame["item_id"].astype(str) + "|" + frame[
        "event_time"].astype(str)
    batch["row_key"] = pd.util.hash_array(key.to_numpy(dtype=object)).astype(np.int64)
    return batch


def item_log_q(positives: pd.Series) -> tuple[dict[str, float], float]:
    """logQ correction terms: log share of each item among positives, and a floor for others."""
    counts = positives.value_counts()
    total = float(counts.sum())
    if total == 0:
        return {}, 0.0
    return np.log(counts / total).astype(float).to_dict(), float(np.log(0.5 / total))


def catalog_frame(items: pd.DataFrame, as_of: pd.Timestamp) -> pd.DataFrame:
    """Catalog rows (ITEM_SCHEMA) with ``item_age_days`` computed at ``as_of``."""
    frame = items.copy()
    published = pd.to_datetime(frame["published_at"], utc=True)
    frame["item_age_days"] = ((as_of - published).dt.total_seconds() / 86_400.0).clip(lower=0)
    return frame.reset_index(drop=True)


def snapshot_dir(data_dir: Path, snapshot_id: str | None = None) -> Path:
    """The directory of a snapshot (the most recently written when ``snapshot_id`` is None;
    snapshot ids are content hashes, so names do not sort by time)."""
    root = Path(data_dir) / "training"
    if snapshot_id is not None:
        path = root / snapshot_id
        if not any(path.glob("*.parquet")):
            raise SnapshotNotFoundError(str(path))
        return path
    candidates = sorted((p for p in root.glob("*") if p.is_dir() and any(p.glob("*.parquet"))),
                        key=lambda p: (max(f.stat().st_mtime for f in p.glob("*.parquet")), p.name))
    if not candidates:
        raise SnapshotNotFoundError(str(root))
    return candidates[-1]


def read_snapshot(path: Path) -> Any:
    """Opens a snapshot as a Ray Data dataset (lazy; nothing is read until consumed)."""
    import ray.data

    return ray.data.read_parquet(str(path), file_extensions=["parquet"])


def time_cutoff(event_times: pd.Series, holdout_fraction: float) -> pd.Timestamp:
    """The time splitting train (before) from holdout (at or after): a quantile of event time."""
    times = pd.to_datetime(event_times, utc=True)
    return times.quantile(1.0 - holdout_fraction)


def time_split(
    frame: pd.DataFrame, holdout_fraction: float
) -> tuple[pd.DataFrame, pd.DataFrame, pd.Timestamp]:
    """Splits rows by time: the last ``holdout_fraction`` of the time range is the holdout."""
    cutoff = time_cutoff(frame["event_time"], holdout_fraction)
    times = pd.to_datetime(frame["event_time"], utc=True)
    train, holdout = frame[times < cutoff], frame[times >= cutoff]
    return train.reset_index(drop=True), holdout.reset_index(drop=True), cutoff


def numeric_features(frame: pd.DataFrame, names: tuple[str, ...]) -> np.ndarray:
    """Squashed numeric feature columns (n, len(names)); absent columns are zeros."""
    return _numeric(frame, names)
