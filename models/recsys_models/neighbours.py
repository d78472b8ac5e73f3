"""Item-item neighbours: an EASE score of each candidate against the user's history.

The final score adds ``neighbour_weight x sum over the user's history items h of W[h, c]``
for a candidate ``c`` (:class:`~recsys_models.ranker.Blend`). ``W`` is EASE (Steck 2019,
``B = -P / diag(P)``, ``P = (X^T X + lambda I)^-1``) fitted on the engaged training rows over
the ``max_items`` most engaged items, truncated to each item's ``k`` strongest positive
neighbours, so its size is bounded by ``max_items x k`` whatever the catalog's size (10,000 x
50 entries by default: ~6 MB). Rows and columns are the encoded item ids the models read
(``history`` and ``item_hash`` of :mod:`recsys_models.data`), so training, the offline
evaluation and serving look it up from the same encoded inputs; items it does not know (cold
start, id 0) score 0.

The history is the sequence serving has online (the user's last ``history_length`` engaged
items), not the user's whole past: on MovieLens's validation split EASE read from that
history and truncated to 50 neighbours per item scores Recall@10 0.102 / Recall@50 0.279,
full EASE over the whole past 0.101 / 0.299 (docs/evaluation.md).

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

from recsys_models.data import EncoderSpec

logger = logging.getLogger(__name__)

FILE = "neighbours.npz"


@dataclass(frozen=True)
class NeighbourConfig:
    """How the neighbour table is fitted."""

    lam: float = 200.0  # EASE's L2 regularization (MovieLens: tuned 200 of 50/200/500)
    k: int = 50  # strongest positive neighbours kept per item
    max_items: int = 10_000  # EASE runs over the most engaged items (dense items^2 inverse)
    # A history's best-scored neighbours join retrieval's candidates (a second candidate
    # source, offline and in serving), at most this many beyond retrieval's own.
    candidates: int = 100

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
        """The history's summed neighbour weights: sorted candidate ids and their sums."""
        m = self.matrix
        rows = np.asarray(history, dtype=np.int64)
        rows = rows[(rows > 0) & (rows < m.shape[0])]
        if len(rows) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        parts = [slice(m.indptr[r], m.indptr[r + 1]) for r in rows.tolist()]
        indices = np.concatenate([m.indices[p] for p in parts])
        data = np.concatenate([m.data[p] for p in parts])
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
            cfg = NeighbourConfig(lam=float(f["cfg_lam"]), k=int(f["cfg_k"]),
                                  max_items=int(f["cfg_max_items"]),
                                  candidates=int(f["cfg_candidates"]))
            return ItemNeighbours(matrix, cfg, f["item_ids"].astype(object),
                                  f["buckets"].astype(np.int64))


def ease_weights(matrix: sp.csr_matrix, lam: float) -> np.ndarray:
    """EASE's item-item weights (items, items) float32 with a zero diagonal."""
    gram = (matrix.T @ matrix).toarray().astype(np.float32)
    gram[np.diag_indices_from(gram)] += lam
    weights = scipy.linalg.inv(gram, overwrite_a=True, check_finite=False)  # P, in place
    weights /= -np.diag(weights)[None, :]  # B = -P / diag(P), off the diagonal
    weights[np.diag_indices_from(weights)] = 0.0
    return np.asarray(weights, dtype=np.float32)


def fit_neighbours(rows: pd.DataFrame, spec: EncoderSpec,
                   cfg: NeighbourConfig | None = None) -> ItemNeighbours:
    """EASE on the engaged rows (``clicked == 1``), truncated to ``cfg.k`` neighbours per item.

    Args:
        rows: ``user_id``, ``item_id``, ``clicked`` (training rows only: never the holdout).
        spec: The encoder spec whose ``item_buckets`` the models' encoded ids use.
        cfg: Regularization, neighbours per item, item cap.
    """
    cfg = cfg or NeighbourConfig()
    buckets = spec.item_buckets
    engaged = rows.loc[pd.to_numeric(rows["clicked"], errors="coerce").fillna(0) > 0,
                       ["user_id", "item_id"]].astype(str)
    counts = engaged["item_id"].value_counts()
    items = counts.index[: cfg.max_items].to_numpy()
    empty = ItemNeighbours(sp.csr_matrix((buckets, buckets), dtype=np.float32), cfg,
                           np.zeros(0, dtype=object), np.zeros(0, np.int64))
    if len(items) < 2:
        return empty
    column = pd.Series(np.arange(len(items)), index=items)
    engaged = engaged[engaged["item_id"].isin(column.index)]
    users = pd.factorize(engaged["user_id"])[0]
    x = sp.csr_matrix((np.ones(len(engaged), np.float32),
                       (users, column.reindex(engaged["item_id"]).to_numpy())),
                      shape=(int(users.max()) + 1, len(items)))
    x.data[:] = 1.0  # repeated engagements count once
    weights = ease_weights(x, cfg.lam)
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
    logger.info("item neighbours: %d items, %d entries (lambda %g, k %d)", len(items),
                matrix.nnz, cfg.lam, k)
    return ItemNeighbours(matrix, cfg, items.astype(object), ids)
