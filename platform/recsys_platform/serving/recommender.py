"""The request path as plain functions: features -> retrieval -> candidates -> rank -> top-k.

:class:`Recommender` has no Ray in it; the Ray Serve deployment calls :meth:`prepare` in a
thread, batches :meth:`rank` across concurrent requests, then calls :meth:`finish`. Every stage
that depends on something outside the process has a fallback and records it in ``degraded``;
nothing here raises for a dependency failure.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pandas as pd

from recsys_models.bundle import Bundle
from recsys_models.fast_rank import rank_aligned
from recsys_platform.features import HISTORY_LENGTH
from recsys_platform.serving.bundle_manager import BundleManager, LoadedBundle
from recsys_platform.serving.candidates import Candidate, diversify, drop_items, merge_sources
from recsys_platform.serving.impressions import ImpressionLogger
from recsys_platform.serving.metrics import ServingMetrics
from recsys_platform.serving.schemas import RecommendedItem, RecommendRequest, RecommendResponse

logger = logging.getLogger(__name__)


class FeatureSource(Protocol):
    """Online features; implementations may raise on any dependency failure."""

    def user_features(self, user_id: str) -> dict[str, Any] | None:
        """Numeric features plus ``user_history`` (list of item ids), None if unknown."""

    def item_frame(self, item_ids: list[str]) -> pd.DataFrame:
        """Item features and metadata indexed by ``item_id`` (missing items: default rows)."""

    def lists(self) -> dict[str, list[str]]:
        """Cold-start lists: ``trending``, ``fresh``, ``popular`` (best first)."""


@dataclass(frozen=True)
class ServingOptions:
    candidates: int = 500
    user_features_timeout_s: float = 0.05
    max_per_creator: int = 2
    max_per_category: int = 5
    cold_start_share: float = 0.2  # of the candidate budget kept for trending/fresh/popular


@dataclass
class Prepared:
    """State of one request between :meth:`Recommender.prepare` and :meth:`finish`."""

    request: RecommendRequest
    request_id: str
    loaded: LoadedBundle | None
    users: pd.DataFrame
    candidates: list[Candidate]
    items: pd.DataFrame
    degraded: list[str] = field(default_factory=list)
    known_user: bool = True


class Recommender:
    """Serves one request end to end with the bundle current at its start."""

    def __init__(
        self,
        manager: BundleManager,
        features: FeatureSource,
        impressions: ImpressionLogger | None,
        metrics: ServingMetrics,
        options: ServingOptions = ServingOptions(),
    ) -> None:
        self.manager = manager
        self.features = features
        self.impressions = impressions
        self.metrics = metrics
        self.options = options
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="features")

    @contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.metrics.stage_latency.labels(name).observe(time.perf_counter() - start)

    def _fallback(self, prep_degraded: list[str], stage: str, exc: BaseException) -> None:
        prep_degraded.append(stage)
        self.metrics.fallbacks.labels(stage).inc()
        logger.warning("stage %s fell back: %s: %s", stage, type(exc).__name__, exc)

    def _user_row(self, user_id: str, degraded: list[str]) -> tuple[pd.DataFrame, bool]:
        """One user row and whether retrieval should run for it.

        A user the store does not know is a cold-start user (no retrieval); when the store
        cannot answer in time, the user is served by retrieval with default features.
        """
        with self._stage("user_features"):
            try:
                future = self._pool.submit(self.features.user_features, user_id)
                found = future.result(timeout=self.options.user_features_timeout_s)
                known = found is not None
            except (FutureTimeout, Exception) as exc:  # Redis down or slow, Feast error
                self._fallback(degraded, "user_features", exc)
                found, known = None, True
        row = dict(found or {})
        history = list(row.get("user_history") or [])[:HISTORY_LENGTH]
        row["user_history"] = history
        row["user_id"] = user_id
        return pd.DataFrame([row]), known

    def _lists(self, degraded: list[str]) -> dict[str, list[str]]:
        try:
            return self.features.lists()
        except Exception as exc:
            self._fallback(degraded, "cold_start_lists", exc)
            return {"trending": [], "fresh": [], "popular": []}

    def prepare(self, request: RecommendRequest) -> Prepared:
        """Features, retrieval and candidate assembly for one request."""
        request_id = uuid.uuid4().hex
        degraded: list[str] = []
        loaded = self.manager.current  # read once: this request's version
        users, known = self._user_row(request.user_id, degraded)
        lists = self._lists(degraded)
        budget = self.options.candidates
        cold = max(1, int(budget * self.options.cold_start_share))
        sources: list[tuple[str, list[str], list[float] | None]] = []
        if loaded is not None and known:
            with self._stage("retrieval"):
                try:
                    emb = loaded.bundle.encode_users(users)
                    ids, scores = loaded.bundle.search(emb, budget - cold)
                    sources.append(("retrieval", list(ids[0]), list(scores[0])))
                except Exception as exc:
                    self._fallback(degraded, "retrieval", exc)
        for name in ("trending", "fresh", "popular"):
            sources.append((name, lists.get(name, [])[: budget], None))
        merged = merge_sources(sources, budget)
        blocked = set(request.exclude) | set(users.iloc[0]["user_history"])
        candidates = drop_items(merged, blocked)
        for cand in candidates:
            self.metrics.candidates.labels(cand.source).inc()
        with self._stage("item_features"):
            try:
                items = self.features.item_frame([c.item_id for c in candidates])
            except Exception as exc:
                self._fallback(degraded, "item_features", exc)
                items = pd.DataFrame(index=pd.Index([c.item_id for c in candidates],
                                                    name="item_id"))
        return Prepared(request, request_id, loaded, users, candidates, items, degraded, known)

    @staticmethod
    def rank(prepared: Prepared) -> np.ndarray:
        """Blended ranking scores for the candidates (raises on ranker failure)."""
        result = rank_many([prepared])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def finish(self, prepared: Prepared, scores: np.ndarray | None,
               rank_error: BaseException | None = None, log: bool = True
               ) -> RecommendResponse:
        """Orders, diversifies, logs impressions and builds the response."""
        degraded = list(prepared.degraded)
        if prepared.loaded is None:
            degraded.append("bundle")
            self.metrics.fallbacks.labels("bundle").inc()
        cands = prepared.candidates
        if scores is not None and len(scores) == len(cands):
            ranked = sorted(zip(cands, scores.tolist(), strict=True), key=lambda p: -p[1])
            source = "model"
        else:
            if prepared.loaded is not None and cands:
                self._fallback(degraded, "ranker", rank_error or RuntimeError("no scores"))
            ranked = [(c, c.retrieval_score) for c in cands]  # retrieval order
            source = "retrieval_order" if prepared.loaded is not None else "popular"
        meta = self._metadata(prepared.items)
        top = diversify(ranked, meta, prepared.request.k, self.options.max_per_creator,
                        self.options.max_per_category)
        items = [RecommendedItem(item_id=c.item_id, score=float(s), source=c.source, position=i)
                 for i, (c, s) in enumerate(top)]  # type: ignore[arg-type]
        version = prepared.loaded.version if prepared.loaded else None
        if log and self.impressions is not None:
            self.impressions.log(prepared.request_id, prepared.request.user_id,
                                 [(i.item_id, i.score, i.source) for i in items], version,
                                 prepared.request.context.surface,
                                 prepared.request.context.device)
        return RecommendResponse(request_id=prepared.request_id,
                                 user_id=prepared.request.user_id, bundle_version=version,
                                 items=items, degraded=degraded, source=source)  # type: ignore[arg-type]

    @staticmethod
    def _metadata(items: pd.DataFrame) -> dict[str, tuple[str, str]]:
        if items.empty or "creator_id" not in items.columns or "category" not in items.columns:
            return {}
        frame = items[["creator_id", "category"]].fillna("").astype(str)
        return {str(k): (c, g) for k, c, g in frame.itertuples(name=None)}

    def recommend(self, request: RecommendRequest, log: bool = True) -> RecommendResponse:
        """The whole path in one call (tests, warm-up, benchmarks' in-process floor)."""
        with self._stage("total"):
            prepared = self.prepare(request)
            try:
                with self._stage("ranking"):
                    scores: np.ndarray | None = self.rank(prepared)
                error: BaseException | None = None
            except Exception as exc:
                scores, error = None, exc
            return self.finish(prepared, scores, error, log=log)


_METADATA = ("category", "creator_id", "tags", "duration_ms", "published_at", "title")


def _pairs(prepared: Prepared) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Aligned user and item rows: row i pairs the user with candidate i."""
    items = prepared.items.reindex([c.item_id for c in prepared.candidates])
    # Metadata comes from the bundle's own catalog (new items are added to it at index
    # refresh), so a stale cache row can never disagree with the index.
    items = items.drop(columns=[c for c in _METADATA if c in items.columns])
    items = items.rename_axis("item_id").reset_index()
    users = prepared.users.iloc[np.zeros(len(items), dtype=np.int64)].reset_index(drop=True)
    return users, items


def _score(bundle: Any, users: pd.DataFrame, items: pd.DataFrame) -> np.ndarray:
    """Blended scores; real bundles take the pre-encoded catalog path."""
    if isinstance(bundle, Bundle):
        ranked = rank_aligned(bundle, users, items)
    else:
        ranked = bundle.rank(users, items)
    return np.asarray(ranked["score"], dtype=np.float64)


def rank_many(batch: list[Prepared]) -> list[np.ndarray | Exception]:
    """Ranks several requests with one ranker call per bundle version among them."""
    results: list[np.ndarray | Exception] = [RuntimeError("not ranked")] * len(batch)
    groups: dict[int, list[int]] = {}
    for idx, prepared in enumerate(batch):
        if prepared.loaded is None or not prepared.candidates:
            results[idx] = RuntimeError("no bundle or no candidates to rank")
        else:
            groups.setdefault(id(prepared.loaded), []).append(idx)
    for members in groups.values():
        loaded = batch[members[0]].loaded
        assert loaded is not None
        pairs = [_pairs(batch[i]) for i in members]
        try:
            scores = _score(loaded.bundle, pd.concat([u for u, _ in pairs], ignore_index=True),
                            pd.concat([i for _, i in pairs], ignore_index=True))
        except Exception as exc:  # the caller falls back to retrieval order
            for i in members:
                results[i] = exc
            continue
        offset = 0
        for i, (_, items) in zip(members, pairs, strict=True):
            results[i] = scores[offset: offset + len(items)]
            offset += len(items)
    return results
