"""Baselines every model is judged against, through the same :class:`Recommender` interface.

- popularity: most-engaged training items (:func:`~recsys_models.evaluate.popularity_recommender`);
- EASE (Steck 2019): closed-form item-item model, ``B = I - P / diag(P)`` with
  ``P = (X^T X + lambda I)^-1``, numpy only. Its weights are a dense items x items matrix, so it
  is fitted on the ``max_items`` most engaged items (the rest are never recommended by it) and
  the restriction is recorded;
- implicit ALS (``implicit``, a runtime dependency: the reference implementation people compare
  against, a binary wheel, and 10-100x faster than a numpy loop).

Each is fitted on engaged training rows (``clicked == 1``) over the items seen in training, and
:func:`tune` picks its few parameters on a validation split of the training side (never the
holdout), with the same metric code as the model. :func:`tuned_baselines` does all of it.
Users are scored in chunks (a (chunk, items) float32 matrix at a time).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from recsys_models.evaluate import (
    HoldoutQueries,
    Recommender,
    evaluate_retrieval,
    holdout_queries,
    holdout_split,
    popularity_recommender,
)
from recsys_models.neighbours import ease_weights

logger = logging.getLogger(__name__)

EASE_LAMBDAS: tuple[float, ...] = (50.0, 200.0, 500.0)
ALS_GRID: tuple[tuple[int, float, float], ...] = tuple(
    (f, r, a) for f in (32, 64, 128) for r in (0.01, 0.1) for a in (1.0, 10.0))
# The grid run inside every `recsys train` / `recsys evaluate` (the benchmark runs ALS_GRID).
ALS_QUICK_GRID: tuple[tuple[int, float, float], ...] = tuple(
    (f, 0.01, a) for f in (32, 64) for a in (1.0, 10.0))
EASE_MAX_ITEMS = 10_000  # a dense items^2 float32 inverse: 0.4 GB and ~20 s at 10k items
TUNE_USERS = 2_000  # validation users the grids are scored on
SCORE_CELLS = 1 << 24  # users x items scored at once (64 MB float32 + 128 MB argpartition)


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


def _scored_recommender(data: _Interactions, score: Callable[[np.ndarray], np.ndarray],
                        train: pd.DataFrame) -> Recommender:
    """Users known to the model get its top-k (scored :data:`SCORE_CELLS` / items users at a
    time: ``score(user rows) -> (n, items)``); others get popularity."""
    fallback = popularity_recommender(train)
    column = {item: i for i, item in enumerate(data.items)}

    def recommend(users: pd.DataFrame, k: int, exclude: dict[str, set[str]]) -> np.ndarray:
        out = fallback(users, k, exclude)
        uids = users["user_id"].tolist()
        known = [i for i, u in enumerate(uids) if u in data.users]
        kk = min(k, len(data.items))
        chunk = max(1, SCORE_CELLS // max(len(data.items), 1))
        for start in range(0, len(known), chunk):
            rows = known[start:start + chunk]
            scores = score(np.array([data.users[uids[r]] for r in rows]))  # (n, items)
            for j, r in enumerate(rows):
                seen = [column[i] for i in exclude.get(uids[r], ()) if i in column]
                scores[j, seen] = -np.inf
            if kk == 0:
                continue
            top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
            order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
            top = np.take_along_axis(top, order, axis=1)
            for j, r in enumerate(rows):
                ok = np.isfinite(scores[j, top[j]])
                picked = list(data.items[top[j][ok]])
                out[r] = picked + [None] * (k - len(picked))
        return out

    return recommend


def ease_recommender(train: pd.DataFrame, lam: float = 200.0,
                     max_items: int = EASE_MAX_ITEMS) -> Recommender:
    """EASE fitted on the engaged training rows over the ``max_items`` most engaged items."""
    data = _interactions(train, max_items)
    weights = ease_weights(data.matrix, lam)
    x = data.matrix

    def score(rows: np.ndarray) -> np.ndarray:
        return np.asarray(x[rows] @ weights, dtype=np.float32)

    return _scored_recommender(data, score, train)


def als_recommender(train: pd.DataFrame, factors: int = 64, reg: float = 0.01,
                    alpha: float = 1.0, iterations: int = 15) -> Recommender:
    """implicit's ALS on the engaged training rows (confidence ``alpha`` per engagement)."""
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    data = _interactions(train)
    with threadpool_limits(1, "blas"):  # implicit checks (and warns about) BLAS threads
        # one thread: implicit's multi-threaded updates are not reproducible for a seed
        model = AlternatingLeastSquares(factors=factors, regularization=reg,
                                        iterations=iterations, random_state=7, num_threads=1)
        model.fit((data.matrix * alpha).tocsr(), show_progress=False)
    user_factors = np.asarray(model.user_factors, dtype=np.float32)
    item_factors = np.asarray(model.item_factors, dtype=np.float32)

    def score(rows: np.ndarray) -> np.ndarray:
        return user_factors[rows] @ item_factors.T

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


