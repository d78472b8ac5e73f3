"""Early-stopping validation: retrieval Recall@K on a time split of the TRAINING rows.

The validation split is the last ``fraction`` of the training period (never the holdout):
the model trains on the rows before it and is scored each epoch on the users who engage in
it, exactly like the holdout protocol (query = the user's state at their first validation
row, history built point in time, items engaged before excluded, candidates = the catalog).
The arrays are small and plain numpy, so every Ray Train worker scores the same set and takes
the same stop decision without communicating.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from recsys_models.data import (
    Batch,
    EncoderSpec,
    encode_items,
    encode_rows,
    encode_users,
    time_cutoff,
)
from recsys_models.ranker import Ranker
from recsys_models.two_tower import TwoTowerModel, embed_item_batch


@dataclass(frozen=True)
class ValidationSet:
    """Encoded validation queries and the catalog they are scored against."""

    users: Batch  # encode_users output, one row per validation user
    relevant: list[np.ndarray]  # catalog positions engaged in the validation period, per user
    exclude: list[np.ndarray]  # catalog positions engaged before it, per user
    items: Batch  # encode_items of the catalog
    k: int = 50
    # encode_rows of the validation period's impressions (labels included; items unknown to
    # training with id 0, as serving encodes them): the ranker's early stopping reads its AUC.
    # None when they do not hold both a click and a non-click.
    impressions: Batch | None = None

    @property
    def size(self) -> int:
        return len(self.relevant)


def split_for_validation(rows: pd.DataFrame, fraction: float
                         ) -> tuple[pd.DataFrame, pd.DataFrame, pd.Timestamp]:
    """(fit rows, validation rows, cutoff): the last ``fraction`` of the time range validates."""
    cutoff = time_cutoff(rows["event_time"], fraction)
    times = pd.to_datetime(rows["event_time"], utc=True)
    return rows[times < cutoff], rows[times >= cutoff], cutoff


def build_validation(fit_rows: pd.DataFrame, val_rows: pd.DataFrame, catalog: pd.DataFrame,
                     spec: EncoderSpec, known_items: set[str], k: int = 50,
                     max_users: int = 2000, seed: int = 7,
                     max_impressions: int = 50_000) -> ValidationSet | None:
    """Validation queries from rows split by time (``user_history`` already point in time),
    and up to ``max_impressions`` of the validation rows for the ranker.

    Returns None when no user engages on both sides of the split.
    """
    engaged_fit = fit_rows[fit_rows["clicked"] == 1]
    engaged_val = val_rows[val_rows["clicked"] == 1]
    items = catalog.drop_duplicates("item_id").reset_index(drop=True)
    position = pd.Series(np.arange(len(items)), index=items["item_id"].astype(str))
    relevant = engaged_val.groupby("user_id")["item_id"].agg(
        lambda s: position.reindex(s.astype(str)).dropna().to_numpy(np.int64))
    relevant = relevant[relevant.map(len) > 0]
    warm = relevant.index.intersection(pd.Index(engaged_fit["user_id"].unique()))
    if len(warm) == 0:
        return None
    if len(warm) > max_users:
        warm = pd.Index(np.random.default_rng(seed).choice(warm.to_numpy(), max_users,
                                                           replace=False))
    first = val_rows.sort_values("event_time", kind="stable").drop_duplicates("user_id")
    users = first[first["user_id"].isin(warm)].reset_index(drop=True)
    seen = engaged_fit.groupby("user_id")["item_id"].agg(
        lambda s: position.reindex(s.astype(str)).dropna().to_numpy(np.int64))
    known = items["item_id"].isin(known_items).to_numpy()
    return ValidationSet(
        users=encode_users(users, spec),
        relevant=[relevant[u] for u in users["user_id"]],
        exclude=[seen.get(u, np.zeros(0, np.int64)) for u in users["user_id"]],
        items=encode_items(items, spec, known=known), k=k,
        impressions=_impressions(val_rows, spec, known_items, max_impressions, seed))


def _impressions(val_rows: pd.DataFrame, spec: EncoderSpec, known_items: set[str],
                 max_rows: int, seed: int) -> Batch | None:
    labels = pd.to_numeric(val_rows["clicked"], errors="coerce").fillna(0)
    if labels.nunique() < 2:
        return None
    rows = val_rows
    if len(rows) > max_rows:
        rows = rows.sample(max_rows, random_state=seed)
    batch = encode_rows(rows.reset_index(drop=True), spec)
    known = rows["item_id"].astype(str).isin(known_items).to_numpy()
    batch["item_hash"] = np.where(known, batch["item_hash"], 0)
    return batch


@torch.no_grad()
def ranker_validation_auc(ranker: Ranker, two_tower: TwoTowerModel,
                          val: ValidationSet | None) -> float | None:
    """The ranker's click AUC on the validation impressions (None without them); both
    models' training modes are restored after."""
    if val is None or val.impressions is None:
        return None
    from sklearn.metrics import roc_auc_score

    modes = two_tower.training, ranker.training
    two_tower.eval()
    ranker.eval()
    batch = val.impressions
    probs = []
    try:
        for start in range(0, len(batch["item_hash"]), 8192):
            t = {k: torch.as_tensor(batch[k][start:start + 8192]) for k in (
                "user_hash", "history", "user_num", "item_hash", "category", "creator",
                "tags", "item_dense")}
            t["user_num"], t["item_dense"] = t["user_num"].float(), t["item_dense"].float()
            u = two_tower.user_tower(t["user_hash"], t["history"], t["user_num"])
            v = two_tower.item_tower(t["item_hash"], t["category"], t["creator"], t["tags"],
                                     t["item_dense"])
            click_logit, _ = ranker({**t, "retrieval_score": (u * v).sum(1)})
            probs.append(torch.sigmoid(click_logit).numpy())
    finally:
        two_tower.train(modes[0])
        ranker.train(modes[1])
    return float(roc_auc_score(batch["clicked"] > 0, np.concatenate(probs)))


