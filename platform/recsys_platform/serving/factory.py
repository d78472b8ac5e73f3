"""Wires a :class:`Recommender` from settings: registry, Feast store, caches, impression log."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import redis

from recsys_core.features import HISTORY_LENGTH, USER_HISTORY
from recsys_core.settings import Settings
from recsys_models.bundle import Bundle
from recsys_models.scoring import ranking_catalog
from recsys_pipelines.cold_start import cold_start_file, read_lists, read_lists_file
from recsys_platform.experiments.definition import ACTIVE_TAG, Experiment
from recsys_platform.serving.bundle_manager import BundleManager, LastGood
from recsys_platform.serving.experiments import ExperimentArms
from recsys_platform.serving.impressions import ImpressionLogger
from recsys_platform.serving.item_features import (
    ColdStartLists,
    FeastFeatureSource,
    ItemFeatureCache,
    ItemRows,
    feast_item_fetch,
    redis_item_fetch,
)
from recsys_platform.serving.metrics import ServingMetrics
from recsys_platform.serving.online_features import (
    FeastUserFeatures,
    RedisUserFeatures,
    check_feature_service,
    registered_views,
)
from recsys_platform.serving.recommender import Recommender, ServingOptions

logger = logging.getLogger(__name__)

CHAMPION = "champion"


_NEW_ITEM_COLUMNS = ("category", "creator_id", "tags", "duration_ms", "published_at")
SMOKE_USERS = 8  # sample users of the load-time check, with histories of real items
SMOKE_ITEMS = 100  # catalog items (spread over the whole catalog) each of them ranks


def check_finite_weights(bundle: Bundle) -> None:
    """Raises when a weight of either tower, the ranker or an item embedding is NaN/inf."""
    parts = {"two_tower": bundle.two_tower, "ranker": bundle.ranker}
    for name, module in parts.items():
        for param, tensor in module.state_dict().items():
            if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
                raise ValueError(f"{name}.{param} holds non-finite weights")
    if not np.isfinite(np.asarray(bundle.item_embeddings, dtype=np.float64)).all():
        raise ValueError("item embeddings hold non-finite values")


def smoke_test(bundle: Bundle, users: int = SMOKE_USERS, items: int = SMOKE_ITEMS) -> None:
    """Raises unless the bundle retrieves and ranks real catalog items with finite scores.

    A cold user and ``users`` sample users whose histories are real catalog items (so the
    history and item embedding rows that known users hit are exercised) each retrieve and
    then rank ``items`` catalog items spread over the whole catalog; every score must be
    finite. Real bundles also must hold only finite weights (a NaN row that no sample hits
    would reach some users).
    """
    check_finite_weights(bundle)
    catalog = [str(i) for i in bundle.item_ids]
    if not catalog:
        raise ValueError("the bundle's catalog is empty")
    step = max(1, len(catalog) // items)
    sample = catalog[::step][:items]
    histories: list[list[str]] = [[]] + [sample[n::users][:HISTORY_LENGTH] for n in range(users)]
    frame = pd.DataFrame([{"user_id": f"__smoke__{n}", USER_HISTORY: h}
                          for n, h in enumerate(histories)])
    ids, scores = bundle.search(bundle.encode_users(frame), 10)
    if any(len(row) == 0 for row in ids) or not np.isfinite(np.asarray(scores, float)).all():
        raise ValueError("smoke query returned no candidates or non-finite scores")
    candidates = pd.DataFrame({"item_id": sample})
    for n in range(len(frame)):
        ranked = bundle.rank(frame.iloc[[n]], candidates)
        bad = int((~np.isfinite(np.asarray(ranked["score"], dtype=float))).sum())
        if bad:
            raise ValueError(f"smoke ranking gave {bad} non-finite scores of {len(sample)} "
                             f"for sample user {n}")


def registry_manager(settings: Settings, metrics: ServingMetrics, alias: str = CHAMPION,
                     prepare: Callable[[Any], None] | None = None,
                     store: Any = None) -> BundleManager:
    """A manager that follows ``models:/<model_name>@<alias>`` in the MLflow registry.

    ``prepare`` runs on every newly loaded bundle after its smoke test and before the swap
    (index new items, pre-encode the ranker's catalog), so no request pays for it.
    """
    from mlflow import MlflowClient

    from recsys_models.provenance import load_verified

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

    def load(version: str) -> Any:  # digest and source checked, no pickle
        return load_verified(settings.mlflow_tracking_uri, name, version,
                             settings.path(settings.mlflow.artifact_location))

    def check(bundle: Any) -> None:
        if store is not None:  # the bundle's feature service is the one this replica reads
            check_feature_service(bundle, store, settings.feast.serving_service)
        smoke_test(bundle)
        if prepare is not None:
            prepare(bundle)

    last_good = LastGood(settings.data_dir / "serving" / f"last_good-{alias}.json", name)
    return BundleManager(resolve, load, check, metrics, last_good)


def registry_arms(settings: Settings, metrics: ServingMetrics,
                  prepare: Callable[[Any], None] | None = None,
                  store: Any = None) -> ExperimentArms:
    """Online experiment arms that follow the registered model's ``experiment.active`` tag in
    MLflow, load treatments with the same checks as a champion (digest, smoke query,
    ``prepare``) and log shadow rankings to ``landing/shadow``."""
    from mlflow import MlflowClient

    from recsys_models.provenance import load_verified

    name = settings.mlflow.model_name
    client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri,
                          registry_uri=settings.mlflow_tracking_uri)

    def read_active() -> Experiment | None:
        try:
            tags = client.get_registered_model(name).tags
        except Exception as exc:
            if "RESOURCE_DOES_NOT_EXIST" in str(exc) or "not found" in str(exc).lower():
                return None
            raise
        text = tags.get(ACTIVE_TAG)
        return Experiment.from_json(text) if text else None

    def load(version: str) -> Any:
        return load_verified(settings.mlflow_tracking_uri, name, version,
                             settings.path(settings.mlflow.artifact_location))

    def check(bundle: Any) -> None:
        if store is not None:
            check_feature_service(bundle, store, settings.feast.serving_service)
        smoke_test(bundle)
        if prepare is not None:
            prepare(bundle)

    shadow_log = ImpressionLogger(settings.landing_dir, folder="shadow", events=False,
                                  flush_every=500)
    shadow_log.start()
    return ExperimentArms(read_active, load, check, metrics, shadow_log)


def index_new_items(bundle: Bundle | None, item_ids: Sequence[str], rows: ItemRows) -> int:
    """Adds the items among ``item_ids`` that the bundle has never seen to its index (cold
    start), embedded from the metadata the online store holds for them (``rows``).

    Costs ``O(len(item_ids))``: the bundle's known ids are the ranking catalog's positions
    (built once per bundle), never a scan of the catalog. Items without metadata online
    (``category`` and ``published_at``) are left for a later refresh.
    """
    if bundle is None:
        return 0
    known = ranking_catalog(bundle).positions
    fresh = []
    for item in dict.fromkeys(item_ids):
        if item in known:
            continue
        meta = rows.values(item)
        if meta.get("category") is None or meta.get("published_at") is None:
            continue
        fresh.append({"item_id": item, **{c: meta.get(c) for c in _NEW_ITEM_COLUMNS}})
    if not fresh:
        return 0
    frame = pd.DataFrame(fresh)
    frame["tags"] = [list(t) if t is not None else [] for t in frame["tags"]]
    frame["published_at"] = pd.to_datetime(frame["published_at"], utc=True)
    bundle.add_items(frame)
    ranking_catalog(bundle)  # append their ranker inputs now, not on a request
    logger.info("indexed %d new items into bundle %s", len(frame),
                getattr(bundle, "version", "?"))
    return len(frame)


def list_items(lists: dict[str, list[str]]) -> list[str]:
    """Every item id of the cold-start lists, once."""
    return list(dict.fromkeys(i for members in lists.values() for i in members))


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


def impressions_wal_dir(settings: Settings) -> Path:
    """The write-ahead folder of the impression log (one per data dir, shared by replicas)."""
    return settings.data_dir / "serving" / "impressions-wal"


def item_sources(settings: Settings, store: Any) -> tuple[ItemFeatureCache, ColdStartLists]:
    """The per-request item feature read (LRU in front) and the cold-start lists."""
    serving = settings.serving
    views = registered_views(store, settings.feast.serving_service, "item")
    if store.config.online_store.type == "redis":
        # 500 candidates are one pipelined round trip: allow it twice the user budget.
        fetch, names = redis_item_fetch(store, settings.redis.url,
                                        max(2 * settings.redis.timeout_ms / 1000, 0.1), views)
        client = redis.Redis.from_url(settings.redis.url, socket_timeout=10.0,
                                      socket_connect_timeout=10.0)
        prefix, project = settings.redis.key_prefix, settings.feast.project

        def read() -> dict[str, list[str]]:
            return read_lists(client, prefix, project)
    else:
        fetch, names = feast_item_fetch(store, views)
        path = cold_start_file(settings)

        def read() -> dict[str, list[str]]:
            return read_lists_file(path)
    items = ItemFeatureCache(fetch, names, serving.item_cache_ttl_s, serving.item_cache_size)
    return items, ColdStartLists(read, serving.item_cache_ttl_s)


def build_recommender(settings: Settings) -> tuple[Recommender, ColdStartLists]:
    """Builds the whole serving object graph and starts its background refreshers."""
    metrics = ServingMetrics()
    store = serving_store(settings)
    items, lists = item_sources(settings, store)

    def prepare(bundle: Bundle) -> None:  # before a new bundle serves: no request pays for it
        ranking_catalog(bundle)
        ids = list_items(lists.lists)
        if ids:
            index_new_items(bundle, ids, items.rows(ids))

    manager = registry_manager(settings, metrics, prepare=prepare, store=store)

    # online experiments: split, shadow
    arms = registry_arms(settings, metrics, prepare, store=store)

    def on_refresh(new_lists: dict[str, list[str]]) -> None:
        ids = list_items(new_lists)
        if not ids:
            return
        rows = items.rows(ids)
        current = manager.current
        if current is not None:
            index_new_items(current.bundle, ids, rows)

        def index_arm(bundle: Any) -> None:
            index_new_items(bundle, ids, rows)

        arms.prepare(index_arm)

    lists.on_refresh.append(on_refresh)
    lists.refresh()
    manager.refresh()
    lists.start()
    manager.start(settings.serving.poll_interval_s)
    arms.refresh()
    arms.start(settings.serving.poll_interval_s)
    stream_dir = Path(settings.path(settings.flink.stream_dir))
    impressions = ImpressionLogger(settings.landing_dir,
                                   stream_dir if settings.flink.source == "file" else None,
                                   # ~5 s of a busy replica's rows per Parquet pair: at 500
                                   # rows (25 responses) the flushes cost ~5% of its CPU
                                   flush_every=20_000, wal_dir=impressions_wal_dir(settings))
    impressions.start()
    privacy = settings.privacy
    options = ServingOptions(candidates=settings.serving.candidates,
                             load_candidates=settings.serving.load_candidates,
                             load_rank=settings.serving.load_rank,
                             user_features_timeout_s=settings.redis.timeout_ms / 1000,
                             pseudonym_key=privacy.key if privacy.pseudonymize else None)
    user_views = registered_views(store, settings.feast.serving_service, "user")
    reader: Any = FeastUserFeatures(store, user_views)
    if store.config.online_store.type == "redis":
        reader = RedisUserFeatures(store, settings.redis.url,
                                   max(settings.redis.timeout_ms / 1000, 0.05), user_views)
    recommender = Recommender(manager, FeastFeatureSource(reader, items, lists), impressions,
                              metrics, options, experiments=arms)
    return recommender, lists
