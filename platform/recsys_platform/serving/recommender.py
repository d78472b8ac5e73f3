"""The request path as plain functions: features -> retrieval -> candidates -> rank -> top-k.

:class:`Recommender` has no Ray in it; the Ray Serve deployment calls :meth:`recommend` (or
:meth:`prepare`, a batched :func:`rank_many`, then :meth:`finish`). Every stage that depends on
something outside the process has a fallback and records it in ``degraded``; nothing here
raises for a dependency failure.

The hot path is numpy/torch only (:mod:`recsys_models.scoring`, the one ranking path): the
user is encoded once from plain values and that encoding feeds both the user tower and the
ranker; the candidates' item features come from one read of those items (behind a small LRU),
the ranker gathers their item sides computed once per bundle, and scores every candidate in one
forward. No pandas frame is built per request, except for a candidate the bundle has not
indexed yet (scored from its metadata through :meth:`~recsys_models.bundle.Bundle.rank`, the
same scoring's frame entry).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd

from recsys_core.features import HISTORY_LENGTH, USER_HISTORY
from recsys_core.privacy import pseudonymize
from recsys_models.bundle import Bundle
from recsys_models.scoring import (
    Query,
    catalog_rows,
    embed_user,
    encode_user,
    ranking_catalog,
    score_candidates,
)
from recsys_platform.serving.bundle_manager import BundleManager, LoadedBundle
from recsys_platform.serving.candidates import Candidate, diversify, drop_items, merge_sources
from recsys_platform.serving.impressions import ImpressionLogger
from recsys_platform.serving.item_features import ItemReadError, ItemRows
from recsys_platform.serving.metrics import ServingMetrics
from recsys_platform.serving.schemas import RecommendedItem, RecommendRequest, RecommendResponse

if TYPE_CHECKING:  # types only: the experiments module never imports this one
    from recsys_platform.serving.experiments import ExperimentArms, Route

logger = logging.getLogger(__name__)

_METADATA = ("category", "creator_id", "tags", "duration_ms", "published_at", "title")


class _RequestIds:
    """Unique 32-hex-digit request ids: a random per-process prefix (renewed in a forked
    child) + a counter. A ``uuid4`` per request reads ``os.urandom``, a system call on the hot
    path; the prefix keeps ids of different replicas apart."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.prefix = uuid.uuid4().hex[:16]
        self.counter = itertools.count()

    def next(self) -> str:
        return f"{self.prefix}{next(self.counter):016x}"


_request_ids = _RequestIds()
os.register_at_fork(after_in_child=_request_ids.reset)


def next_request_id() -> str:
    """A request id unique across processes (see :class:`_RequestIds`)."""
    return _request_ids.next()


class FeatureSource(Protocol):
    """Online features; ``user_features`` may raise on any dependency failure."""

    def user_features(self, user_id: str) -> dict[str, Any] | None:
        """Numeric features plus ``user_history`` (list of item ids), None if unknown."""

    def item_rows(self, item_ids: list[str]) -> ItemRows:
        """Features and diversity metadata of these items (one read); may raise."""

    def cold_start_lists(self) -> dict[str, list[str]]:
        """Trending, fresh and popular item ids, best first (kept in memory)."""

    def has_item_features(self) -> bool:
        """False when the online store holds no item feature at all (not materialized)."""


@dataclass(frozen=True)
class ServingOptions:
    candidates: int = 500
    user_features_timeout_s: float = 0.05
    max_per_creator: int = 2
    max_per_category: int = 5
    cold_start_share: float = 0.2  # of the candidate budget kept for trending/fresh/popular
    load_candidates: int = 100  # the cheaper path under load: this many candidates,
    load_rank: bool = False  # ranked (True) or in retrieval order (False: no ranker at all)
    pseudonym_key: str | None = None  # set: user ids are pseudonymized before any lookup


@dataclass
class Prepared:
    """State of one request between :meth:`Recommender.prepare` and :meth:`finish`."""

    request: RecommendRequest
    request_id: str
    loaded: LoadedBundle | None
    user_key: str  # the id features, model and impression log see (pseudonym when enabled)
    user: dict[str, Any]  # numeric features + ``user_history``
    candidates: list[Candidate]
    items: ItemRows  # the candidates' features and diversity metadata
    degraded: list[str] = field(default_factory=list)
    known_user: bool = True
    encoded_user: dict[str, np.ndarray] | None = None  # fast path: encode_user's output
    route: Route | None = None  # the online experiment arm this request is in
    started: float = 0.0  # perf_counter at the request's start (latency in the impression log)


