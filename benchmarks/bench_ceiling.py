"""The best recall any model can reach on the demo's synthetic data, next to popularity.

The generator knows its ground truth (:func:`recsys_pipelines.generator.expected_clicks`: the
impression policy's chance of showing an item to a user times the click probability). Ranking
every holdout user's candidates by it is the ceiling of every retrieval model on that data; it
runs here through the same holdout split, queries, exclusions and metric code as the two-tower
(:mod:`recsys_models.evaluate`), next to the popularity list of the same run.

Run: ``.venv/bin/python benchmarks/bench_ceiling.py`` (the demo's data: 200k events, 14 days,
2,000 users, 5,000 items); ``--events``, ``--users``, ``--items``, ``--days`` and
``--protocol per-user`` change it.
"""

from __future__ import annotations

import argparse
from datetime import UTC, date, datetime

import numpy as np
import pandas as pd

from recsys_models.evaluate import (
    Recommender,
    evaluate_retrieval,
    holdout_queries,
    holdout_split,
    popularity_recommender,
)
from recsys_pipelines.generator import GeneratedData, GeneratorConfig, expected_clicks, generate

KS = (10, 50, 100)


def impression_rows(data: GeneratedData) -> pd.DataFrame:
    """One row per impression: user_id, item_id, event_time, clicked (the snapshot's labels)."""
    ev = data.events
    keys = ["request_id", "user_id", "item_id"]
    shown = ev[ev["event_type"] == "impression"][[*keys, "event_time"]]
    clicks = ev[ev["event_type"] == "click"][keys].drop_duplicates().assign(clicked=1)
    rows = shown.merge(clicks, on=keys, how="left")
    rows["clicked"] = rows["clicked"].fillna(0).astype(np.int64)
    rows["event_time"] = pd.to_datetime(rows["event_time"], utc=True, format="ISO8601")
    return rows.drop(columns="request_id").reset_index(drop=True)


def oracle_recommender(data: GeneratedData, cfg: GeneratorConfig, cutoff: datetime
                       ) -> Recommender:
    """Ranks the items published before ``cutoff`` by the generator's expected clicks."""
    published = pd.to_datetime(data.items["published_at"], utc=True)
    live = np.flatnonzero((published < cutoff).to_numpy())
    ids = data.items["item_id"].to_numpy()[live]
    user_index = {u: i for i, u in enumerate(data.users["user_id"])}

    def recommend(users: pd.DataFrame, k: int, exclude: dict[str, set[str]]) -> np.ndarray:
        rows = np.array([user_index[u] for u in users["user_id"]])
        scores = expected_clicks(data, cfg, rows, live)  # (users, live items)
        out = np.empty((len(users), k), dtype=object)
        for r, uid in enumerate(users["user_id"]):
            seen = exclude.get(uid, set())
            top = np.argsort(-scores[r])[: k + len(seen)]
            picked = [x for x in ids[top] if x not in seen][:k]
            out[r] = picked + [None] * (k - len(picked))
        return out

    return recommend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--items", type=int, default=5_000)
    parser.add_argument("--categories", type=int, default=GeneratorConfig.categories)
    parser.add_argument("--category-share", type=float, default=GeneratorConfig.category_share)
    parser.add_argument("--protocol", choices=("global", "per-user"), default="global")
    parser.add_argument("--holdout", type=float, default=0.2)
    args = parser.parse_args()
    cfg = GeneratorConfig(events=args.events, days=args.days, users=args.users,
                          items=args.items, start=date(2026, 11, 1), categories=args.categories,
                          category_share=args.category_share)
    data = generate(cfg)
    rows = impression_rows(data)
    train, holdout = holdout_split(rows, args.holdout, args.protocol)
    cutoff = holdout["event_time"].min()  # items published before the holdout are indexed
    queries = holdout_queries(train, holdout)
    metrics, _ = evaluate_retrieval(
        {"ground truth": oracle_recommender(data, cfg, cutoff.to_pydatetime().astimezone(UTC)),
         "popularity": popularity_recommender(train)}, queries, KS, chunk_users=256)
    print(f"{len(rows):,} impressions, {len(queries.users):,} holdout users "
          f"({args.protocol} holdout, last {args.holdout:.0%})\n")
    print("| list | Recall@10 | Recall@50 | Recall@100 | NDCG@10 |")
    print("|---|---|---|---|---|")
    for name in ("ground truth", "popularity"):
        print(f"| {name} | {metrics[f'{name}/recall@10']:.4f} | "
              f"{metrics[f'{name}/recall@50']:.4f} | {metrics[f'{name}/recall@100']:.4f} | "
              f"{metrics[f'{name}/ndcg@10']:.4f} |")
    ratio = metrics["ground truth/recall@50"] / metrics["popularity/recall@50"]
    print(f"\nceiling: ground truth recall@50 = {ratio:.2f} x popularity")


if __name__ == "__main__":
    main()
