"""HNSW index over item-tower embeddings (hnswlib, inner product) and its recall vs exact.

Inner product on L2-normalised vectors needs ``M=32`` to reach recall@100 of about 0.95 on this
project's catalogs (measured; see docs/benchmarks.md), so that is the default.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import hnswlib
import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HnswConfig:
    """Index build and query parameters."""

    m: int = 32
    ef_construction: int = 200
    ef_search: int = 200
    threads: int = 1


class HnswIndex:
    """Item ids plus an hnswlib index over their embeddings; labels are row positions.

    Example:
        >>> index = HnswIndex.build(item_ids, item_embeddings)
        >>> ids, scores = index.search(user_embeddings, 100)  # (n, 100) each
    """

    def __init__(self, index: hnswlib.Index, item_ids: np.ndarray, cfg: HnswConfig) -> None:
        self.index, self.item_ids, self.cfg = index, np.asarray(item_ids, dtype=object), cfg

    @classmethod
    def build(cls, item_ids: np.ndarray, embeddings: np.ndarray,
              cfg: HnswConfig | None = None) -> HnswIndex:
        cfg = cfg or HnswConfig()
        n, dim = embeddings.shape
        index = hnswlib.Index(space="ip", dim=dim)
        index.init_index(max_elements=max(n, 1), ef_construction=cfg.ef_construction, M=cfg.m,
                         random_seed=42)
        index.set_num_threads(cfg.threads)
        if n:
            index.add_items(embeddings.astype(np.float32), np.arange(n))
        index.set_ef(cfg.ef_search)
        return cls(index, item_ids, cfg)

    def __len__(self) -> int:
        return len(self.item_ids)

    def add(self, item_ids: np.ndarray, embeddings: np.ndarray) -> None:
        """Adds items (cold start); grows the index as needed."""
        start = len(self.item_ids)
        needed = start + len(item_ids)
        if needed > self.index.get_max_elements():
            self.index.resize_index(max(needed, 2 * self.index.get_max_elements()))
        self.index.add_items(embeddings.astype(np.float32), np.arange(start, needed))
        self.item_ids = np.concatenate([self.item_ids, np.asarray(item_ids, dtype=object)])

    def search(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``n`` item ids and inner-product scores per query row: (q, n) each."""
        k = min(n, len(self.item_ids))
        self.index.set_ef(max(self.cfg.ef_search, k))
        labels, distances = self.index.knn_query(queries.astype(np.float32), k=k)
        return self.item_ids[labels.astype(np.int64)], (1.0 - distances).astype(np.float32)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.index.save_index(str(directory / "hnsw.bin"))
        np.save(directory / "index_item_ids.npy", self.item_ids.astype(str))

    @classmethod
    def load(cls, directory: Path, dim: int, cfg: HnswConfig | None = None) -> HnswIndex:
        cfg = cfg or HnswConfig()
        item_ids = np.load(directory / "index_item_ids.npy").astype(object)
        index = hnswlib.Index(space="ip", dim=dim)
        index.load_index(str(directory / "hnsw.bin"), max_elements=max(len(item_ids), 1))
        index.set_num_threads(cfg.threads)
        index.set_ef(cfg.ef_search)
        return cls(index, item_ids, cfg)


EXACT_CHUNK = 256  # query rows scored at once: (256, items) float32 + int64 argpartition
EXACT_CELLS = 1 << 25  # and at most this many scores (large catalogs get smaller chunks)


def _chunk(chunk: int, items: int) -> int:
    """Query rows per chunk: ``chunk``, fewer where the catalog would exceed EXACT_CELLS."""
    return max(1, min(chunk, EXACT_CELLS // max(items, 1)))


def _exact_top(embeddings: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-``k`` row positions for one chunk of queries: (q, k), best first."""
    scores = queries @ embeddings.T  # (q, items) float32
    top = np.argpartition(scores, scores.shape[1] - k, axis=1)[:, -k:]
    order = np.take_along_axis(scores, top, axis=1).argsort(axis=1)[:, ::-1]
    return np.take_along_axis(top, order, axis=1)


def exact_search(embeddings: np.ndarray, queries: np.ndarray, n: int,
                 chunk: int = EXACT_CHUNK) -> np.ndarray:
    """Row positions of the exact top-``n`` inner products: (q, n).

    Scores ``chunk`` queries at a time in float32, so the peak is a (chunk, items) matrix,
    whatever the number of queries.
    """
    embeddings = np.asarray(embeddings, dtype=np.float32)
    queries = np.asarray(queries, dtype=np.float32)
    k = min(n, embeddings.shape[0])
    chunk = _chunk(chunk, embeddings.shape[0])
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), chunk):
        out[start:start + chunk] = _exact_top(embeddings, queries[start:start + chunk], k)
    return out


def recall_vs_exact(index: HnswIndex, embeddings: np.ndarray, queries: np.ndarray,
                    n: int = 100, chunk: int = EXACT_CHUNK) -> float:
    """Mean fraction of the exact top-``n`` that the index returns (``embeddings`` in index
    order); ``chunk`` queries at a time (memory independent of the number of queries)."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    k = min(n, embeddings.shape[0])
    if len(queries) == 0 or k == 0:
        return 0.0
    hits = 0
    chunk = _chunk(chunk, embeddings.shape[0])
    for start in range(0, len(queries), chunk):
        part = np.asarray(queries[start:start + chunk], dtype=np.float32)
        exact = _exact_top(embeddings, part, k)
        labels, _ = index.index.knn_query(part, k=k)
        hits += sum(len(set(a) & set(b)) for a, b in zip(labels.tolist(), exact.tolist(),
                                                         strict=True))
    return float(hits / (len(queries) * k))
