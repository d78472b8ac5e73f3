"""The sequence builder: point-in-time histories for next-item training examples."""

from __future__ import annotations

import numpy as np
import pandas as pd

from recsys_models.sequences import engaged_mask, pit_histories


def _rows() -> pd.DataFrame:
    t = pd.Timestamp("2026-01-01", tz="UTC")
    return pd.DataFrame({
        "user_id": ["u1", "u1", "u1", "u1", "u2", "u1", "u1"],
        "item_id": ["a", "b", "c", "a", "x", "d", "e"],
        "event_time": [t, t + pd.Timedelta(1, "h"), t + pd.Timedelta(2, "h"),
                       t + pd.Timedelta(3, "h"), t + pd.Timedelta(1, "h"),
                       t + pd.Timedelta(4, "h"), t + pd.Timedelta(4, "h")],
        "clicked": [1, 1, 0, 1, 1, 1, 1],
    })


def test_history_is_newest_first_distinct_and_only_engagements() -> None:
    rows = _rows()
    hist = pit_histories(rows, engaged_mask(rows), length=10)
    assert hist[0] == []  # nothing before the first engagement
    assert hist[1] == ["a"]
    assert hist[2] == ["b", "a"]  # the unclicked "c" never enters a history
    assert hist[3] == ["b", "a"]
    assert hist[5] == ["a", "b"]  # "a" again: kept once, at its newest position
    assert hist[4] == []  # another user's engagements never leak in


def test_an_engagement_at_the_same_instant_is_not_in_the_input() -> None:
    rows = _rows()
    hist = pit_histories(rows, engaged_mask(rows), length=10)
    assert "e" not in hist[5] and "d" not in hist[6]


def test_length_keeps_the_newest() -> None:
    rows = _rows()
    hist = pit_histories(rows, engaged_mask(rows), length=1)
    assert hist[3] == ["b"] and hist[5] == ["a"]


def test_no_future_item_ever_appears_in_an_input_on_random_data() -> None:
    rng = np.random.default_rng(3)
    n = 2_000
    rows = pd.DataFrame({
        "user_id": rng.choice([f"u{i}" for i in range(30)], n),
        "item_id": rng.choice([f"i{i}" for i in range(200)], n),
        "event_time": pd.Timestamp("2026-01-01", tz="UTC")
        + pd.to_timedelta(rng.integers(0, 500, n), unit="min"),
        "clicked": rng.integers(0, 2, n),
    })
    hist = pit_histories(rows, engaged_mask(rows), length=20)
    engaged = rows[rows["clicked"] == 1]
    for i in rng.choice(n, 300, replace=False):
        user, t = rows.at[i, "user_id"], rows.at[i, "event_time"]
        before = engaged[(engaged["user_id"] == user) & (engaged["event_time"] < t)]
        allowed = set(before["item_id"])
        assert set(hist[i]) <= allowed, (i, hist[i])
        expected = before.sort_values("event_time", kind="stable")["item_id"].tolist()[::-1]
        newest = list(dict.fromkeys(expected))[:20]
        assert set(hist[i]) == set(newest)


def test_the_baseline_gate_names_the_metric_both_values_and_the_margin() -> None:
    from recsys_models.registry import baseline_gate

    ok = {"final/recall@50": 0.23, "popularity/recall@50": 0.20}
    assert baseline_gate(ok, 0.10) == []
    (reason,) = baseline_gate({"final/recall@50": 0.21, "popularity/recall@50": 0.20}, 0.10)
    assert "final/recall@50 0.2100" in reason and "popularity/recall@50 0.2000" in reason
    assert "10%" in reason and "0.2200" in reason
    assert baseline_gate({"popularity/recall@50": 0.2}, 0.1)  # a missing metric refuses
