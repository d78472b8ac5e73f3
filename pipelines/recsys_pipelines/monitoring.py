"""Monitoring checks as pure functions: drift, coverage, popularity skew, freshness, errors.

Each check returns :class:`Check` rows; :func:`breaches` picks those past their threshold and
:class:`MonitoringBreach` names every one of them, so a failed flow run says what drifted.
The monitoring flow (``recsys_platform.flows.monitoring``) reads the data and calls these.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
from prometheus_client.parser import text_string_to_metric_families

PSI_BINS = 10


@dataclass(frozen=True)
class Check:
    """One monitored value and the threshold it must stay under."""

    name: str  # e.g. "psi:user_ctr_7d"
    value: float
    threshold: float

    @property
    def breached(self) -> bool:
        return bool(np.isfinite(self.value)) and self.value > self.threshold

    def describe(self) -> str:
        """What the value means, e.g. ``feature drift: user_ctr_7d PSI 0.83 > 0.2``."""
        kind, _, subject = self.name.partition(":")
        if kind == "psi":
            return f"feature drift: {subject} PSI {self.value:.3g} > {self.threshold:g}"
        if kind == "rate":
            return f"serving {subject} rate {self.value:.3%} > {self.threshold:.3%}"
        if self.name == "score_psi":
            return f"score drift: served-score PSI {self.value:.3g} > {self.threshold:g}"
        if self.name == "uncovered_catalog":
            return (f"catalog coverage: {1 - self.value:.2%} of the catalog served "
                    f"< {1 - self.threshold:.2%}")
        if self.name == "popularity_gini":
            return f"popularity skew: Gini {self.value:.3f} > {self.threshold:g}"
        if self.name == "serving_bundle_fallback":
            return ("serving: a replica serves its last good bundle version, the champion "
                    "alias names one that failed its checks")
        if self.name == "stream_freshness_lag_s":
            return f"stream freshness: lag {self.value:.0f} s > {self.threshold:g} s"
        return f"{self.name} {self.value:.4g} > {self.threshold:g}"


class MonitoringBreach(Exception):
    """Raised by the monitoring flow when checks pass their thresholds."""

    def __init__(self, checks: list[Check]) -> None:
        super().__init__("monitoring thresholds breached: "
                         + "; ".join(c.describe() for c in checks))
        self.checks = checks


def psi(expected: np.ndarray, actual: np.ndarray, bins: int = PSI_BINS) -> float:
    """Population stability index of ``actual`` against ``expected`` (quantile bins).

    0 means identical distributions; > 0.2 is the usual "significant shift" threshold.
    """
    expected = np.asarray(expected, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    expected = expected[np.isfinite(expected)]
    actual = actual[np.isfinite(actual)]
    if expected.size == 0 or actual.size == 0:
        return float("nan")
    edges = np.unique(np.quantile(expected, np.linspace(0, 1, bins + 1)))
    if edges.size < 2:  # constant reference: any mass off that value is drift
        same = np.isclose(actual, expected[0]).mean()
        e = np.array([1.0 - 1e-4, 1e-4])
        a = np.clip(np.array([same, 1.0 - same]), 1e-4, None)
        return float(np.sum((a - e) * np.log(a / e)))
    inner = edges[1:-1]
    e_counts = np.bincount(np.searchsorted(inner, expected, side="right"),
                           minlength=edges.size - 1)
    a_counts = np.bincount(np.searchsorted(inner, actual, side="right"),
                           minlength=edges.size - 1)
    e_frac = np.clip(e_counts / e_counts.sum(), 1e-4, None)
    a_frac = np.clip(a_counts / a_counts.sum(), 1e-4, None)
    return float(np.sum((a_frac - e_frac) * np.log(a_frac / e_frac)))


def feature_drift(reference: pd.DataFrame, current: pd.DataFrame, features: Iterable[str],
                  threshold: float = 0.2, bins: int = PSI_BINS) -> list[Check]:
    """PSI per numeric feature present in both frames."""
    checks = []
    for name in features:
        if name in reference.columns and name in current.columns:
            value = psi(pd.to_numeric(reference[name], errors="coerce").to_numpy(),
                        pd.to_numeric(current[name], errors="coerce").to_numpy(), bins)
            checks.append(Check(f"psi:{name}", value, threshold))
    return checks


def latest_per_entity(frame: pd.DataFrame, key: str, time_column: str = "event_time"
                      ) -> pd.DataFrame:
    """The newest row of each entity: a training snapshot as one row per user (or item).

    A snapshot has one row per impression, so active entities would weigh more than in a
    sample of online rows; comparing entity to entity keeps PSI about the features.
    """
    if frame.empty:
        return frame
    return frame.sort_values(time_column, kind="stable").drop_duplicates(key, keep="last")


def score_drift(previous: np.ndarray, current: np.ndarray, threshold: float,
                bins: int = PSI_BINS) -> Check:
    """PSI of the served scores of this window against the previous window."""
    return Check("score_psi", psi(previous, current, bins), threshold)


def gini(counts: np.ndarray) -> float:
    """Gini coefficient of exposure counts (0 = every item equally shown, 1 = one item)."""
    x = np.sort(np.asarray(counts, dtype=np.float64))
    if x.size == 0 or x.sum() == 0:
        return 0.0
    n = x.size
    cum = np.cumsum(x)
    return float((n + 1 - 2 * np.sum(cum) / cum[-1]) / n)


def served_checks(served: pd.DataFrame, catalog_size: int, min_coverage: float = 0.05,
                  max_gini: float = 0.95) -> list[Check]:
    """Catalog coverage and popularity skew of served items.

    Coverage is reported as ``1 - coverage`` against ``1 - min_coverage`` so that every check
    reads "value above threshold is bad".
    """
    if served.empty or catalog_size == 0:
        return []
    coverage = served["item_id"].nunique() / catalog_size
    skew = gini(served["item_id"].value_counts().to_numpy())
    return [Check("uncovered_catalog", 1.0 - coverage, 1.0 - min_coverage),
            Check("popularity_gini", skew, max_gini)]


def rate_checks(counters: Mapping[str, float], requests: float,
                thresholds: Mapping[str, float]) -> list[Check]:
    """Error / fallback rates per request from serving counters."""
    if requests <= 0:
        return []
    return [Check(f"rate:{name}", counters.get(name, 0.0) / requests, limit)
            for name, limit in thresholds.items()]


def serving_counters(metrics_text: str) -> dict[str, float]:
    """Request, 5xx and fallback totals from a serving replica's Prometheus exposition.

    Returns:
        ``requests``, ``errors`` (status 5xx), ``fallbacks`` (every degraded stage) and, when
        the replica reports it, ``bundle_fallback`` (1: it serves the last good version
        because the champion alias names a rejected one).
    """
    totals = {"requests": 0.0, "errors": 0.0, "fallbacks": 0.0}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "recsys_requests_total":
                totals["requests"] += sample.value
                if sample.labels.get("status", "").startswith("5"):
                    totals["errors"] += sample.value
            elif sample.name == "recsys_fallbacks_total":
                totals["fallbacks"] += sample.value
            elif sample.name == "recsys_bundle_fallback":
                totals["bundle_fallback"] = max(totals.get("bundle_fallback", 0.0), sample.value)
    return totals


def freshness_check(latest_event_time: pd.Timestamp | None, now: pd.Timestamp,
                    max_lag_s: float) -> Check:
    """Lag between now and the newest event the stream wrote (inf when nothing was written)."""
    lag = float("inf") if latest_event_time is None else (now - latest_event_time).total_seconds()
    return Check("stream_freshness_lag_s", lag, max_lag_s)


def breaches(checks: Iterable[Check]) -> list[Check]:
    return [c for c in checks if c.breached or (c.name.startswith("stream_") and
                                                 not np.isfinite(c.value))]
