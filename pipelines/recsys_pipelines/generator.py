"""Synthetic event generator with a known ground truth.

Users and items live in a latent space: each item is its category's centroid plus noise, each
user a mix of one or two category centroids plus noise. Impressions are drawn from a power-law
popularity prior (half) and from the user's favourite categories (half); the click probability,
the watch ratio and likes/shares all depend on the latent match, so a model that learns the
latent structure beats popularity. New items are published and new users sign up every day
(cold start). A controlled amount of dirt is injected and counted exactly:

- ``duplicates``: rows re-sent with the same ``event_id``;
- ``late``: rows that land in the next day's partition (their ``event_time`` is unchanged);
- ``malformed``: rows with one corrupt field each, cycling through :data:`MALFORMED_KINDS`.

Everything is vectorised with numpy and seeded: the same config gives identical files.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from recsys_core.atomic import atomic_write_lines
from recsys_core.contracts import (
    DEVICES,
    ITEM_SCHEMA,
    RAW_EVENT_SCHEMA,
    REASON_BAD_TIME,
    REASON_BAD_TYPE,
    REASON_MISSING,
    REASON_NEGATIVE_WATCH,
    SURFACES,
    USER_SCHEMA,
)
from recsys_pipelines.etl import atomic_write_table

logger = logging.getLogger(__name__)

# Each malformed row breaks exactly one rule, named by the reason validate_events gives.
MALFORMED_KINDS: tuple[str, ...] = (
    REASON_MISSING.format(column="user_id"),
    REASON_MISSING.format(column="item_id"),
    REASON_BAD_TIME,
    REASON_BAD_TYPE,
    REASON_NEGATIVE_WATCH,
)
COUNTRIES: tuple[str, ...] = ("US", "BR", "IN", "DE", "JP", "FR", "GB", "ID")
AGE_BUCKETS: tuple[str, ...] = ("13-17", "18-24", "25-34", "35-44", "45-54", "55+")


@dataclass(frozen=True)
class GeneratorConfig:
    """What to generate. Defaults make ~200k events in about a second."""

    events: int = 200_000  # approximate target; the exact count is in the report
    days: int = 14
    start: date = date(2026, 11, 1)
    users: int = 2_000  # users at start; new_users_per_day more arrive daily
    items: int = 5_000  # catalog at start; new_items_per_day are published daily
    new_users_per_day: int = 50
    new_items_per_day: int = 100
    categories: int = 20
    creators_per_category: int = 25
    dim: int = 16  # latent dimension of the ground truth
    popularity_exponent: float = 1.1  # Zipf exponent of the popularity prior
    # Share of impression slots drawn from the user's two favourite categories (the rest
    # follow the popularity prior): how personalized the feed that produced the logs was.
    category_share: float = 0.5
    impressions_per_request: int = 10
    dirt_rate: float = 0.0  # fraction of rows for each kind of dirt
    seed: int = 7


# The demo's world (`recsys data generate` and `recsys demo` use it; GeneratorConfig's own
# defaults stay the older, less personalized world the tests pin): 50 narrower categories and
# 80% of the impression slots from the user's two favourite categories, a feed about as
# personalized as a real short-video app's. On the old world (20 categories, half the slots)
# even the ground truth reaches only 1.28x popularity's Recall@50 on the demo's holdout; on
# this one 4.4x (benchmarks/bench_ceiling.py, docs/evaluation.md).
DEMO_CATEGORIES = 50
DEMO_CATEGORY_SHARE = 0.8


@dataclass
class DirtReport:
    """Exact counts of the dirt injected, for tests and the demo summary."""

    duplicates: int = 0
    late: int = 0
    malformed: dict[str, int] = field(default_factory=dict)

    @property
    def malformed_total(self) -> int:
        return sum(self.malformed.values())


@dataclass
class GeneratedData:
    """In-memory result: raw events (as landed, with a ``landing_date``), catalog, users."""

    events: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame
    user_factors: np.ndarray  # (n_users, dim)
    item_factors: np.ndarray  # (n_items, dim)
    user_categories: np.ndarray  # (n_users, 2) favourite categories
    dirt: DirtReport
    popularity_prior: np.ndarray  # (n_items,) unnormalised impression prior of each item


@dataclass
class GenerateResult:
    """What :func:`write_generated` wrote."""

    events: int
    clean_events: int
    users: int
    items: int
    partitions: list[str]
    dirt: DirtReport
    landing_dir: Path


def _ids(prefix: str, numbers: np.ndarray) -> np.ndarray:
    return np.char.add(prefix, numbers.astype(str)).astype(object)


def _iso(ms: np.ndarray) -> np.ndarray:
    stamps = np.datetime_as_string(ms.astype("datetime64[ms]"), unit="ms")
    return np.char.add(stamps, "Z").astype(object)


def _midnight_ms(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() * 1000)


def _catalog(cfg: GeneratorConfig, rng: np.random.Generator) -> tuple[pd.DataFrame, np.ndarray]:
    n = cfg.items + cfg.new_items_per_day * cfg.days
    centroids = rng.normal(0, 1, (cfg.categories, cfg.dim))
    category = rng.integers(0, cfg.categories, n)
    factors = centroids[category] + rng.normal(0, 0.35, (n, cfg.dim))
    creator = category * cfg.creators_per_category + rng.integers(0, cfg.creators_per_category, n)
    start_ms = _midnight_ms(cfg.start)
    day_ms = 86_400_000
    published = np.empty(n, dtype=np.int64)
    published[: cfg.items] = start_ms - rng.integers(1, 180 * day_ms, cfg.items)
    new_day = np.repeat(np.arange(cfg.days), cfg.new_items_per_day)
    published[cfg.items :] = start_ms + new_day * day_ms + rng.integers(0, day_ms, new_day.size)
    tag_a = rng.integers(0, 5, n)
    tag_b = rng.integers(0, 5, n)
    tags = [[f"c{c}-t{a}", f"c{c}-t{b}"] if a != b else [f"c{c}-t{a}"]
            for c, a, b in zip(category, tag_a, tag_b, strict=True)]
    published_ts = pd.to_datetime(published, unit="ms", utc=True)
    items = pd.DataFrame(
        {
            "item_id": _ids("i", np.arange(n)),
            "category": _ids("cat", category),
            "creator_id": _ids("cr", creator),
            "tags": tags,
            "duration_ms": rng.lognormal(np.log(30_000), 0.6, n).astype(np.int64) + 3_000,
            "published_at": published_ts,
            "title": _ids("video ", np.arange(n)),
            "updated_at": published_ts,
        }
    )
    return items, factors


def _users(
    cfg: GeneratorConfig, rng: np.random.Generator, centroids: np.ndarray
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    n = cfg.users + cfg.new_users_per_day * cfg.days
    favourites = rng.integers(0, cfg.categories, (n, 2))
    mix = rng.uniform(0.5, 1.0, (n, 1))
    factors = mix * centroids[favourites[:, 0]] + (1 - mix) * centroids[favourites[:, 1]]
    factors += rng.normal(0, 0.3, (n, cfg.dim))
    start_ms = _midnight_ms(cfg.start)
    day_ms = 86_400_000
    signup = np.empty(n, dtype=np.int64)
    signup[: cfg.users] = start_ms - rng.integers(1, 365 * day_ms, cfg.users)
    new_day = np.repeat(np.arange(cfg.days), cfg.new_users_per_day)
    signup[cfg.users :] = start_ms + new_day * day_ms + rng.integers(0, day_ms // 2, new_day.size)
    signup_ts = pd.to_datetime(signup, unit="ms", utc=True)
    users = pd.DataFrame(
        {
            "user_id": _ids("u", np.arange(n)),
            "signup_at": signup_ts,
            "country": np.asarray(COUNTRIES, dtype=object)[rng.integers(0, len(COUNTRIES), n)],
            "age_bucket": np.asarray(AGE_BUCKETS, dtype=object)[
                rng.integers(0, len(AGE_BUCKETS), n)
            ],
            "updated_at": signup_ts,
        }
    )
    return users, factors, favourites


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _impressions(
    cfg: GeneratorConfig,
    rng: np.random.Generator,
    items: pd.DataFrame,
    item_category: np.ndarray,
    users: pd.DataFrame,
    favourites: np.ndarray,
    n_impressions: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Returns (user index, item index, time ms) for every impression, day by day, and the
    popularity prior (n_items,) the impressions were drawn from."""
    published = items["published_at"].astype("int64").to_numpy() // 1_000_000
    signup = users["signup_at"].astype("int64").to_numpy() // 1_000_000
    n_items = len(items)
    rank = rng.permutation(n_items) + 1
    prior = rank.astype(np.float64) ** -cfg.popularity_exponent
    per_day = n_impressions // cfg.days
    per_request = cfg.impressions_per_request
    users_out, items_out, times_out = [], [], []
    for day in range(cfg.days):
        day_start = _midnight_ms(cfg.start + timedelta(days=day))
        live_items = np.flatnonzero(published < day_start + 86_400_000)
        live_users = np.flatnonzero(signup < day_start + 86_400_000)
        n_req = max(1, per_day // per_request)
        req_user = live_users[rng.integers(0, live_users.size, n_req)]
        req_start = np.maximum(day_start + rng.integers(0, 86_400_000 - 600_000, n_req),
                               signup[req_user] + 1)
        u = np.repeat(req_user, per_request)
        t = np.repeat(req_start, per_request) + np.tile(np.arange(per_request) * 2_000, n_req)
        # category_share of the slots come from the user's favourite categories, the rest
        # follow popularity.
        p = prior[live_items] / prior[live_items].sum()
        by_popularity = live_items[rng.choice(live_items.size, u.size, p=p)]
        by_category = by_popularity.copy()
        order = np.argsort(item_category[live_items], kind="stable")
        sorted_items = live_items[order]
        bounds = np.searchsorted(item_category[live_items][order], np.arange(cfg.categories + 1))
        want = favourites[u, rng.integers(0, 2, u.size)]
        lo, hi = bounds[want], bounds[want + 1]
        has = hi > lo
        pick = lo + (rng.random(u.size) * (hi - lo)).astype(np.int64)
        by_category[has] = sorted_items[np.minimum(pick[has], sorted_items.size - 1)]
        chosen = np.where(rng.random(u.size) < 1.0 - cfg.category_share, by_popularity,
                          by_category)
        # An item cannot be shown before it is published.
        t = np.maximum(t, published[chosen] + 1)
        users_out.append(u)
        items_out.append(chosen)
        times_out.append(t)
    return (np.concatenate(users_out), np.concatenate(items_out), np.concatenate(times_out),
            prior)


def generate(cfg: GeneratorConfig) -> GeneratedData:
    """Generates events, catalog and users in memory. Deterministic for a given config."""
    rng = np.random.default_rng(cfg.seed)
    items, item_factors = _catalog(cfg, rng)
    item_category = items["category"].str.slice(3).astype(int).to_numpy()
    centroids = np.stack(
        [item_factors[item_category == c].mean(axis=0) if (item_category == c).any()
         else np.zeros(cfg.dim) for c in range(cfg.categories)]
    )
    users, user_factors, favourites = _users(cfg, rng, centroids)

    # An impression yields ~2.4 events on average (itself, click, watch or skip, like, share).
    n_impressions = max(cfg.impressions_per_request * cfg.days, int(cfg.events / 2.4))
    u, i, t, prior = _impressions(cfg, rng, items, item_category, users, favourites,
                                  n_impressions)
    n = u.size
    match = np.einsum("nd,nd->n", user_factors[u], item_factors[i]) / np.sqrt(cfg.dim)
    click = rng.random(n) < _sigmoid(2.0 * match - 1.0)
    duration = items["duration_ms"].to_numpy()[i]
    ratio = np.clip(_sigmoid(2.0 * match + rng.normal(0, 0.5, n)), 0.02, 1.0)
    watch_ms = (ratio * duration).astype(np.int64)
    like = click & (ratio > 0.8) & (rng.random(n) < 0.4)
    share = click & (ratio > 0.9) & (rng.random(n) < 0.1)

    request = np.arange(n) // cfg.impressions_per_request
    parts = {
        "impression": (np.ones(n, bool), t, None),
        "click": (click, t + 1_000, None),
        "watch": (click & (ratio >= 0.2), t + 1_000 + watch_ms, watch_ms),
        "skip": (click & (ratio < 0.2), t + 1_000 + watch_ms, watch_ms),
        "like": (like, t + 2_000 + watch_ms, None),
        "share": (share, t + 3_000 + watch_ms, None),
    }
    surface = np.asarray(SURFACES, dtype=object)[rng.integers(0, len(SURFACES), n)]
    device = np.asarray(DEVICES, dtype=object)[rng.integers(0, len(DEVICES), n)]
    frames = []
    for event_type, (mask, when, watched) in parts.items():
        idx = np.flatnonzero(mask)
        frames.append(
            pd.DataFrame(
                {
                    "_ms": when[idx],
                    "user_id": users["user_id"].to_numpy()[u[idx]],
                    "item_id": items["item_id"].to_numpy()[i[idx]],
                    "event_type": event_type,
                    "watch_time_ms": pd.array(
                        watched[idx] if watched is not None else [None] * idx.size,
                        dtype="Int64",
                    ),
                    "item_duration_ms": pd.array(duration[idx], dtype="Int64"),
                    "surface": surface[idx],
                    "device": device[idx],
                    "request_id": _ids("r", request[idx]),
                    "model_version": None,
                }
            )
        )
    events = pd.concat(frames, ignore_index=True).sort_values("_ms", kind="stable")
    events = events.reset_index(drop=True)
    events.insert(0, "event_id", _ids("e", np.arange(len(events))))
    events.insert(1, "event_time", _iso(events["_ms"].to_numpy()))
    events["landing_date"] = pd.to_datetime(events["_ms"], unit="ms", utc=True).dt.date
    events = events.drop(columns="_ms")
    events, dirt = _add_dirt(events, cfg, rng)
    return GeneratedData(events, items, users, user_factors, item_factors, favourites, dirt,
                         prior)


def expected_clicks(data: GeneratedData, cfg: GeneratorConfig, users: np.ndarray,
                    items: np.ndarray) -> np.ndarray:
    """The ground truth: P(user is shown the item in a slot and clicks it), (users, items).

    The impression policy draws ``1 - category_share`` of the slots from the popularity
    prior over the live ``items`` and ``category_share`` uniformly from one of the user's two
    favourite categories; the click
    probability is the one :func:`generate` samples from. Ranking by it is the best any model
    can do on this data (the ceiling that ``benchmarks/bench_ceiling.py`` reports).
    """
    category = data.items["category"].str.slice(3).astype(int).to_numpy()[items]
    sizes = np.bincount(category, minlength=cfg.categories).astype(np.float64)
    prior = data.popularity_prior[items] / data.popularity_prior[items].sum()  # (items,)
    fav = data.user_categories[users]  # (users, 2)
    half = cfg.category_share / 2  # each favourite category gets half the category slots
    by_category = sum(half * (category[None, :] == fav[:, j:j + 1]) / sizes[fav[:, j]][:, None]
                      for j in range(2))  # (users, items)
    match = data.user_factors[users] @ data.item_factors[items].T / np.sqrt(cfg.dim)
    return ((1.0 - cfg.category_share) * prior[None, :] + by_category) * _sigmoid(
        2.0 * match - 1.0)


def _add_dirt(
    events: pd.DataFrame, cfg: GeneratorConfig, rng: np.random.Generator
) -> tuple[pd.DataFrame, DirtReport]:
    report = DirtReport(malformed={kind: 0 for kind in MALFORMED_KINDS})
    k = int(len(events) * cfg.dirt_rate)
    if k == 0:
        return events, report
    # Disjoint rows for each kind of dirt keep the counts exact.
    last_day = cfg.start + timedelta(days=cfg.days - 1)
    eligible_late = np.flatnonzero(events["landing_date"].to_numpy() < last_day)
    late_rows = rng.choice(eligible_late, min(k, eligible_late.size), replace=False)
    rest = np.setdiff1d(np.arange(len(events)), late_rows)
    chosen = rng.choice(rest, 2 * k, replace=False)
    bad_rows, dup_rows = chosen[:k], chosen[k:]

    events = events.copy()
    landing = events["landing_date"].to_numpy().copy()
    landing[late_rows] = [d + timedelta(days=1) for d in landing[late_rows]]
    events["landing_date"] = landing
    report.late = int(late_rows.size)

    kinds = np.asarray(MALFORMED_KINDS, dtype=object)[np.arange(k) % len(MALFORMED_KINDS)]
    for kind in MALFORMED_KINDS:
        rows = bad_rows[kinds == kind]
        report.malformed[kind] = int(rows.size)
        if kind == MALFORMED_KINDS[0]:
            events.loc[rows, "user_id"] = None
        elif kind == MALFORMED_KINDS[1]:
            events.loc[rows, "item_id"] = ""
        elif kind == MALFORMED_KINDS[2]:
            events.loc[rows, "event_time"] = "yesterday-ish"
        elif kind == MALFORMED_KINDS[3]:
            events.loc[rows, "event_type"] = "purchase"
        else:
            events.loc[rows, "event_type"] = "watch"
            events.loc[rows, "watch_time_ms"] = -1

    duplicates = events.iloc[dup_rows]
    report.duplicates = int(len(duplicates))
    events = pd.concat([events, duplicates], ignore_index=True)
    return events, report


def write_jsonl(events: pd.DataFrame, path: Path) -> None:
    """Writes events as newline-JSON atomically: a hidden temp file, then a rename."""
    names = RAW_EVENT_SCHEMA.names
    records = events[names].astype(object).where(events.notna(), None)
    atomic_write_lines(path, (json.dumps(dict(zip(names, row, strict=True))) + "\n"
                              for row in records.itertuples(index=False, name=None)))


def write_generated(
    data: GeneratedData,
    landing_dir: Path,
    jsonl_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> GenerateResult:
    """Writes the landing area: events by date (Parquet), catalog and user snapshots.

    Layout::

        landing_dir/events/date=YYYY-MM-DD/part-0.parquet
        landing_dir/catalog/items.parquet
        landing_dir/catalog/users.parquet
        landing_dir/ground_truth.npz
        jsonl_dir/events-YYYY-MM-DD.jsonl            (when jsonl_dir is given)
    """
    partitions: list[str] = []
    for day, frame in data.events.groupby("landing_date", sort=True):
        name = f"date={day.isoformat()}"
        table = pa.Table.from_pandas(
            frame[RAW_EVENT_SCHEMA.names], schema=RAW_EVENT_SCHEMA, preserve_index=False
        )
        atomic_write_table(table, landing_dir / "events" / name / "part-0.parquet")
        if jsonl_dir is not None:
            write_jsonl(frame, jsonl_dir / f"events-{day.isoformat()}.jsonl")
        partitions.append(name)
        if progress is not None:
            progress(name)
    atomic_write_table(
        pa.Table.from_pandas(data.items, schema=ITEM_SCHEMA, preserve_index=False),
        landing_dir / "catalog" / "items.parquet",
    )
    atomic_write_table(
        pa.Table.from_pandas(data.users, schema=USER_SCHEMA, preserve_index=False),
        landing_dir / "catalog" / "users.parquet",
    )
    np.savez(
        landing_dir / "ground_truth.npz",
        user_factors=data.user_factors,
        item_factors=data.item_factors,
        user_categories=data.user_categories,
    )
    (landing_dir / "dirt.json").write_text(json.dumps(asdict(data.dirt), indent=2))
    dirty = data.dirt.duplicates + data.dirt.malformed_total
    return GenerateResult(
        events=len(data.events),
        clean_events=len(data.events) - dirty,
        users=len(data.users),
        items=len(data.items),
        partitions=partitions,
        dirt=data.dirt,
        landing_dir=landing_dir,
    )
