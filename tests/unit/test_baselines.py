"""Tuned baselines: EASE (capped at a catalog size) and ALS, tuned on the training side."""

from __future__ import annotations

import numpy as np
import pandas as pd

from recsys_models.baselines import ease_recommender, tuned_baselines
from recsys_models.evaluate import holdout_queries, retrieval_metrics


def _clustered(users: int = 80, items: int = 40, seed: int = 0) -> pd.DataFrame:
    """Each user engages with items of one of four clusters, over time."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        cluster = u % 4
        picks = rng.choice(np.arange(cluster, items, 4), 8, replace=False)
        for t, i in enumerate(picks):
            rows.append((f"u{u}", f"i{i}", pd.Timestamp("2026-01-01", tz="UTC")
                         + pd.Timedelta(hours=t * 10 + u % 7), 1))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "event_time", "clicked"])


def test_ease_is_fitted_on_the_most_engaged_items_only() -> None:
    train = _clustered()
    top = train["item_id"].value_counts().index[:5]
    users = pd.DataFrame({"user_id": ["u0", "u1"]})
    recs = ease_recommender(train, 50.0, max_items=5)(users, 10, {})
    known = [x for row in recs for x in row if x is not None]
    assert known and set(known) <= set(top)


def test_tuned_baselines_pick_parameters_on_the_training_side_and_beat_chance() -> None:
    rows = _clustered()
    cutoff = rows["event_time"].quantile(0.8)
    train, holdout = rows[rows["event_time"] < cutoff], rows[rows["event_time"] >= cutoff]
    out = tuned_baselines(train, protocol="per-user", validation_fraction=0.3,
                          ease_max_items=30,
                          als_grid=((8, 0.01, 1.0), (16, 0.01, 10.0)),
                          ease_lambdas=(1.0, 10.0))
    assert set(out.recommenders) == {"ease", "als"}
    assert out.info["baseline/ease_lambda"] in (1.0, 10.0)
    assert out.info["baseline/als_factors"] in (8, 16)
    assert out.info["baseline/ease_items"] == 30 and "30 most engaged of 40" in \
        out.info["baseline/ease_note"]
    queries = holdout_queries(train, holdout)
    for name, recommend in out.recommenders.items():
        recs = recommend(queries.users, 10, queries.exclude)
        # a user's own cluster has 10 items, 6-8 of them seen: chance is ~10 / 32
        assert retrieval_metrics(recs, queries.relevant, (10,))["recall@10"] > 0.6, name
