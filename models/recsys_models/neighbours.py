"""Item-item neighbours: a score of each candidate against the user's recent history.

The final score adds ``neighbour_weight x sum over the user's history items h_j of
decay**j x W[h_j, c]`` for a candidate ``c`` (:class:`~recsys_models.ranker.Blend`), where
``j`` is the item's position in the history (0 = the newest engagement), so recent items weigh
most. ``W`` mixes two closed-form item-item models fitted on the engaged training rows over the
``max_items`` most engaged items:

- EASE (Steck 2019, ``B = -P / diag(P)``, ``P = (X^T X + lambda I)^-1``, X = users x items):
  which items are engaged by the same users, order-blind;
- a *transition* model (a ridge regression in the spirit of SLIT, Choi et al. 2021): from each
  engagement's point-in-time history, recency-weighted as above, to the ``horizon`` items the
  user engages with next (``(H^T H + lambda I)^-1 H^T Y``): what comes next, in order.

Each is scaled by the mean of its rows' largest weight, mixed with ``transition_weight``, and
truncated to each item's ``k`` strongest positive neighbours, so the table's size is bounded by
``max_items x k`` whatever the catalog's size (10,000 x 200 entries by default: ~16 MB).
Rows and columns are the encoded item ids the models read (``history`` and ``item_hash`` of
:mod:`recsys_models.data`), so training, the offline evaluation and serving look it up from
the same encoded inputs; items it does not know (cold start, id 0) score 0.

The history is the sequence serving has online (the user's last ``history_length`` engaged
items), not the user's whole past: on MovieLens's validation split EASE read from that
history and truncated to 50 neighbours per item scores Recall@10 0.102 / Recall@50 0.279,
full EASE over the whole past 0.101 / 0.299; with the recency decay 0.85 and the transition
model mixed in (0.7), 200 neighbours: 0.133 / 0.303 (docs/evaluation.md).

Example:
    >>> neighbours = fit_neighbours(train_rows, spec)
    >>> scores = neighbours.score(batch["history"], batch["item_hash"])  # (n,)
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.linalg
import scipy.sparse as sp

from recsys_core.features import USER_HISTORY
from recsys_models.data import EncoderSpec
from recsys_models.sequences import pit_histories

logger = logging.getLogger(__name__)

FILE = "neighbours.npz"


@dataclass(frozen=True)
class NeighbourConfig:
    """How the neighbour table is fitted."""

    lam: float = 200.0  # EASE's L2 regularization (MovieLens: tuned 200 of 50/200/500)
    k: int = 200  # strongest positive neighbours kept per item
    max_items: int = 10_000  # EASE runs over the most engaged items (dense items^2 inverse)
    # A history's best-scored neighbours join retrieval's candidates (a second candidate
    # source, offline and in serving), at most this many beyond retrieval's own.
    candidates: int = 100
    # Weight of the history's j-th newest item: decay**j (1.0: order-blind, the tables saved
    # before it existed). MovieLens validation, EASE alone: Recall@10 0.102 at 1.0, 0.118 at
    # 0.85, 0.117 at 0.7.
    decay: float = 0.85
    transition_weight: float = 0.7  # share of the transition model in the table (0: EASE only)
    horizon: int = 3  # next engagements each training position of the transition model predicts
    transition_lam: float = 500.0  # its L2 regularization
    max_examples: int = 1_000_000  # training positions of the transition model (sampled above)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ItemNeighbours:
    """``W[history item, candidate]`` as a sparse (buckets, buckets) matrix of encoded ids,
    and the item ids of the fitted items (``item_ids[i]`` is encoded as ``buckets[i]``), so
    that the neighbours of a history can also be candidates (:meth:`top`)."""

    matrix: sp.csr_matrix
    cfg: NeighbourConfig
    item_ids: np.ndarray  # (items,) str
    buckets: np.ndarray  # (items,) int64

    def score(self, history: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Sum of ``W[h, item]`` over each row's history (padding 0 adds nothing), divided by
        the largest such sum over all items for that history, so 1 is the history's best
        neighbour whoever the user is (raw sums grow with the history's length and the
        items' engagement; per-history scaling scored Recall@10 0.115 vs 0.105 raw at the
        same Recall@50 on MovieLens's validation split).

        Args:
            history: (n, H) encoded history ids (0 = padding).
            items: (n,) encoded candidate ids (0 = unknown item).

        Returns:
            (n,) float32.
        """
        history = np.asarray(history, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        out = np.zeros(len(items), np.float32)
        if len(items) == 0 or history.size == 0 or self.matrix.nnz == 0:
            return out
        # One aggregated neighbour vector per distinct history (a request: one for all its
        # candidates), then a sorted lookup of each row's item in it.
        uniques, which = np.unique(history, axis=0, return_inverse=True)
        order = np.argsort(which.reshape(-1), kind="stable")
        bounds = np.searchsorted(which.reshape(-1)[order], np.arange(len(uniques) + 1))
        for u in range(len(uniques)):
            rows = order[bounds[u]:bounds[u + 1]]
            out[rows] = self.score_one(uniques[u], items[rows])
        return out

    def score_one(self, history: np.ndarray, items: np.ndarray) -> np.ndarray:
        """:meth:`score` of one encoded history (H,) against many items (n,): (n,) float32
        (a request: no grouping of rows needed)."""
        items = np.asarray(items, dtype=np.int64)
        out = np.zeros(len(items), np.float32)
        cols, sums = self._aggregate(history)
        if len(cols) == 0 or len(items) == 0 or sums.max() <= 0:
            return out
        sums = sums / sums.max()
        pos = np.minimum(np.searchsorted(cols, items), len(cols) - 1)
        hit = cols[pos] == items
        out[hit] = sums[pos[hit]]
        return out

    def _aggregate(self, history: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The history's summed neighbour weights, each history item's row weighted by
        ``decay**position`` (newest first): sorted candidate ids and their sums."""
        m = self.matrix
        history = np.asarray(history, dtype=np.int64).reshape(-1)
        position = np.flatnonzero((history > 0) & (history < m.shape[0]))
        if len(position) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        rows = history[position]
        weights = recency_weights(position, self.cfg.decay)
        parts = [slice(m.indptr[r], m.indptr[r + 1]) for r in rows.tolist()]
        indices = np.concatenate([m.indices[p] for p in parts])
        data = np.concatenate([m.data[p] * w for p, w in zip(parts, weights.tolist(),
                                                                 strict=True)])
        cols, inverse = np.unique(indices, return_inverse=True)
        return cols.astype(np.int64), np.bincount(inverse, weights=data,
                                                  minlength=len(cols)).astype(np.float32)

    def top(self, history: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` best-scored neighbours of one encoded history (H,): item ids and
        scores, best first (fewer when the history has fewer neighbours)."""
        cols, scores = self._aggregate(history)
        if n <= 0 or len(cols) == 0:
            return np.zeros(0, dtype=object), np.zeros(0, np.float32)
        keep = np.argsort(-scores, kind="stable")[:n]
        keep = keep[scores[keep] > 0]
        lookup = self._by_bucket()
        ids = np.array([lookup.get(int(c)) for c in cols[keep]], dtype=object)
        return ids, scores[keep]

    def _by_bucket(self) -> dict[int, str]:
        cached: dict[int, str] | None = self.__dict__.get("_lookup")
        if cached is None:  # the first item of a bucket wins (hash collisions are rare)
            cached = {}
            for bucket, item in zip(self.buckets.tolist(), self.item_ids.tolist(), strict=True):
                cached.setdefault(int(bucket), str(item))
            object.__setattr__(self, "_lookup", cached)
        return cached

    def save(self, directory: Path) -> None:
        m = self.matrix
        cfg = {f"cfg_{k}": v for k, v in self.cfg.to_dict().items()}
        np.savez(directory / FILE, indptr=m.indptr, indices=m.indices, data=m.data,
                 shape=np.asarray(m.shape), item_ids=self.item_ids.astype(str),
                 buckets=self.buckets, **cfg)

    @staticmethod
    def load(directory: Path) -> ItemNeighbours | None:
        path = directory / FILE
        if not path.is_file():
            return None
        with np.load(path) as f:
            matrix = sp.csr_matrix((f["data"], f["indices"], f["indptr"]),
                                   shape=tuple(int(x) for x in f["shape"]))
            saved = {key[4:]: f[key].item() for key in f.files if key.startswith("cfg_")}
            # Tables saved before the recency decay and the transition model were EASE only,
            # scored order-blind: they keep scoring so.
            cfg = NeighbourConfig(**{**_LEGACY, **saved})
            return ItemNeighbours(matrix, cfg, f["item_ids"].astype(object),
                                  f["buckets"].astype(np.int64))


_LEGACY: dict[str, Any] = {"decay": 1.0, "transition_weight": 0.0}


def recency_weights(position: np.ndarray, decay: float) -> np.ndarray:
    """``decay**position`` (float32): the weight of a history item ``position`` engagements
    back (0 = the newest)."""
    return np.power(np.float32(decay), np.asarray(position, dtype=np.float32))


def ease_weights(matrix: sp.csr_matrix, lam: float) -> np.ndarray:
    """EASE's item-item weights (items, items) float32 with a zero diagonal."""
    gram = (matrix.T @ matrix).toarray().astype(np.float32)
    gram[np.diag_indices_from(gram)] += lam
    weights = scipy.linalg.inv(gram, overwrite_a=True, check_finite=False)  # P, in place
    weights /= -np.diag(weights)[None, :]  # B = -P / diag(P), off the diagonal
    weights[np.diag_indices_from(weights)] = 0.0
    return np.asarray(weights, dtype=np.float32)


def transition_weights(engaged: pd.DataFrame, column: pd.Series, cfg: NeighbourConfig,
                       history_length: int) -> np.ndarray:
    """The transition model's item-item weights (items, items) float32, zero diagonal.

    One example per engagement: its input is the user's point-in-time history (the
    ``user_history`` column when present, else built here; newest first, row ``h_j`` weighted
    ``decay**j``), its target the engaged item and the user's next ``horizon - 1``
    engagements. Ridge regression: ``(H^T H + lambda I)^-1 H^T Y``.

    Args:
        engaged: ``user_id``, ``item_id``, ``event_time`` (and optionally ``user_history``)
            of the engaged training rows.
        column: item id -> column of the fitted items (others are left out).
        cfg: ``decay``, ``horizon``, ``transition_lam``, ``max_examples``.
        history_length: The history length serving reads.
    """
    n = len(column)
    rows = engaged.sort_values(["user_id", "event_time"], kind="stable").reset_index(drop=True)
    if USER_HISTORY in rows.columns:
        histories = rows[USER_HISTORY]
    else:
        histories = pd.Series(pit_histories(rows, np.ones(len(rows), bool), history_length))
    histories = histories.map(lambda h: list(h)[:history_length]
                              if isinstance(h, list | tuple | np.ndarray) else [])
    lengths = histories.map(len).to_numpy()
    keep = np.flatnonzero(lengths > 0)
    if len(keep) > cfg.max_examples:  # bounded memory: a sample of the positions
        keep = np.sort(np.random.default_rng(0).choice(keep, cfg.max_examples, replace=False))
    if len(keep) == 0:
        return np.zeros((n, n), np.float32)
    # Inputs: (examples, items), recency-weighted history.
    sizes = lengths[keep]
    flat = np.concatenate([np.asarray(h, dtype=object) for h in histories.iloc[keep]])
    example = np.repeat(np.arange(len(keep)), sizes)
    position = np.arange(len(flat)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    cols = column.reindex(pd.Index(flat).astype(str)).to_numpy()
    ok = ~np.isnan(cols)
    h = sp.csr_matrix((recency_weights(position[ok], cfg.decay),
                       (example[ok], cols[ok].astype(np.int64))), shape=(len(keep), n))
    # Targets: the row's item and the same user's next engagements.
    users = rows["user_id"].astype(str).to_numpy()
    item_cols = column.reindex(rows["item_id"].astype(str)).to_numpy()
    t_rows, t_cols = [], []
    for ahead in range(max(cfg.horizon, 1)):
        target = keep + ahead
        valid = target < len(rows)
        valid[valid] &= users[target[valid]] == users[keep[valid]]
        valid[valid] &= ~np.isnan(item_cols[target[valid]])
        t_rows.append(np.flatnonzero(valid))
        t_cols.append(item_cols[target[valid]].astype(np.int64))
    y = sp.csr_matrix((np.ones(sum(len(r) for r in t_rows), np.float32),
                       (np.concatenate(t_rows), np.concatenate(t_cols))), shape=(len(keep), n))
    gram = (h.T @ h).toarray().astype(np.float32)
    gram[np.diag_indices_from(gram)] += cfg.transition_lam
    rhs = (h.T @ y).toarray().astype(np.float32)
    weights = scipy.linalg.solve(gram, rhs, assume_a="pos", overwrite_a=True,
                                 overwrite_b=True, check_finite=False)
    weights = np.asarray(weights, dtype=np.float32)
    if not weights.flags.writeable:  # solve may hand back a read-only result
        weights = weights.copy()
    weights[np.diag_indices_from(weights)] = 0.0  # the history's own items are never served
    return weights


def _row_scale(weights: np.ndarray) -> float:
    """Mean over rows of the row's largest weight (1 when there is none)."""
    top = weights.max(axis=1)
    top = top[top > 0]
    return float(top.mean()) if len(top) else 1.0


def fit_neighbours(rows: pd.DataFrame, spec: EncoderSpec,
                   cfg: NeighbourConfig | None = None) -> ItemNeighbours:
    """EASE on the engaged rows (``clicked == 1``), mixed with the transition model when
    ``cfg.transition_weight > 0``, truncated to ``cfg.k`` neighbours per item.

    Args:
        rows: ``user_id``, ``item_id``, ``clicked`` (training rows only: never the holdout);
            the transition model also reads ``event_time`` (and ``user_history`` when
            present; row order stands in for time without ``event_time``).
        spec: The encoder spec whose ``item_buckets`` the models use.
        cfg: Regularization, neighbours per item, item cap, recency and transition settings.
    """
    cfg = cfg or NeighbourConfig()
    buckets = spec.item_buckets
    mask = pd.to_numeric(rows["clicked"], errors="coerce").fillna(0).to_numpy() > 0
    engaged = rows.loc[mask].copy()
    engaged["user_id"] = engaged["user_id"].astype(str)
    engaged["item_id"] = engaged["item_id"].astype(str)
    if "event_time" not in engaged.columns:
        engaged["event_time"] = np.arange(len(engaged))
    counts = engaged["item_id"].value_counts()
    items = counts.index[: cfg.max_items].to_numpy()
    empty = ItemNeighbours(sp.csr_matrix((buckets, buckets), dtype=np.float32), cfg,
                           np.zeros(0, dtype=object), np.zeros(0, np.int64))
    if len(items) < 2:
        return empty
    column = pd.Series(np.arange(len(items)), index=items)
    known = engaged[engaged["item_id"].isin(column.index)]
    users = pd.factorize(known["user_id"])[0]
    x = sp.csr_matrix((np.ones(len(known), np.float32),
                       (users, column.reindex(known["item_id"]).to_numpy())),
                      shape=(int(users.max()) + 1, len(items)))
    x.data[:] = 1.0  # repeated engagements count once
    weights = ease_weights(x, cfg.lam)
    if cfg.transition_weight > 0:
        weights *= (1.0 - cfg.transition_weight) / _row_scale(weights)
        transition = transition_weights(engaged, column, cfg, spec.history_length)
        weights += transition * np.float32(cfg.transition_weight / _row_scale(transition))
        del transition
    k = min(cfg.k, len(items) - 1)
    ids = spec.item_codes.encode(items)
    src, dst, val = [], [], []
    for start in range(0, len(items), 1024):  # bounded argpartition memory
        block = weights[start:start + 1024]
        top = np.argpartition(-block, k - 1, axis=1)[:, :k]  # (b, k)
        w = np.take_along_axis(block, top, axis=1)
        keep = w > 0
        src.append(np.repeat(ids[start:start + len(block)], k).reshape(-1, k)[keep])
        dst.append(ids[top][keep])
        val.append(w[keep])
    matrix = sp.csr_matrix((np.concatenate(val), (np.concatenate(src), np.concatenate(dst))),
                           shape=(buckets, buckets), dtype=np.float32)
    matrix.sum_duplicates()  # hash collisions add up
    matrix.sort_indices()
    logger.info("item neighbours: %d items, %d entries (lambda %g, k %d, transition %g)",
                len(items), matrix.nnz, cfg.lam, k, cfg.transition_weight)
    return ItemNeighbours(matrix, cfg, items.astype(object), ids)
