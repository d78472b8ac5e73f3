"""Evaluation in chunks of users gives the numbers of the direct, all-at-once computation."""

from __future__ import annotations

import numpy as np
import pandas as pd

from recsys_models.ann import HnswIndex, exact_search, recall_vs_exact
from recsys_models.evaluate import (
    HoldoutQueries,
    evaluate_retrieval,
    holdout_split,
    popularity_recommender,
    sample_users,
)


def _direct_top(embeddings: np.ndarray, queries: np.ndarray, n: int) -> np.ndarray:
    scores = queries.astype(np.float64) @ embeddings.astype(np.float64).T
    return np.argsort(-scores, axis=1, kind="stable")[:, :n]


def test_exact_search_in_chunks_equals_a_full_sort() -> None:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(500, 8)).astype(np.float32)
    queries = rng.normal(size=(37, 8)).astype(np.float32)
    chunked = exact_search(emb, queries, 20, chunk=5)
    assert chunked.shape == (37, 20) and chunked.dtype == np.int64
    np.testing.assert_array_equal(chunked, _direct_top(emb, queries, 20))
    np.testing.assert_array_equal(exact_search(emb, queries, 20, chunk=1000), chunked)


def test_recall_vs_exact_does_not_depend_on_the_chunk() -> None:
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(400, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    index = HnswIndex.build(np.array([f"i{i}" for i in range(400)]), emb)
    queries = emb[:50]
    labels, _ = index.index.knn_query(queries, k=30)
    exact = _direct_top(emb, queries, 30)
    direct = np.mean([len(set(a) & set(b)) / 30 for a, b in zip(labels, exact, strict=True)])
    for chunk in (1, 7, 50, 1000):
        assert recall_vs_exact(index, emb, queries, 30, chunk=chunk) == direct


def _direct_metrics(recs: np.ndarray, relevant: list[set[str]], k: int) -> tuple[float, float]:
    recalls, ndcgs = [], []
    for row, rel in zip(recs, relevant, strict=True):
        gains = [1.0 / np.log2(i + 2) for i, x in enumerate(row[:k]) if x in rel]
        recalls.append(sum(x in rel for x in row[:k]) / len(rel))
        ndcgs.append(sum(gains) / sum(1.0 / np.log2(i + 2) for i in range(min(len(rel), k))))
    return float(np.mean(recalls)), float(np.mean(ndcgs))


def test_evaluate_retrieval_in_chunks_equals_the_direct_metrics() -> None:
    rng = np.random.default_rng(2)
    items = [f"i{i}" for i in range(30)]
    train = pd.DataFrame({"user_id": [f"u{u}" for u in rng.integers(0, 40, 600)],
                          "item_id": rng.choice(items, 600, p=np.linspace(2, 0.1, 30) / 31.5),
                          "clicked": 1})
    users = pd.DataFrame({"user_id": [f"u{u}" for u in range(40)]})
    relevant = [set(rng.choice(items, rng.integers(1, 5))) for _ in range(40)]
    exclude = {u: set(train.loc[train["user_id"] == u, "item_id"]) for u in users["user_id"]}
    queries = HoldoutQueries(users, relevant, exclude)
    recommend = popularity_recommender(train)
    recs = recommend(users, 10, exclude)
    recall, ndcg = _direct_metrics(recs, relevant, 10)
    for chunk in (1, 3, 64):
        metrics, curves = evaluate_retrieval({"pop": recommend}, queries, (5, 10), chunk)
        assert abs(metrics["pop/recall@10"] - recall) < 1e-12
        assert abs(metrics["pop/ndcg@10"] - ndcg) < 1e-12
        assert abs(curves["pop"][9] - recall) < 1e-12


def test_per_user_holdout_is_each_users_last_rows() -> None:
    frame = pd.DataFrame({"user_id": ["a"] * 5 + ["b"] * 2 + ["c"],
                          "event_time": pd.to_datetime(
                              ["2020-01-01", "2020-01-02", "2020-01-03", "2020-01-04",
                               "2020-01-05", "2021-01-01", "2021-01-02", "2019-01-01"], utc=True)})
    before, after = holdout_split(frame, 0.2, "per-user")
    # a's last of 5; b (ceil(2 * 0.8) = 2) and c keep all their rows, as bench_movielens splits
    assert after.index.tolist() == [4]
    before, after = holdout_split(frame, 0.25, "global")
    assert set(after["user_id"]) == {"b"}


def test_max_users_keeps_whole_users_and_the_same_ones_in_any_row_order() -> None:
    rng = np.random.default_rng(3)
    holdout = pd.DataFrame({"user_id": [f"u{i}" for i in rng.integers(0, 50, 400)],
                            "item_id": [f"i{i}" for i in rng.integers(0, 30, 400)]})
    part = sample_users(holdout, 10)
    assert part["user_id"].nunique() == 10
    for user, rows in part.groupby("user_id"):  # every row of a kept user
        assert len(rows) == (holdout["user_id"] == user).sum()
    shuffled = sample_users(holdout.sample(frac=1.0, random_state=0), 10)
    assert set(shuffled["user_id"]) == set(part["user_id"])
    assert sample_users(holdout, None) is holdout
    assert len(sample_users(holdout, 50)) == len(holdout)