class Recommender:
    """Serves one request end to end with the bundle current at its start."""

    def __init__(
        self,
        manager: BundleManager,
        features: FeatureSource,
        impressions: ImpressionLogger | None,
        metrics: ServingMetrics,
        options: ServingOptions = ServingOptions(),
        experiments: ExperimentArms | None = None,
    ) -> None:
        self.manager = manager
        self.experiments = experiments  # online experiment: split routing, shadow rankings
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

    def user_key(self, user_id: str) -> str:
        """The id used for features, the model and the impression log."""
        key = self.options.pseudonym_key
        return pseudonymize(user_id, key) if key is not None else user_id

    def _user_row(self, user_key: str, degraded: list[str]) -> tuple[dict[str, Any], bool]:
        """The user's features and whether retrieval should run for them.

        A user the store does not know is a cold-start user (no retrieval); when the store
        cannot answer in time, the user is served by retrieval with default features.
        """
        with self._stage("user_features"):
            try:
                future = self._pool.submit(self.features.user_features, user_key)
                found = future.result(timeout=self.options.user_features_timeout_s)
                known = found is not None
            except (FutureTimeout, Exception) as exc:  # Redis down or slow, Feast error
                self._fallback(degraded, "user_features", exc)
                found, known = None, True
        row = dict(found or {})
        row[USER_HISTORY] = list(row.get(USER_HISTORY) or [])[:HISTORY_LENGTH]
        return row, known

    def _lists(self, degraded: list[str]) -> tuple[dict[str, list[str]], bool]:
        try:
            return self.features.cold_start_lists(), self.features.has_item_features()
        except Exception as exc:
            self._fallback(degraded, "cold_start_lists", exc)
            return {}, True

    def _items(self, item_ids: list[str], degraded: list[str]) -> ItemRows:
        """The candidates' features; defaults (zeros, no metadata) when the read fails."""
        with self._stage("item_features"):
            try:
                return self.features.item_rows(item_ids)
            except ItemReadError as exc:  # Redis down or slow: the rows the cache still has
                self._fallback(degraded, "item_features", exc)
                return exc.rows
            except Exception as exc:
                self._fallback(degraded, "item_features", exc)
                return ItemRows.empty()

    @staticmethod
    def _retrieve(bundle: Bundle, user: dict[str, np.ndarray], n: int
                  ) -> tuple[list[str], list[float]]:
        ids, scores = bundle.search(embed_user(bundle, user), n)
        return list(ids[0]), np.asarray(scores[0], dtype=np.float64).tolist()

    def prepare(self, request: RecommendRequest, budget: int | None = None) -> Prepared:
        """Features, retrieval and candidate assembly for one request (``budget``: how many
        candidates, default ``options.candidates``)."""
        started = time.perf_counter()
        request_id = next_request_id()
        degraded: list[str] = []
        loaded = self.manager.current  # read once: this request's version
        user_key = self.user_key(request.user_id)
        route = self.experiments.route(user_key) if self.experiments is not None else None
        if route is not None and route.serves_treatment:
            loaded = route.treatment  # a split experiment's treatment user
        row, known = self._user_row(user_key, degraded)
        lists, has_features = self._lists(degraded)
        if not known and not has_features:
            # An empty online store (not materialized, flushed): the user may well be known to
            # the bundle, so retrieval runs with default features, as when Redis is down.
            self._fallback(degraded, "user_features_missing",
                           LookupError("the online store holds no features (not materialized?)"))
            known = True
        prepared = self.assemble(loaded, request, request_id, user_key, row, known, lists,
                                 degraded, budget)
        prepared.route, prepared.started = route, started
        return prepared

    def assemble(self, loaded: LoadedBundle | None, request: RecommendRequest,
                 request_id: str, user_key: str, row: dict[str, Any], known: bool,
                 lists: dict[str, list[str]], degraded: list[str], budget: int | None = None,
                 count: bool = True) -> Prepared:
        """Retrieval with ``loaded`` and the candidate list, from features already read
        (a shadow arm reuses the control's; ``count=False`` keeps it out of the metrics)."""
        encoded: dict[str, np.ndarray] | None = None
        if loaded is not None:
            encoded = encode_user(loaded.bundle.spec, user_key, row[USER_HISTORY], row)
        budget = budget or self.options.candidates
        cold = max(1, int(budget * self.options.cold_start_share))
        sources: list[tuple[str, list[str], list[float] | None]] = []
        neighbours: list[str] = []
        if loaded is not None and encoded is not None and known:
            with self._stage("retrieval"):
                try:
                    ids, scores = self._retrieve(loaded.bundle, encoded, budget - cold)
                    sources.append(("retrieval", ids, scores))
                    # the bundle's item-item source, if it has one
                    neighbours = loaded.bundle.neighbour_candidates(encoded["history"][0])
                    sources.append(("neighbours", neighbours, None))
                except Exception as exc:
                    self._fallback(degraded, "retrieval", exc)
        for name in ("trending", "fresh", "popular"):
            sources.append((name, lists.get(name, [])[:budget], None))
        merged = merge_sources(sources, budget + len(neighbours))
        candidates = drop_items(merged, set(request.exclude) | set(row[USER_HISTORY]))
        for source, n in Counter(c.source for c in candidates).items() if count else ():
            self.metrics.candidates.labels(source).inc(n)
        items = ItemRows.empty()
        if candidates:
            ids = [c.item_id for c in candidates]
            if count:
                items = self._items(ids, degraded)
            else:  # a shadow arm: the same cached read, kept out of the metrics
                try:
                    items = self.features.item_rows(ids)
                except ItemReadError as exc:
                    items = exc.rows
                except Exception:
                    items = ItemRows.empty()
        return Prepared(request, request_id, loaded, user_key, row, candidates, items,
                        degraded, known, encoded)

    @staticmethod
    def rank(prepared: Prepared) -> np.ndarray:
        """Blended ranking scores for the candidates (raises on ranker failure)."""
        result = rank_many([prepared])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def finish(self, prepared: Prepared, scores: np.ndarray | None,
               rank_error: BaseException | None = None, log: bool = True,
               load_shed: bool = False) -> RecommendResponse:
        """Orders, diversifies, logs impressions and builds the response (``load_shed``: the
        ranker was skipped on purpose, the cheaper path under load)."""
        degraded = list(prepared.degraded)
        if load_shed:
            degraded.append("load")
            self.metrics.fallbacks.labels("load").inc()
        if prepared.loaded is None:
            degraded.append("bundle")
            self.metrics.fallbacks.labels("bundle").inc()
        cands = prepared.candidates
        ranked: Iterator[tuple[Candidate, float]]
        if scores is not None and len(scores) == len(cands) \
                and not np.isfinite(np.asarray(scores, dtype=np.float64)).all():
            bad = int((~np.isfinite(np.asarray(scores, dtype=np.float64))).sum())
            self.metrics.nonfinite_scores.inc(bad)
            rank_error = ValueError(f"ranker gave {bad} non-finite scores of {len(scores)}")
            scores = None  # retrieval order, marked degraded: ["ranker"] below
        if scores is not None and len(scores) == len(cands):
            order = np.argsort(-np.asarray(scores), kind="stable")
            ranked = zip([cands[i] for i in order.tolist()],
                         np.asarray(scores)[order].tolist(), strict=True)
            source = "model"
        else:
            if prepared.loaded is not None and cands and (rank_error or not load_shed):
                self._fallback(degraded, "ranker", rank_error or RuntimeError("no scores"))
            ranked = iter([(c, c.retrieval_score) for c in cands])  # retrieval order
            source = "retrieval_order" if prepared.loaded is not None else "popular"
        top = diversify(ranked, prepared.items.metadata, prepared.request.k,
                        self.options.max_per_creator, self.options.max_per_category)
        items = [RecommendedItem.model_construct(item_id=c.item_id, score=float(s),
                                                 source=c.source,  # type: ignore[arg-type]
                                                 position=i)
                 for i, (c, s) in enumerate(top)]
        version = prepared.loaded.version if prepared.loaded else None
        route = prepared.route
        if log and self.impressions is not None:
            self.impressions.log(prepared.request_id, prepared.user_key,
                                 [(i.item_id, i.score, i.source) for i in items], version,
                                 prepared.request.context.surface,
                                 prepared.request.context.device,
                                 experiment_id=route.experiment.id if route else None,
                                 arm=route.arm if route else None, degraded=",".join(degraded),
                                 latency_ms=(time.perf_counter() - prepared.started) * 1000
                                 if prepared.started else None,
                                 **served_features(prepared.user))
        if route is not None and self.experiments is not None:
            # counts; queues a shadow ranking, unless the replica is shedding load
            self.experiments.served(self, prepared, log, shed=load_shed)
        return RecommendResponse.model_construct(
            request_id=prepared.request_id, user_id=prepared.request.user_id,
            bundle_version=version, items=items, degraded=degraded,
            source=source)  # type: ignore[arg-type]

    def shadow_items(self, prepared: Prepared, treatment: LoadedBundle
                     ) -> list[tuple[str, float, str]]:
        """``treatment``'s top-k for the request ``prepared`` was served for (same features,
        cold-start lists and exclusions; its candidates read through the same item cache),
        ranked and diversified as the request path does; nothing is counted in the metrics
        (a shadow experiment's ranking, off the request path)."""
        shadow = self.assemble(treatment, prepared.request, prepared.request_id,
                               prepared.user_key, prepared.user, prepared.known_user,
                               self._lists([])[0], [], count=False)
        cands = shadow.candidates
        scores = rank_many([shadow])[0] if cands else None
        ranked: Iterator[tuple[Candidate, float]]
        if isinstance(scores, np.ndarray) and len(scores) == len(cands) \
                and np.isfinite(scores).all():
            order = np.argsort(-scores, kind="stable").tolist()
            ranked = iter([(cands[i], float(scores[i])) for i in order])
        else:
            ranked = iter([(c, c.retrieval_score) for c in cands])
        top = diversify(ranked, prepared.items.metadata, prepared.request.k,
                        self.options.max_per_creator, self.options.max_per_category)
        return [(c.item_id, float(s), c.source) for c, s in top]

    def recommend(self, request: RecommendRequest, log: bool = True, cheap: bool = False
                  ) -> RecommendResponse:
        """The whole path in one call (the deployment, tests, warm-up, benchmarks).

        ``cheap``: the path a loaded replica takes instead of refusing: ``load_candidates``
        candidates, ranked when ``load_rank`` else in retrieval order (no ranker); the
        response says ``degraded: ["load"]``.
        """
        rank = not cheap or self.options.load_rank
        with self._stage("total_cheap" if cheap else "total"):
            prepared = self.prepare(request, self.options.load_candidates if cheap else None)
            scores: np.ndarray | None = None
            error: BaseException | None = None
            if rank:
                try:
                    with self._stage("ranking"):
                        scores = self.rank(prepared)
                except Exception as exc:
                    error = exc
            return self.finish(prepared, scores, error, log=log, load_shed=cheap)


