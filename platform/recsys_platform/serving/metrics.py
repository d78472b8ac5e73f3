"""Prometheus metrics of one serving replica (scraped at ``/metrics``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass
class ServingMetrics:
    """All metrics on a private registry, so several replicas or tests never collide."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.stage_latency = Histogram(
            "recsys_stage_latency_seconds", "Latency of each serving stage.", ["stage"],
            buckets=_BUCKETS, registry=r,
        )
        self.requests = Counter(
            "recsys_requests_total", "Requests by HTTP status.", ["status"], registry=r
        )
        self.candidates = Counter(
            "recsys_candidates_total", "Candidates by source.", ["source"], registry=r
        )
        self.fallbacks = Counter(
            "recsys_fallbacks_total", "Stages that fell back to a default.", ["stage"], registry=r
        )
        self.rejections = Counter(
            "recsys_rejections_total", "Requests refused (overload, validation).", ["reason"],
            registry=r,
        )
        self.bundle_rejections = Counter(
            "recsys_bundle_rejections_total", "Bundle versions that failed to load or smoke test.",
            registry=r,
        )
        self.bundle_swaps = Counter(
            "recsys_bundle_swaps_total", "Bundle versions swapped in.", registry=r
        )
        self.nonfinite_scores = Counter(
            "recsys_nonfinite_scores_total",
            "Ranker scores that were NaN or infinite (the request fell back to retrieval order).",
            registry=r,
        )
        self.bundle_fallback = Gauge(
            "recsys_bundle_fallback",
            "1 while the replica serves another version than the alias names (it was rejected).",
            registry=r,
        )
        self.served_version = Gauge(
            "recsys_served_bundle_version", "Bundle version being served (numeric).", registry=r
        )