@dataclass
class Baselines:
    """Tuned baselines fitted on the whole training side, ready for
    :func:`~recsys_models.evaluate.evaluate_bundle`'s ``extra``; ``info`` holds the chosen
    parameters, validation scores and skip reasons (``baseline/*`` params of the run)."""

    recommenders: dict[str, Recommender] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def _sample(queries: HoldoutQueries, n: int, seed: int = 7) -> HoldoutQueries:
    if len(queries.users) <= n:
        return queries
    pick = np.sort(np.random.default_rng(seed).choice(len(queries.users), n, replace=False))
    users = queries.users.iloc[pick].reset_index(drop=True)
    return HoldoutQueries(users, [queries.relevant[i] for i in pick],
                          {u: queries.exclude[u] for u in users["user_id"]})


def tuned_baselines(train: pd.DataFrame, *, protocol: str = "global",
                    validation_fraction: float = 0.1, ease_max_items: int = EASE_MAX_ITEMS,
                    als_grid: Sequence[tuple[int, float, float]] = ALS_QUICK_GRID,
                    ease_lambdas: Sequence[float] = EASE_LAMBDAS) -> Baselines:
    """EASE and ALS tuned on a validation split of ``train`` (its last
    ``validation_fraction``, by the holdout's own ``protocol``), then refitted on all of it.

    Args:
        train: Training rows (``user_id``, ``item_id``, ``event_time``, ``clicked``).
        protocol: ``global`` (time quantile) or ``per-user`` (each user's last rows).
        validation_fraction: Share of the training side that validates.
        ease_max_items: EASE is fitted on this many most-engaged items (recorded when the
            training side has more).
        als_grid: ``(factors, regularization, alpha)`` points.
        ease_lambdas: EASE's L2 regularization grid.
    """
    out = Baselines()
    fit_rows, val_rows = holdout_split(train, validation_fraction, protocol)
    liked = set(fit_rows.loc[fit_rows["clicked"] == 1, "user_id"])
    val_q = _sample(holdout_queries(fit_rows, val_rows[val_rows["user_id"].isin(liked)]),
                    TUNE_USERS)
    items = int(train.loc[train["clicked"] == 1, "item_id"].nunique())
    out.info["baseline/validation_users"] = len(val_q.users)
    if len(val_q.users) == 0:
        out.info["baseline/skipped"] = "no user engages on both sides of the validation split"
        return out
    ease = tune("ease", ease_recommender,
                [(lam, ease_max_items) for lam in ease_lambdas], fit_rows, val_q)
    out.info |= {"baseline/ease_lambda": ease.params[0],
                 "baseline/ease_validation_recall_at_50": round(ease.validation, 6),
                 "baseline/ease_items": min(items, ease_max_items)}
    if items > ease_max_items:
        out.info["baseline/ease_note"] = (f"fitted on the {ease_max_items:,} most engaged of "
                                          f"{items:,} items (evaluation.ease_max_items)")
    als = tune("als", als_recommender, als_grid, fit_rows, val_q)
    out.info |= {"baseline/als_factors": als.params[0], "baseline/als_reg": als.params[1],
                 "baseline/als_alpha": als.params[2],
                 "baseline/als_validation_recall_at_50": round(als.validation, 6)}
    out.recommenders["als"] = als_recommender(train, *als.params)
    out.recommenders["ease"] = ease_recommender(train, ease.params[0], ease_max_items)
    return out


def has_implicit() -> bool:
    """Kept for callers written when ``implicit`` was optional; it is a dependency now."""
    try:
        import implicit  # noqa: F401
    except ImportError:
        return False
    return True
