"""Feature definitions: one place for names, entity keys, windows and aggregation semantics.

The batch pipeline (Ray Data over the lake), the PyFlink stream job, the Feast repository,
training and serving all read these objects; none of them spells a feature name itself.

Semantics of a windowed aggregate at time ``t`` over window ``w``: it covers events with
``t - w < event_time <= t``. ``count`` counts events whose type is in ``event_types``; ``sum``
adds ``column`` over them; a :class:`Ratio` divides two aggregates of the same window
(0.0 when the denominator is 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

Entity = Literal["user", "item"]

USER_KEY = "user_id"
ITEM_KEY = "item_id"
ENTITY_KEYS: dict[str, str] = {"user": USER_KEY, "item": ITEM_KEY}

HISTORY_LENGTH = 20  # last N items engaged with: the sequence the user tower reads
TOP_CATEGORIES = 3
ENGAGEMENT_TYPES: tuple[str, ...] = ("click", "watch", "like", "share")


@dataclass(frozen=True)
class Aggregate:
    """A windowed count or sum over events of some types, keyed by one entity."""

    name: str
    entity: Entity
    event_types: tuple[str, ...]
    window: timedelta
    kind: Literal["count", "sum"] = "count"
    column: str | None = None  # summed column when kind == "sum"


@dataclass(frozen=True)
class Ratio:
    """``numerator / denominator`` of two aggregates over the same window (0 when empty)."""

    name: str
    numerator: str
    denominator: str


@dataclass(frozen=True)
class FeatureGroup:
    """Features of one entity materialised together (one Feast feature view)."""

    name: str
    entity: Entity
    aggregates: tuple[Aggregate, ...]
    ratios: tuple[Ratio, ...]
    ttl: timedelta
    slide: timedelta | None = None  # hop size for sliding windows in the stream job

    @property
    def feature_names(self) -> list[str]:
        return [a.name for a in self.aggregates] + [r.name for r in self.ratios]


def _user_window(days: int) -> tuple[tuple[Aggregate, ...], tuple[Ratio, ...]]:
    w, s = timedelta(days=days), f"{days}d"
    aggregates = (
        Aggregate(f"user_impressions_{s}", "user", ("impression",), w),
        Aggregate(f"user_clicks_{s}", "user", ("click",), w),
        Aggregate(f"user_watch_time_ms_{s}", "user", ("watch",), w, "sum", "watch_time_ms"),
        Aggregate(f"user_watch_duration_ms_{s}", "user", ("watch",), w, "sum", "item_duration_ms"),
    )
    ratios = (
        Ratio(f"user_ctr_{s}", f"user_clicks_{s}", f"user_impressions_{s}"),
        Ratio(
            f"user_completion_rate_{s}", f"user_watch_time_ms_{s}", f"user_watch_duration_ms_{s}"
        ),
    )
    return aggregates, ratios


def _item_window(days: int) -> tuple[tuple[Aggregate, ...], tuple[Ratio, ...]]:
    w, s = timedelta(days=days), f"{days}d"
    aggregates = (
        Aggregate(f"item_impressions_{s}", "item", ("impression",), w),
        Aggregate(f"item_clicks_{s}", "item", ("click",), w),
        Aggregate(f"item_watch_time_ms_{s}", "item", ("watch",), w, "sum", "watch_time_ms"),
        Aggregate(f"item_watch_duration_ms_{s}", "item", ("watch",), w, "sum", "item_duration_ms"),
    )
    ratios = (
        Ratio(f"item_ctr_{s}", f"item_clicks_{s}", f"item_impressions_{s}"),
        Ratio(f"item_watch_ratio_{s}", f"item_watch_time_ms_{s}", f"item_watch_duration_ms_{s}"),
    )
    return aggregates, ratios


def _batch_group(name: str, entity: Entity, days: tuple[int, ...]) -> FeatureGroup:
    build = _user_window if entity == "user" else _item_window
    aggregates: tuple[Aggregate, ...] = ()
    ratios: tuple[Ratio, ...] = ()
    for d in days:
        a, r = build(d)
        aggregates += a
        ratios += r
    return FeatureGroup(name, entity, aggregates, ratios, ttl=timedelta(days=2))


BATCH_WINDOWS_DAYS: tuple[int, ...] = (1, 7, 30)
USER_BATCH = _batch_group("user_batch", "user", BATCH_WINDOWS_DAYS)
ITEM_BATCH = _batch_group("item_batch", "item", BATCH_WINDOWS_DAYS)

USER_STREAM = FeatureGroup(
    "user_stream",
    "user",
    aggregates=tuple(
        agg
        for minutes, s in ((10, "10m"), (60, "1h"))
        for agg in (
            Aggregate(f"user_clicks_{s}", "user", ("click",), timedelta(minutes=minutes)),
            Aggregate(
                f"user_watch_time_ms_{s}",
                "user",
                ("watch",),
                timedelta(minutes=minutes),
                "sum",
                "watch_time_ms",
            ),
            Aggregate(f"user_skips_{s}", "user", ("skip",), timedelta(minutes=minutes)),
        )
    ),
    ratios=(),
    ttl=timedelta(hours=2),
)

ITEM_TRENDING = FeatureGroup(
    "item_trending",
    "item",
    aggregates=(
        Aggregate("item_impressions_1h", "item", ("impression",), timedelta(hours=1)),
        Aggregate("item_clicks_1h", "item", ("click",), timedelta(hours=1)),
    ),
    ratios=(Ratio("item_ctr_1h", "item_clicks_1h", "item_impressions_1h"),),
    ttl=timedelta(hours=2),
    slide=timedelta(minutes=5),
)

# Non-windowed features.
USER_HISTORY = "user_history"  # last HISTORY_LENGTH engaged item ids, newest first
USER_RECENT_ITEMS = "user_recent_items"  # stream: last HISTORY_LENGTH distinct engaged, newest
USER_TOP_CATEGORIES = "user_top_categories"  # TOP_CATEGORIES most engaged categories (30d)
ITEM_METADATA: tuple[str, ...] = ("category", "creator_id", "tags", "duration_ms", "published_at")
ITEM_AGE_DAYS = "item_age_days"

BATCH_GROUPS: tuple[FeatureGroup, ...] = (USER_BATCH, ITEM_BATCH)
STREAM_GROUPS: tuple[FeatureGroup, ...] = (USER_STREAM, ITEM_TRENDING)

# Feast value types of each kind of feature: count -> Int64, sum -> Int64, ratio -> Float64,
# item-id lists -> Array(String). Windowed views carry ``window_end`` as their event timestamp.
WINDOW_END = "window_end"

# Versioned feature services: what each model reads.
FEATURE_SERVICES: dict[str, tuple[str, ...]] = {
    "retrieval_v1": ("user_batch", "user_stream", "user_history"),
    "ranking_v1": ("user_batch", "user_stream", "item_batch", "item_trending", "item_metadata"),
}


def ratio(numerator: float, denominator: float) -> float:
    """The one definition of a ratio feature's value."""
    return float(numerator) / float(denominator) if denominator else 0.0