def served_features(user: dict[str, Any]) -> dict[str, str]:
    """What the model was given for the user, for the impression log: the numeric online
    features (batch and stream views) and the history, as JSON (the training-set builder
    reads them back: ``recsys_pipelines.training_set.attach_served_features``)."""
    numeric = {k: v for k, v in user.items()
               if isinstance(v, int | float) and not isinstance(v, bool)}
    return {"user_features": json.dumps(numeric, separators=(",", ":")),
            USER_HISTORY: json.dumps(list(user.get(USER_HISTORY) or []))}


def _rank_unindexed(bundle: Bundle, prepared: Prepared) -> np.ndarray:
    """Scores of a request with a candidate the bundle has not indexed yet (a cold-start list
    item without metadata online): :meth:`Bundle.rank` on frames, its metadata from the
    bundle's catalog where known."""
    items = prepared.items.frame([c.item_id for c in prepared.candidates])
    # Metadata comes from the bundle's own catalog (new items are added to it at index
    # refresh), so a stale cache row can never disagree with the index.
    items = items.drop(columns=[c for c in _METADATA if c in items.columns])
    users = pd.DataFrame([{**prepared.user, "user_id": prepared.user_key}])
    ranked = bundle.rank(users, items.rename_axis("item_id").reset_index())
    return np.asarray(ranked["score"], dtype=np.float64)


