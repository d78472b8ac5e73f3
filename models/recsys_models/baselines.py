"""Baselines every model is judged against, through the same :class:`Recommender` interface.

- popularity: most-engaged training items (:func:`~recsys_models.evaluate.popularity_recommender`);
- EASE (Steck 2019): closed-form item-item model, ``B = I - P / diag(P)`` with
  ``P = (X^T X + lambda I)^-1``, numpy only;
- implicit ALS (``implicit``, when installed; it is a dev dependency).

Each is fitted on engaged training rows (``clicked == 1``) over the items seen in training, and
:func:`tune` picks its few parameters on a validation split of the training side (never the
holdout), with the same metric code as the model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from recsys_models.evaluate import (
    HoldoutQueries,
    Recommender,
    evaluate_retrieval,
    popularity_recommender,
)

logger = logging.getLogger(__name__)

EASE_LAMBDAS: tuple[float, ...] = (50.0, 200.0, 500.0)
ALS_GRID: tuple[tuple[int, float, float], ...] = tuple(
    (f, r, a) for f in (32, 64, 128) for r in (0.01, 0.1) for a in (1.0, 10.0))
EASE_MAX_ITEMS = 20_000  # a dense item x item inverse; bigger catalogs keep the most engaged


@dataclass(frozen=True)
class _Interactions:
    matrix: sp.csr_matrix  # (users, items) binary engagements
    users: dict[str, int]
    items: np.ndarray  # item ids, column order


def _interactions(train: pd.DataFrame, max_items: int | None = None) -> _Interactions:
    pos = train[train["clicked"] == 1]
    counts = pos["item_id"].value_counts()
    items = counts.index.to_numpy() if max_items is None else counts.index[:max_items].to_numpy()
    column = pd.Series(np.arange(len(items)), index=items)
    pos = pos[pos["item_id"].isin(column.index)]
    users = {u: i for i, u in enumerate(pos["user_id"].unique())}
    matrix = sp.csr_matrix(
        (np.ones(len(pos), np.float32), (pos["user_id"].map(users), pos["item_id"].map(column))),
        shape=(len(users), len(items)))
    matrix.data[:] = 1.0  # repeated engagements count once
    return _Interactions(matrix, users, items)


def _top_k(scores: np.ndarray, items: np.ndarray, k: int, exclude: set[str],
           column: dict[str, int]) -> list[Any]:
    scores = scores.copy()
    for item in exclude:
        col = column.get(item)
        if col is not None:
            scores[col] = -np.inf
    k = min(k, len(scores))
    top = np.argpartition(-scores, k - 1)[:k]
    top = top[np.argsort(-scores[top], kind="stable")]
    return [items[i] for i in top if np.isfinite(scores[i])]


def _scored_recommender(data: _Interactions, score: Callable[[int], np.ndarray],
                        train: pd.DataFrame) -> Recommender:
    """Users known to the model get its top-k; others get popularity."""
    fallback = popularity_recommender(train)
    column = {item: i for i, item in enumerate(data.items)}

    def recommend(users: pd.DataFrame, k: int, exclude: dict[str, set[str]]) -> np.ndarray:
        out = fallback(users, k, exclude)
        for row, uid in enumerate(users["user_id"]):
            if uid in data.users:
                top = _top_k(score(data.users[uid]), data.items, k, exclude.get(uid, set()),
                             column)
                out[row] = top + [None] * (k - len(top))
        return out

    return recommend


def ease_recommender(train: pd.DataFrame, lam: float = 200.0) -> Recommender:
    """EASE fitted on the engaged training rows (a dense item x item weight matrix)."""
    data = _interactions(train, EASE_MAX_ITEMS)
    gram = (data.matrix.T @ data.matrix).toarray().astype(np.float64)
    gram[np.diag_indices_from(gram)] += lam
    inverse = np.linalg.inv(gram)
    weights = (-inverse / np.diag(inverse)[None, :]).astype(np.float32)
    weights[np.diag_indices_from(weights)] = 0.0
    x = data.matrix

    def score(user: int) -> np.ndarray:
        return np.asarray(x[user] @ weights).ravel()

    return _scored_recommender(data, score, train)


def als_recommender(train: pd.DataFrame, factors: int = 64, reg: float = 0.01,
                    alpha: float = 1.0, iterations: int = 15) -> Recommender:
    """implicit's ALS on the engaged training rows (confidence ``alpha`` per engagement)."""
    from implicit.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    data = _interactions(train)
    model = AlternatingLeastSquares(factors=factors, regularization=reg, iterations=iterations,
                                    random_state=7)
    with threadpool_limits(1, "blas"):
        model.fit((data.matrix * alpha).tocsr(), show_progress=False)
    user_factors = np.asarray(model.user_factors)
    item_factors = np.asarray(model.item_factors)

    def score(user: int) -> np.ndarray:
        return item_factors @ user_factors[user]

    return _scored_recommender(data, score, train)


@dataclass(frozen=True)
class Tuned:
    """A baseline's chosen parameters and its validation score."""

    name: str
    params: tuple[Any, ...]
    validation: float


def tune(name: str, fit: Callable[..., Recommender], grid: Sequence[tuple[Any, ...]],
         fit_rows: pd.DataFrame, validation: HoldoutQueries, metric: str = "recall@50"
         ) -> Tuned:
    """The grid point with the best validation ``metric`` (fit on ``fit_rows`` only)."""
    k = int(metric.split("@")[1])
    best: Tuned | None = None
    for params in grid:
        m, _ = evaluate_retrieval({name: fit(fit_rows, *params)}, validation, (k,))
        score = m[f"{name}/{metric}"]
        logger.info("tune %s %s: %s %.4f", name, params, metric, score)
        if best is None or score > best.validation:
            best = Tuned(name, tuple(params), score)
    assert best is not None, "empty grid"
    return best


def has_implicit() -> bool:
    try:
        import implicit  # noqa: F401
    except ImportError:
        return False
    return True
