"""Feast objects of the recommendation platform, built from ``recsys_core.features``.

Purely declarative: names, windows, TTLs and value types all come from the shared feature
definitions, so the batch pipeline, the Flink stream job, training and serving agree. Offline
tables live under ``data/<view>/`` next to this file (written by
``recsys_pipelines.batch_features``); ``feature_store.yaml`` is generated from the settings
profile by ``recsys features apply`` (``recsys_pipelines.feature_store.write_feature_store_yaml``).
"""

from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource
from feast.types import Array, Float64, Int64, String, UnixTimestamp
from feast.value_type import ValueType

from recsys_core import features as F

user = Entity(name="user", join_keys=[F.USER_KEY], value_type=ValueType.STRING,
              description="A viewer.")
item = Entity(name="item", join_keys=[F.ITEM_KEY], value_type=ValueType.STRING,
              description="A video in the catalog.")
ENTITIES = {"user": user, "item": item}

# Non-windowed views: refreshed daily, so two days of TTL, like the windowed batch views.
DAILY_TTL = F.USER_BATCH.ttl


def _source(view: str) -> FileSource:
    return FileSource(name=f"{view}_source", path=f"data/{view}", timestamp_field=F.WINDOW_END)


def _windowed_schema(group: F.FeatureGroup) -> list[Field]:
    fields = [Field(name=a.name, dtype=Int64) for a in group.aggregates]
    return fields + [Field(name=r.name, dtype=Float64) for r in group.ratios]


def _batch_view(group: F.FeatureGroup) -> FeatureView:
    return FeatureView(
        name=group.name,
        entities=[ENTITIES[group.entity]],
        ttl=group.ttl,
        schema=_windowed_schema(group),
        source=_source(group.name),
        online=True,
        description=f"{group.entity} aggregates over {F.BATCH_WINDOWS_DAYS} days, as of day end",
    )


user_batch = _batch_view(F.USER_BATCH)
item_batch = _batch_view(F.ITEM_BATCH)

user_history = FeatureView(
    name=F.USER_HISTORY_VIEW,
    entities=[user],
    ttl=DAILY_TTL,
    schema=[Field(name=F.USER_HISTORY, dtype=Array(String)),
            Field(name=F.USER_TOP_CATEGORIES, dtype=Array(String))],
    source=_source(F.USER_HISTORY_VIEW),
    online=True,
    description=f"last {F.HISTORY_LENGTH} distinct engaged items (newest first), top categories",
)

item_metadata = FeatureView(
    name=F.ITEM_METADATA_VIEW,
    entities=[item],
    ttl=DAILY_TTL,
    schema=[
        Field(name="category", dtype=String),
        Field(name="creator_id", dtype=String),
        Field(name="tags", dtype=Array(String)),
        Field(name="duration_ms", dtype=Int64),
        Field(name="published_at", dtype=UnixTimestamp),
        Field(name=F.ITEM_AGE_DAYS, dtype=Float64),
    ],
    source=_source(F.ITEM_METADATA_VIEW),
    online=True,
    description="catalog metadata and age in days, as of day end",
)

# Stream views: the PyFlink job writes these names online; push sources keep them pushable.
user_stream_push = PushSource(name="user_stream_push", batch_source=_source(F.USER_STREAM.name))
item_trending_push = PushSource(
    name="item_trending_push", batch_source=_source(F.ITEM_TRENDING.name)
)

user_stream = FeatureView(
    name=F.USER_STREAM.name,
    entities=[user],
    ttl=F.USER_STREAM.ttl,
    schema=[*_windowed_schema(F.USER_STREAM),
            Field(name=F.USER_RECENT_ITEMS, dtype=Array(String))],
    source=user_stream_push,
    online=True,
    description="near-real-time user aggregates from the Flink job",
)

item_trending = FeatureView(
    name=F.ITEM_TRENDING.name,
    entities=[item],
    ttl=F.ITEM_TRENDING.ttl,
    schema=_windowed_schema(F.ITEM_TRENDING),
    source=item_trending_push,
    online=True,
    description="sliding one-hour item popularity from the Flink job",
)

VIEWS = {v.name: v for v in (user_batch, item_batch, user_history, item_metadata, user_stream,
                             item_trending)}


def _service(name: str, description: str) -> FeatureService:
    return FeatureService(name=name, features=[VIEWS[v] for v in F.FEATURE_SERVICES[name]],
                          description=description)


retrieval_v1 = _service(F.RETRIEVAL_V1, "what the two-tower retrieval model reads")
ranking_v1 = _service(F.RANKING_V1, "what the ranking model reads")
recommender_v1 = _service(F.RECOMMENDER_V1, "what serving reads for a two-stage bundle "
                                            "(retrieval + ranking)")