def _rank_group(bundle: Bundle, batch: list[Prepared]) -> list[np.ndarray]:
    """Scores of requests sharing one bundle version: one ranker pass over all of them."""
    catalog = ranking_catalog(bundle)
    names = bundle.spec.item_features
    out: list[np.ndarray] = [np.zeros(0)] * len(batch)
    queries: list[Query] = []
    indexed: list[int] = []
    for i, prepared in enumerate(batch):
        ids = [c.item_id for c in prepared.candidates]
        rows = catalog_rows(catalog, ids)
        if rows is None or prepared.encoded_user is None:
            out[i] = _rank_unindexed(bundle, prepared)
        else:
            features = prepared.items.numeric(ids, names) if names else None
            queries.append(Query(prepared.encoded_user, rows, features))
            indexed.append(i)
    for i, scores in zip(indexed, score_candidates(bundle, catalog, queries), strict=True):
        out[i] = scores
    return out


def rank_many(batch: list[Prepared]) -> list[np.ndarray | Exception]:
    """Ranks several requests with one ranker call per bundle version."""
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
        try:
            scores = _rank_group(loaded.bundle, [batch[i] for i in members])
        except Exception as exc:  # the caller falls back to retrieval order
            for i in members:
                results[i] = exc
            continue
        for i, s in zip(members, scores, strict=True):
            results[i] = s
    return results
