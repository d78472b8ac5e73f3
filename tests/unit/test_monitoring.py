"""Monitoring checks: PSI, skew, coverage and the breach message."""

from __future__ import annotations

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
    psi,
    served_checks,
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
    with pytest.raises(MonitoringBreach, match=r"psi:b="):
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
