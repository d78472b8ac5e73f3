"""Imports MovieLens (``ratings.csv`` + ``movies.csv``) into the platform's data contracts.

Mapping (also in docs/data.md):

- every rating is one interaction and one ``impression`` event at the rating's timestamp;
- a rating >= :data:`POSITIVE_RATING` is a positive engagement: one ``click`` event one second
  later (watch time is unknown in MovieLens, so ``watch_time_ms`` stays null and the ranker
  masks its watch-time head on these rows);
- ``movieId`` -> ``item_id`` and ``userId`` -> ``user_id``, unchanged (MovieLens's own ids, as
  strings: ``recsys recommend`` answers in them; the generator's ids are ``u<n>``/``i<n>``);
- genres -> ``tags`` (all genres) and ``category`` (the first genre); the release year in the
  title -> ``published_at`` (January 1st; the first rating's time when the title has no year);
- ``creator_id`` is ``unknown`` and ``duration_ms`` null: MovieLens has neither;
- users' ``signup_at`` is their first rating; country and age bucket are unknown (null).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from recsys_core.contracts import EVENT_SCHEMA, ITEM_SCHEMA, USER_SCHEMA, to_table
from recsys_core.errors import DatasetNotFoundError
from recsys_core.features import HISTORY_LENGTH, USER_HISTORY

logger = logging.getLogger(__name__)

POSITIVE_RATING = 4.0


@dataclass(frozen=True)
class MovieLensData:
    """The imported dataset: one row per rating in ``interactions``."""

    interactions: pd.DataFrame  # user_id, item_id, rating, event_time, positive
    events: pd.DataFrame  # EVENT_SCHEMA rows: impressions + clicks
    items: pd.DataFrame  # ITEM_SCHEMA rows
    users: pd.DataFrame  # USER_SCHEMA rows


def load_movielens(path: Path) -> MovieLensData:
    """Reads a MovieLens directory in the ``ml-latest-small`` format.

    Raises:
        DatasetNotFoundError: ``ratings.csv`` or ``movies.csv`` is missing.
    """
    for name in ("ratings.csv", "movies.csv"):
        if not (path / name).is_file():
            raise DatasetNotFoundError(
                str(path / name), "pass the folder holding ratings.csv and movies.csv"
            )
    ratings = pd.read_csv(path / "ratings.csv")
    movies = pd.read_csv(path / "movies.csv")

    interactions = pd.DataFrame(
        {
            "user_id": ratings["userId"].astype(str),
            "item_id": ratings["movieId"].astype(str),
            "rating": ratings["rating"].astype(float),
            "event_time": pd.to_datetime(ratings["timestamp"], unit="s", utc=True).dt.as_unit(
                "ms"
            ),
        }
    )
    interactions["positive"] = interactions["rating"] >= POSITIVE_RATING
    return MovieLensData(
        interactions=interactions,
        events=_events(interactions),
        items=_items(movies, interactions),
        users=_users(interactions),
    )


def _events(interactions: pd.DataFrame) -> pd.DataFrame:
    n = len(interactions)
    impressions = interactions.assign(
        event_id="ml-imp-" + pd.Series(np.arange(n).astype(str)), event_type="impression"
    )
    pos = interactions[interactions["positive"]]
    clicks = pos.assign(
        event_id="ml-clk-" + pd.Series(np.arange(len(pos)).astype(str), index=pos.index),
        event_type="click",
        event_time=pos["event_time"] + pd.Timedelta(seconds=1),
    )
    events = pd.concat([impressions, clicks], ignore_index=True)
    events = events.sort_values(["event_time", "event_id"], kind="stable").reset_index(drop=True)
    for column in ("watch_time_ms", "item_duration_ms"):
        events[column] = pd.array([None] * len(events), dtype="Int64")
    events["surface"] = "feed"
    events["device"] = "web"
    events["request_id"] = None
    events["model_version"] = None
    return events[EVENT_SCHEMA.names]


def _items(movies: pd.DataFrame, interactions: pd.DataFrame) -> pd.DataFrame:
    item_id = movies["movieId"].astype(str)
    genres = movies["genres"].fillna("(no genres listed)").str.split("|")
    year = movies["title"].str.extract(r"\((\d{4})\)\s*$")[0]
    first_rating = interactions.groupby("item_id")["event_time"].min()
    fallback = item_id.map(first_rating)
    published = pd.to_datetime(year + "-01-01", errors="coerce", utc=True).dt.as_unit("ms")
    published = published.fillna(fallback).fillna(pd.Timestamp("1995-01-01", tz="UTC"))
    return pd.DataFrame(
        {
            "item_id": item_id,
            "category": genres.str[0],
            "creator_id": "unknown",
            "tags": genres,
            "duration_ms": pd.array([None] * len(movies), dtype="Int64"),
            "published_at": published,
            "title": movies["title"],
            "updated_at": published,
        }
    )


def _users(interactions: pd.DataFrame) -> pd.DataFrame:
    first = interactions.groupby("user_id", sort=True)["event_time"].min().reset_index()
    return pd.DataFrame(
        {
            "user_id": first["user_id"],
            "signup_at": first["event_time"],
            "country": None,
            "age_bucket": None,
            "updated_at": first["event_time"],
        }
    )


def write_movielens(data: MovieLensData, out_dir: Path) -> dict[str, int]:
    """Writes events, items, users and interactions as Parquet under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(to_table(data.events, EVENT_SCHEMA), out_dir / "events.parquet")
    pq.write_table(to_table(data.items, ITEM_SCHEMA), out_dir / "items.parquet")
    pq.write_table(to_table(data.users, USER_SCHEMA), out_dir / "users.parquet")
    pq.write_table(
        pa.Table.from_pandas(data.interactions, preserve_index=False),
        out_dir / "interactions.parquet",
    )
    return summarize(data)


