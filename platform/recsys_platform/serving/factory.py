"""Wires a :class:`Recommender` from settings: registry, Feast store, caches, impression log."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from recsys_platform.serving.bundle_manager import BundleManager
from recsys_platform.serving.impressions import ImpressionLogger
from recsys_platform.serving.metrics import ServingMetrics
from recsys_platform.serving.online_features import (
    FeastFeatureSource,
    ItemCache,
    RedisUserFeatures,
)
from recsys_platform.serving.recommender import Recommender, ServingOptions
from recsys_platform.settings import Settings

logger = logging.getLogger(__name__)

CHAMPION = "champion"


def smoke_test(bundle: Any) -> None:
    """Raises unless the bundle answers a cold user's query with finite scores."""
    users = pd.DataFrame([{"user_id": "__smoke__", "user_history": []}])
    ids, scores = bundle.search(bundle.encode_users(users), 10)
    if len(ids[0]) == 0 or not np.isfinite(np.asarray(scores, dtype=float)).all():
        raise ValueError("smoke query returned no candidates or non-finite scores")
    items = pd.DataFrame({"item_id": list(ids[0])})
    ranked = bundle.rank(pd.concat([users] * len(items), ignore_index=True), items)
    if not np.isfinite(np.asarray(ranked["score"], dtype=float)).all():
        raise ValueError("smoke ranking returned non-finite scores")


def registry_manager(settings: Settings, metrics: ServingMetrics,
                     alias: str = CHAMPION) -> BundleManager:
    """A manager that follows ``models:/<model_name>@<alias>`` in the MLflow registry."""
    from mlflow import MlflowClient

    from recsys_models.bundle import load_bundle

    name = settings.mlflow.model_name
    client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri,
                          registry_uri=settings.mlflow_tracking_uri)

    def resolve() -> str | None:
        try:
            return str(client.get_model_version_by_alias(name, alias).version)
        except Exception as exc:
            if "not found" in str(exc).lower() or "RESOURCE_DOES_NOT_EXIST" in str(exc):
                return None
            raise

    def load(version: str) -> Any:
        return load_bundle(f"models:/{name}/{version}", tracking_uri=settings.mlflow_tracking_uri)

    return BundleManager(resolve, load, smoke_test, metrics)


def catalog_ids(settings: Settings, manager: BundleManager) -> Sequence[str]:
    """Item ids of the serving catalog: the bundle's items plus the landed catalog snapshot."""
    ids: list[str] = []
    current = manager.current
    if current is not None:
        ids.extend(str(i) for i in current.bundle.item_ids)
    snapshot = settings.landing_dir / "catalog" / "items.parquet"
    if snapshot.is_file():
        ids.extend(pq.read_table(snapshot, columns=["item_id"]).column(0).to_pylist())
    return ids


def index_new_items(manager: BundleManager, catalog: Path) -> None:
    """Adds catalog items the current bundle has never seen to its index (cold start)."""
    current = manager.current
    if current is None or not catalog.is_file():
        return
    items = pq.read_table(catalog).to_pandas()
    known = set(map(str, current.bundle.item_ids))
    fresh = items[~items["item_id"].isin(known)]
    if not fresh.empty:
        current.bundle.add_items(fresh)
        logger.info("indexed %d new items into bundle %s", len(fresh), current.version)


def warm_up(recommender: Recommender, requests: int = 3) -> None:
    """Runs a few requests through the whole path so the first real one is not slow."""
    from recsys_platform.serving.schemas import RecommendRequest

    for n in range(requests):
        recommender.recommend(RecommendRequest(user_id=f"__warmup__{n}", k=10), log=False)


def serving_store(settings: Settings, timeout_s: float | None = None) -> Any:
    """The Feast store with client-side Redis timeouts, so a dead Redis fails fast.

    ``timeout_s`` defaults to the request budget (``redis.timeout_ms``); background readers
    such as the item cache pass a longer one.
    """
    from feast import FeatureStore
    from feast.repo_config import RepoConfig

    from recsys_pipelines.feature_store import feature_store_config, repo_path

    config = feature_store_config(settings)
    online = config["online_store"]
    if online["type"] == "redis":
        budget = timeout_s if timeout_s is not None else max(settings.redis.timeout_ms / 1000,
                                                             0.05)
        online["connection_string"] += f",socket_timeout={budget},socket_connect_timeout={budget}"
    repo_config = RepoConfig(**config)
    repo_config.repo_path = repo_path(settings)
    return FeatureStore(repo_path=str(repo_path(settings)), config=repo_config)


def build_recommender(settings: Settings) -> tuple[Recommender, ItemCache]:
    """Builds the whole serving object graph and starts its background refreshers."""
    metrics = ServingMetrics()
    manager = registry_manager(settings, metrics)
    manager.refresh()
    manager.start(settings.serving.poll_interval_s)
    store = serving_store(settings)
    cache = ItemCache(serving_store(settings, timeout_s=10.0),
                      lambda: catalog_ids(settings, manager))
    catalog = settings.landing_dir / "catalog" / "items.parquet"
    cache.on_refresh.append(lambda _: index_new_items(manager, catalog))
    cache.refresh()
    cache.start()
    stream_dir = Path(settings.path(settings.flink.stream_dir))
    impressions = ImpressionLogger(settings.landing_dir,
                                   stream_dir if settings.flink.source == "file" else None,
                                   flush_every=500)
    impressions.start()
    options = ServingOptions(candidates=settings.serving.candidates,
                             user_features_timeout_s=settings.redis.timeout_ms / 1000)
    reader = None
    if store.config.online_store.type == "redis":
        reader = RedisUserFeatures(store, settings.redis.url,
                                   max(settings.redis.timeout_ms / 1000, 0.05))
    recommender = Recommender(manager, FeastFeatureSource(store, cache, reader), impressions,
                              metrics, options)
    return recommender, cache
