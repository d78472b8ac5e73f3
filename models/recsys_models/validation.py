"""Early-stopping validation: retrieval Recall@K on a time split of the TRAINING rows.

The validation split is the last ``fraction`` of the training period (never the holdout):
the model trains on the rows before it and is scored each epoch on the users who engage in
it, exactly like the holdout protocol (query = the user's state at their first validation
row, history built point in time, items engaged before excluded, candidates = the catalog).
The arrays are small and plain numpy, so every Ray Train worker scores the same set and takes
the same stop decision without communicating.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from recsys_models.data import Batch, EncoderSpec, encode_items, encode_users, time_cutoff
from recsys_models.two_tower import TwoTowerModel, embed_item_batch


@dataclass(frozen=True)
class ValidationSet:
    """Encoded validation queries and the catalog they are scored against."""

    users: Batch  # encode_users output, one row per validation user
    relevant: list[np.ndarray]  # catalog positions engaged in the validation period, per user
    exclude: list[np.ndarray]  # catalog positions engaged before it, per user
    items: Batch  # encode_items of the catalog
    k: int = 50

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
                     max_users: int = 2000, seed: int = 7) -> ValidationSet | None:
    """Validation queries from rows split by time (``user_history`` already point in time).

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
        items=encode_items(items, spec, known=known), k=k)


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
    for start in range(0, len(users), 512):
        scores = users[start:start + 512] @ items.T  # (b, N)
        for row, i in enumerate(range(start, min(start + 512, len(users)))):
            scores[row, val.exclude[i]] = -np.inf
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        for row, i in enumerate(range(start, min(start + 512, len(users)))):
            rel = val.relevant[i]
            recalls.append(np.isin(rel, top[row]).sum() / len(rel))
    return float(np.mean(recalls)) if recalls else 0.0