def summarize(data: MovieLensData) -> dict[str, int]:
    """Counts for the CLI and the demo."""
    return {
        "interactions": len(data.interactions),
        "positives": int(data.interactions["positive"].sum()),
        "events": len(data.events),
        "users": data.interactions["user_id"].nunique(),
        "items": len(data.items),
        "rated_items": data.interactions["item_id"].nunique(),
    }


def training_rows(import_dir: Path, length: int = HISTORY_LENGTH) -> pd.DataFrame:
    """A training snapshot frame from an import (:func:`write_movielens`'s folder).

    One row per rating, as the batch pipeline's snapshots have one per impression: ``clicked``
    is the positive flag (rating >= 4), ``watch_time_ms`` unknown (NaN), the item's metadata
    and its age at the rating, and ``user_history``: the user's last ``length`` distinct
    positives strictly before the row, newest first (point in time). MovieLens has no stream
    or daily batch features, so nothing else is joined.

    Raises:
        DatasetNotFoundError: ``import_dir`` holds no import.
    """
    for name in ("interactions.parquet", "items.parquet"):
        if not (import_dir / name).is_file():
            raise DatasetNotFoundError(str(import_dir / name),
                                       "run `recsys data import-movielens` first")
    rows = pd.read_parquet(import_dir / "interactions.parquet")
    items = pd.read_parquet(import_dir / "items.parquet")
    rows = rows.sort_values(["event_time", "user_id", "item_id"], kind="stable")
    rows = rows.reset_index(drop=True)
    rows["clicked"] = rows["positive"].astype(np.int64)
    rows["watch_time_ms"] = np.nan
    rows["item_duration_ms"] = np.nan
    rows[USER_HISTORY] = _histories(rows, length)
    meta = items[["item_id", "category", "creator_id", "tags", "duration_ms", "published_at"]]
    rows = rows.drop(columns=["rating", "positive"]).merge(meta, on="item_id", how="left")
    age = rows["event_time"] - pd.to_datetime(rows["published_at"], utc=True)
    rows["item_age_days"] = (age.dt.total_seconds() / 86_400.0).clip(lower=0)
    return rows.drop(columns="published_at")


def _histories(rows: pd.DataFrame, length: int) -> list[list[str]]:
    """Per row (sorted by time): the user's last ``length`` distinct positives before it."""
    out: list[list[str]] = [[] for _ in range(len(rows))]
    for _, group in rows.groupby("user_id", sort=False):
        liked: list[str] = []  # oldest first
        times = group["event_time"].to_numpy()
        positive = group["clicked"].to_numpy()
        items = group["item_id"].to_numpy()
        index = group.index.to_numpy()
        pending: list[str] = []  # positives at the current time: visible from the next time
        for j in range(len(group)):
            if j and times[j] != times[j - 1]:
                liked += pending
                pending = []
            recent: list[str] = []
            for item in reversed(liked):
                if item not in recent:
                    recent.append(item)
                if len(recent) == length:
                    break
            out[index[j]] = recent
            if positive[j]:
                pending.append(str(items[j]))
    return out
