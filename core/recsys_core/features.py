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

# --- Feature views: every view's name, declared once ------------------------------------------
# Windowed views are named by their group (USER_BATCH.name, ...); the two non-windowed batch
# views by these. The Feast repository, the batch pipeline, training and serving use these.
USER_HISTORY_VIEW = "user_history"  # USER_HISTORY (the feature) + USER_TOP_CATEGORIES
ITEM_METADATA_VIEW = "item_metadata"  # ITEM_METADATA + ITEM_AGE_DAYS
# Features of each view, in the order Feast's schema declares them.
VIEW_FEATURES: dict[str, tuple[str, ...]] = {
    USER_BATCH.name: tuple(USER_BATCH.feature_names),
    ITEM_BATCH.name: tuple(ITEM_BATCH.feature_names),
    USER_HISTORY_VIEW: (USER_HISTORY, USER_TOP_CATEGORIES),
    ITEM_METADATA_VIEW: (*ITEM_METADATA, ITEM_AGE_DAYS),
    USER_STREAM.name: (*USER_STREAM.feature_names, USER_RECENT_ITEMS),
    ITEM_TRENDING.name: tuple(ITEM_TRENDING.feature_names),
}
VIEW_ENTITY: dict[str, Entity] = {
    USER_BATCH.name: "user", ITEM_BATCH.name: "item", USER_HISTORY_VIEW: "user",
    ITEM_METADATA_VIEW: "item", USER_STREAM.name: "user", ITEM_TRENDING.name: "item",
}
# Written by the batch pipeline and materialized / written online by the PyFlink job only.
BATCH_VIEWS: tuple[str, ...] = (USER_BATCH.name, ITEM_BATCH.name, USER_HISTORY_VIEW,
                                ITEM_METADATA_VIEW)
STREAM_VIEWS: tuple[str, ...] = tuple(g.name for g in STREAM_GROUPS)

# Feast value types of each kind of feature: count -> Int64, sum -> Int64, ratio -> Float64,
# item-id lists -> Array(String). Windowed views carry ``window_end`` as their event timestamp.
WINDOW_END = "window_end"

# --- Feature services: versioned, what each model reads ----------------------------------------
RETRIEVAL_V1 = "retrieval_v1"  # the two-tower's user side
RANKING_V1 = "ranking_v1"  # the ranker: user and item numeric features, item metadata
RECOMMENDER_V1 = "recommender_v1"  # a two-stage bundle: every view serving reads for it
FEATURE_SERVICES: dict[str, tuple[str, ...]] = {
    RETRIEVAL_V1: (USER_BATCH.name, USER_STREAM.name, USER_HISTORY_VIEW),
    RANKING_V1: (USER_BATCH.name, USER_STREAM.name, ITEM_BATCH.name, ITEM_TRENDING.name,
                 ITEM_METADATA_VIEW),
    RECOMMENDER_V1: (USER_BATCH.name, USER_STREAM.name, USER_HISTORY_VIEW, ITEM_BATCH.name,
                     ITEM_TRENDING.name, ITEM_METADATA_VIEW),
}


def service_views(service: str, entity: Entity) -> tuple[str, ...]:
    """The views of ``service`` keyed by ``entity``, in the service's order.

    Raises:
        KeyError: ``service`` is not declared here.
    """
    return tuple(v for v in FEATURE_SERVICES[service] if VIEW_ENTITY[v] == entity)


def ratio(numerator: float, denominator: float) -> float:
    """The one definition of a ratio feature's value."""
    return float(numerator) / float(denominator) if denominator else 0.0
