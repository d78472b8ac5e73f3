"""The best Recall@50 any model can reach on the demo's synthetic data, next to popularity.

The generator (``recsys_pipelines.generator``) knows its ground truth: user and item latent
factors and each user's two favourite categories. Half of the impressions follow a Zipf
popularity prior, half pick an item uniformly within one of the user's favourite categories;
a shown item is clicked with probability ``sigmoid(2 * match - 1)``. The "oracle" ranks every
item live at the cutoff by ``P(shown) * P(click | shown)`` from that ground truth (exposure
estimated from the training impressions and the category rule), which is what a perfect model
of "will the user click it in the holdout" would do; popularity ranks by training clicks.
Both go through ``evaluate_retrieval`` on the demo's protocol (global time cutoff at the 80%
quantile of impressions; a holdout user's relevant items are their holdout clicks; items
clicked in training excluded).

On the demo's parameters (``recsys demo``: 200k events, 2,000 users, 5,000 items, 14 days)
the oracle is only ~1.2x popularity: no model can reach 2x on this data.

Run: ``.venv/bin/python benchmarks/bench_demo_ceiling.py [--users 2000 --items 5000]``
"""

from __future__ import annotations

import argparse
from datetime import date

import numpy as np
import pandas as pd

from recsys_models.data import time_split
from recsys_models.evaluate import (
    Recommender,
    evaluate_retrieval,
    holdout_queries,
    popularity_recommender,
)
from recsys_pipelines.generator import GeneratorConfig, generate


def impression_rows(events: pd.DataFrame) -> pd.DataFrame:
    """One row per impression, ``clicked`` 1 when the same request clicked the item."""
    ev = events.copy()
    ev["event_time"] = pd.to_datetime(ev["event_time"], utc=True, format="ISO8601",
                                      errors="coerce")
    ev = ev.dropna(subset=["event_time", "user_id", "item_id"])
    key = ["request_id", "item_id"]
    imp = ev[ev["event_type"] == "impression"].drop_duplicates(key)
    clicks = ev[ev["event_type"] == "click"].drop_duplicates(key)[key].assign(clicked=1)
    rows = imp[["user_id", "item_id", "event_time", "request_id"]].merge(clicks, on=key,
                                                                          how="left")
    rows["clicked"] = rows["clicked"].fillna(0).astype(np.int64)
    return rows.drop(columns="request_id").sort_values("event_time", kind="stable")


def oracle_recommender(data: object, train: pd.DataFrame, cutoff: pd.Timestamp) -> Recommender:
    """Ranks live items by estimated P(shown) x the true P(click | shown)."""
    items = data.items.reset_index(drop=True)  # type: ignore[attr-defined]
    users = {u: i for i, u in enumerate(data.users["user_id"])}  # type: ignore[attr-defined]
    uf, itf = data.user_factors, data.item_factors  # type: ignore[attr-defined]
    favourites = data.user_categories  # type: ignore[attr-defined]
    live = (pd.to_datetime(items["published_at"], utc=True) < cutoff).to_numpy()
    category = items["category"].str.slice(3).astype(int).to_numpy()
    shown = items["item_id"].map(train["item_id"].value_counts()).fillna(0).to_numpy()
    shown = shown / shown.sum()  # the popularity half (and some category slots)
    per_category = np.bincount(category[live], minlength=category.max() + 1)
    ids = items["item_id"].to_numpy()

    def recommend(frame: pd.DataFrame, k: int, exclude: dict[str, set[str]]) -> np.ndarray:
        out = np.full((len(frame), k), None, dtype=object)
        for row, user in enumerate(frame["user_id"]):
            i = users[user]
            fav = favourites[i]
            exposure = 0.5 * shown + 0.25 * sum(
                (category == c) / max(per_category[c], 1) for c in fav)
            match = itf @ uf[i] / np.sqrt(itf.shape[1])
            score = np.where(live, exposure / (1.0 + np.exp(-(2.0 * match - 1.0))), -1.0)
            seen = exclude.get(user, set())
            top = [ids[j] for j in np.argsort(-score)[: k + len(seen)] if ids[j] not in seen]
            out[row, : min(k, len(top))] = top[:k]
        return out

    return recommend


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--items", type=int, default=5_000)
    parser.add_argument("--categories", type=int, default=20)
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--new-users-per-day", type=int, default=50)
    parser.add_argument("--new-items-per-day", type=int, default=100)
    parser.add_argument("--dirt-rate", type=float, default=0.01)
    args = parser.parse_args()
    data = generate(GeneratorConfig(
        events=args.events, days=args.days, start=date(2026, 11, 1), users=args.users,
        items=args.items, categories=args.categories, new_users_per_day=args.new_users_per_day,
        new_items_per_day=args.new_items_per_day, dirt_rate=args.dirt_rate, seed=7))
    rows = impression_rows(data.events)
    train, holdout, cutoff = time_split(rows, 0.2)
    queries = holdout_queries(train, holdout)
    recs = {"oracle": oracle_recommender(data, train, cutoff),
            "popularity": popularity_recommender(train)}
    metrics, _ = evaluate_retrieval(recs, queries, (10, 50))
    print(f"{args.users} users, {args.items} items, {args.categories} categories, "
          f"{len(queries.users)} holdout users\n")
    print("| list | Recall@10 | Recall@50 |")
    print("|---|---|---|")
    for name in recs:
        print(f"| {name} | {metrics[f'{name}/recall@10']:.4f} | "
              f"{metrics[f'{name}/recall@50']:.4f} |")
    ratio = metrics["oracle/recall@50"] / metrics["popularity/recall@50"]
    print(f"\noracle / popularity at Recall@50: x{ratio:.2f}")


if __name__ == "__main__":
    main()