RECALL_CELLS = 1 << 25  # user x item scores at once in validation_recall


@torch.no_grad()
def validation_recall(model: TwoTowerModel, val: ValidationSet) -> float:
    """Mean Recall@k of exact search over the catalog (training mode restored after)."""
    was_training = model.training
    model.eval()
    try:
        items = embed_item_batch(model.item_tower, val.items)  # (N, dim)
        t = {k: torch.as_tensor(v) for k, v in val.users.items()}
        users = model.user_tower(t["user_hash"], t["history"], t["user_num"].float()).numpy()
    finally:
        model.train(was_training)
    k = min(val.k, len(items))
    recalls = []
    # Users per chunk: at most RECALL_CELLS scores (a 1M-item catalog: 33 users, ~0.4 GB with
    # argpartition's int64 indices; 512 users were 8 GB in the training worker).
    chunk = max(1, min(512, RECALL_CELLS // max(len(items), 1)))
    for start in range(0, len(users), chunk):
        scores = users[start:start + chunk] @ items.T  # (b, N)
        for row, i in enumerate(range(start, min(start + chunk, len(users)))):
            scores[row, val.exclude[i]] = -np.inf
        top = np.argpartition(scores, scores.shape[1] - k, axis=1)[:, -k:]  # (b, k), unordered
        for row, i in enumerate(range(start, min(start + chunk, len(users)))):
            rel = val.relevant[i]
            recalls.append(np.isin(rel, top[row]).sum() / len(rel))
    return float(np.mean(recalls)) if recalls else 0.0


BLEND_GRID: tuple[float, ...] = (0.0, 0.3, 1.0, 3.0, 10.0, 1e6)  # 1e6: retrieval order
# The neighbour score is scaled per history to 0 .. 1: a wide log grid, so that it can be a
# tie-breaker of retrieval order (retrieval weight 1e6) as well as the main term; around 1e6
# (retrieval and neighbours alone, the heads negligible) half-decade steps, where MovieLens's
# validation lands.
NEIGHBOUR_GRID: tuple[float, ...] = (0.0, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 1e3,
                                     1e4, 1e5, 3e5, 1e6, 3e6, 1e7)


@dataclass(frozen=True)
class BlendChoice:
    """The tuned weights of the final score, with the validation scores behind them."""

    retrieval_weight: float
    neighbour_weight: float
    click_logit: bool
    # (retrieval weight, neighbour weight, click logit) -> mean of Recall@10 and Recall@50
    scores: dict[tuple[float, float, bool], float]
    users: int


def tune_blend(bundle: Any, fit_rows: pd.DataFrame, val_rows: pd.DataFrame,
               candidates: int = 500, grid: tuple[float, ...] = BLEND_GRID,
               neighbour_grid: tuple[float, ...] = NEIGHBOUR_GRID,
               click_scales: tuple[bool, ...] = (False, True),
               max_users: int = 1000, seed: int = 7) -> BlendChoice | None:
    """Chooses ``bundle.blend``'s retrieval and neighbour weights and the click head's scale
    on a validation split (never the holdout).

    The final list (retrieval of ``candidates`` items, ranked by the blend) is scored on the
    validation users (queried as the holdout is: at their first validation row, items engaged
    before excluded) for each of ``grid`` x ``neighbour_grid`` x ``click_scales`` (the click
    head as a probability, False, or as log-odds, True; the neighbour grid is only 0 when the
    bundle has no neighbour table); the best mean of Recall@10 and Recall@50 wins and is set
    on the bundle. The pair (largest retrieval weight, 0) is retrieval order, so on validation
    the final list is never worse than retrieval alone. Ties go to the larger retrieval
    weight, then the smaller neighbour weight, then the probability.

    Args:
        bundle: A :class:`~recsys_models.bundle.Bundle` trained on ``fit_rows`` only (its
            neighbour table too).
        fit_rows: ``user_id, item_id, clicked`` of the rows the models trained on.
        val_rows: The validation rows (after ``fit_rows`` in time), with point-in-time
            ``user_history``.

    Returns:
        The choice, or None (blend unchanged) when no validation user has a relevant item.
    """
    from dataclasses import replace

    from recsys_models.evaluate import holdout_queries

    engaged = fit_rows.loc[fit_rows["clicked"] == 1, "user_id"].unique()
    queries = holdout_queries(fit_rows, val_rows[val_rows["user_id"].isin(engaged)])
    users = queries.users
    if users.empty:
        return None
    keep = np.arange(len(users))
    if len(users) > max_users:
        keep = np.sort(np.random.default_rng(seed).choice(len(users), max_users, replace=False))
        users = users.iloc[keep].reset_index(drop=True)
    relevant = [queries.relevant[i] for i in keep]
    ranked = bundle.rank_candidates(users, candidates, queries.exclude)
    query = ranked["query"].to_numpy()
    items = ranked["item_id"].to_numpy()
    p, watch = ranked["p_click"].to_numpy(), ranked["watch_time_ms_pred"].to_numpy()
    retrieval = ranked["retrieval_score"].to_numpy()
    neighbour = ranked["neighbour_score"].to_numpy()
    if getattr(bundle, "neighbours", None) is None:
        neighbour_grid = (0.0,)
    # Per row: is it relevant, and the share of its query's relevant items it is worth.
    hit = np.fromiter((x in relevant[q] for x, q in zip(items, query, strict=True)),
                      dtype=bool, count=len(items))
    worth = hit / np.array([len(r) for r in relevant], dtype=np.float64)[query]
    start = np.searchsorted(query, np.arange(len(users)))  # rank_candidates: query-ordered
    scores: dict[tuple[float, float, bool], float] = {}
    for weight, n_weight, logit in itertools.product(grid, neighbour_grid, click_scales):
        blend = replace(bundle.blend, retrieval_weight=weight, neighbour_weight=n_weight,
                        click_logit=logit)
        order = np.lexsort((-blend.score(p, watch, retrieval, neighbour), query))
        position = np.arange(len(order)) - start[query[order]]
        got = worth[order]
        value = got[position < 10].sum() + got[position < 50].sum()
        scores[(weight, n_weight, logit)] = float(value / (2 * len(relevant)))
    keys = sorted(scores, key=lambda c: (-c[0], c[1], c[2]))
    best = max(keys, key=lambda c: scores[c])
    bundle.blend = replace(bundle.blend, retrieval_weight=best[0], neighbour_weight=best[1],
                           click_logit=best[2])
    return BlendChoice(best[0], best[1], best[2], scores, len(users))
