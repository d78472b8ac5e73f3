"""Monitoring checks: PSI, skew, coverage and the breach message."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recsys_pipelines.monitoring import (
    Check,
    MonitoringBreach,
    breaches,
    feature_drift,
    freshness_check,
    gini,
    latest_per_entity,
    psi,
    score_drift,
    served_checks,
    serving_counters,
)


def test_psi_is_small_for_same_distribution_and_large_for_shift() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 1, 20_000)
    assert psi(ref, rng.normal(0, 1, 20_000)) < 0.01
    assert psi(ref, rng.normal(1.0, 1, 20_000)) > 0.2


def test_drift_names_the_feature() -> None:
    rng = np.random.default_rng(1)
    ref = pd.DataFrame({"a": rng.normal(0, 1, 5000), "b": rng.normal(0, 1, 5000)})
    cur = pd.DataFrame({"a": rng.normal(0, 1, 5000), "b": rng.normal(2, 1, 5000)})
    bad = breaches(feature_drift(ref, cur, ["a", "b"]))
    assert [c.name for c in bad] == ["psi:b"]
    with pytest.raises(MonitoringBreach, match=r"feature drift: b PSI [0-9.]+ > 0.2"):
        raise MonitoringBreach(bad)


def test_gini_and_coverage() -> None:
    assert gini(np.ones(10)) == pytest.approx(0.0)
    assert gini(np.array([0] * 99 + [100])) > 0.95
    served = pd.DataFrame({"item_id": ["a"] * 50 + ["b"]})
    checks = {c.name: c for c in served_checks(served, catalog_size=100)}
    assert checks["uncovered_catalog"].value == pytest.approx(0.98)
    assert checks["uncovered_catalog"].breached


def test_freshness_lag() -> None:
    now = pd.Timestamp("2026-11-01T00:00:10Z")
    assert not freshness_check(pd.Timestamp("2026-11-01T00:00:09Z"), now, 5).breached
    assert freshness_check(pd.Timestamp("2026-11-01T00:00:00Z"), now, 5).breached
    assert breaches([freshness_check(None, now, 5)])
    assert not Check("x", float("nan"), 1).breached


def test_breach_message_says_what_drifted_for_every_kind_of_check() -> None:
    message = str(MonitoringBreach([
        Check("psi:user_ctr_7d", 0.83, 0.2), Check("score_psi", 0.5, 0.2),
        Check("uncovered_catalog", 0.99, 0.95), Check("popularity_gini", 0.97, 0.95),
        Check("stream_freshness_lag_s", 1200, 900), Check("rate:fallbacks", 0.2, 0.05),
    ]))
    assert "feature drift: user_ctr_7d PSI 0.83 > 0.2" in message
    assert "score drift: served-score PSI 0.5 > 0.2" in message
    assert "catalog coverage: 1.00% of the catalog served < 5.00%" in message
    assert "popularity skew: Gini 0.970 > 0.95" in message
    assert "stream freshness: lag 1200 s > 900 s" in message
    assert "serving fallbacks rate 20.000% > 5.000%" in message


def test_latest_per_entity_keeps_the_newest_row_of_each() -> None:
    frame = pd.DataFrame({"user_id": ["a", "b", "a"], "x": [1, 2, 3],
                          "event_time": pd.to_datetime(["2026-01-01", "2026-01-02",
                                                        "2026-01-03"])})
    latest = latest_per_entity(frame, "user_id").sort_values("user_id")
    assert latest["x"].tolist() == [3, 2]


def test_score_drift_compares_windows() -> None:
    rng = np.random.default_rng(2)
    before = rng.beta(2, 5, 4000)
    assert not score_drift(before, rng.beta(2, 5, 4000), 0.2).breached
    assert score_drift(before, rng.beta(5, 2, 4000), 0.2).breached


def test_serving_counters_from_prometheus_text() -> None:
    text = "\n".join([
        "# HELP recsys_requests_total Requests by HTTP status.",
        "# TYPE recsys_requests_total counter",
        'recsys_requests_total{status="200"} 90.0',
        'recsys_requests_total{status="503"} 10.0',
        "# HELP recsys_fallbacks_total Stages that fell back to a default.",
        "# TYPE recsys_fallbacks_total counter",
        'recsys_fallbacks_total{stage="ranker"} 3.0',
        'recsys_fallbacks_total{stage="user_features"} 2.0',
    ]) + "\n"
    assert serving_counters(text) == {"requests": 100.0, "errors": 10.0, "fallbacks": 5.0}


def test_a_replica_on_its_last_good_version_is_a_breach() -> None:
    """Before: a replica serving its last good version was not reported by monitoring."""
    from recsys_core.settings import Settings
    from recsys_pipelines.monitoring import breaches
    from recsys_platform.flows.monitoring import serving_rate_checks

    text = "\n".join([
        "# TYPE recsys_requests_total counter", 'recsys_requests_total{status="200"} 10.0',
        "# TYPE recsys_bundle_fallback gauge", "recsys_bundle_fallback VALUE",
    ]) + "\n"
    checks, _ = serving_rate_checks(Settings(), text.replace("VALUE", "1.0"))
    [breach] = breaches(checks)
    assert breach.name == "serving_bundle_fallback" and "last good" in breach.describe()
    assert not breaches(serving_rate_checks(Settings(), text.replace("VALUE", "0.0"))[0])


def test_served_log_windows_and_prometheus_textfile(tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from recsys_core.settings import Settings
    from recsys_platform.flows.monitoring import (
        MonitoringReport,
        served_log_checks,
        write_prometheus,
    )

    settings = Settings(monitoring={"window_hours": 1.0})  # type: ignore[arg-type]
    now = datetime(2026, 11, 2, 12, tzinfo=UTC)
    rng = np.random.default_rng(3)
    served = pd.DataFrame({
        "item_id": [f"i{i % 40}" for i in range(800)],
        "score": np.r_[rng.beta(2, 5, 400), rng.beta(5, 2, 400)],  # the last hour scores higher
        "served_at": [now - timedelta(minutes=90)] * 400 + [now - timedelta(minutes=20)] * 400,
    })
    checks, notes = served_log_checks(settings, served, catalog_size=100, now=now)
    by_name = {c.name: c for c in checks}
    assert notes == [] and by_name["score_psi"].breached
    assert by_name["uncovered_catalog"].value == pytest.approx(0.6)  # 40 of 100 items served

    only_recent = served[served["served_at"] > now - timedelta(hours=1)]
    checks, notes = served_log_checks(settings, only_recent, 100, now)
    assert "score_psi" not in {c.name for c in checks} and "score drift" in notes[0]

    path = write_prometheus(tmp_path / "m" / "recsys.prom", MonitoringReport(checks=checks))
    text = path.read_text()
    assert 'recsys_monitoring_value{check="popularity_gini"}' in text
    assert 'recsys_monitoring_threshold{check="uncovered_catalog"} 0.95' in text
    assert "recsys_monitoring_breaches 0.0" in text
