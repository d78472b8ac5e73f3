"""Serving fast path: one user against many catalog items, numpy and torch only.

:meth:`recsys_models.bundle.Bundle.rank` encodes every (user, item) row from pandas, which
costs ~20 ms for 500 candidates on this machine, most of it re-hashing the same item metadata
and the same user history 500 times. Here:

- :func:`encode_user` encodes ONE user from plain Python values (the same numbers as
  :func:`~recsys_models.data.encode_users` on a one-row frame), once per request; the user
  tower and the ranker both read that encoding;
- :func:`ranking_catalog` encodes every catalog item's static ranker inputs (embeddings of
  id, category, creator, tags; duration and age) once per bundle, as tensors, and appends the
  items added to the bundle later; a request only gathers candidate rows from them;
- :func:`score_candidates` runs the ranker once over all candidates of one or more requests,
  with each query's own numeric item features (read per request by serving) in place of the
  catalog's.

Scores equal ``Bundle.rank``'s (tests/model/test_fast_rank.py checks it).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from recsys_models.bundle import Bundle, retrieval_scores
from recsys_models.data import (
    Batch,
    EncoderSpec,
    encode_items,
    encode_users,
    numeric_features,
    signed_log,
)
from recsys_models.hashing import ITEM_SALT, USER_SALT, hash_strings
from recsys_models.ranker import predict


@dataclass(frozen=True)
class _EncodedCatalog:
    rows: int  # len(bundle.catalog) when encoded
    index: pd.Index
    items: Batch


_ATTR = "_fast_rank_catalog"  # cached on the bundle itself: it lives and dies with it
_RANKING_ATTR = "_fast_rank_ranking_catalog"
_LOCK = threading.Lock()  # one build at a time; readers never take it


def _encoded_catalog(bundle: Bundle) -> _EncodedCatalog:
    cached: _EncodedCatalog | None = bundle.__dict__.get(_ATTR)
    if cached is None or cached.rows != len(bundle.catalog):
        catalog = bundle.catalog.drop_duplicates("item_id", keep="last").reset_index(drop=True)
        known = catalog["item_id"].isin(bundle.known_items).to_numpy()
        cached = _EncodedCatalog(len(bundle.catalog), pd.Index(catalog["item_id"]),
                                 encode_items(catalog, bundle.spec, known))
        bundle.__dict__[_ATTR] = cached
    return cached


def rank_aligned(bundle: Bundle, users: pd.DataFrame, items: pd.DataFrame) -> pd.DataFrame:
    """``p_click, watch_time_ms_pred, score`` per aligned (users row i, items row i).

    ``users`` may have one row (broadcast) or one row per item row; ``items`` needs
    ``item_id`` plus any numeric item features. Items the bundle's catalog lacks go through
    :meth:`Bundle.rank`.
    """
    encoded = _encoded_catalog(bundle)
    pos = encoded.index.get_indexer(items["item_id"])
    if (pos < 0).any():
        return bundle.rank(users, items)[["p_click", "watch_time_ms_pred", "score"]]
    batch = {key: value[pos] for key, value in encoded.items.items()}
    if bundle.spec.item_features:
        dense = batch["item_dense"].copy()
        dense[:, 2:] = numeric_features(items.reset_index(drop=True), bundle.spec.item_features)
        batch["item_dense"] = dense
    users = users.reset_index(drop=True)
    if len(users) == 1:
        first, which = np.array([0]), np.zeros(len(items), dtype=np.int64)
    elif len(users) == len(items):
        which, uniques = pd.factorize(users["user_id"])
        first = np.array([int(np.argmax(which == k)) for k in range(len(uniques))])
    else:
        raise ValueError(f"rank_aligned: users has {len(users)} rows and items {len(items)}")
    user_batch = encode_users(users.iloc[first].reset_index(drop=True), bundle.spec)
    batch |= {key: value[which] for key, value in user_batch.items()}
    batch["retrieval_score"] = retrieval_scores(bundle.two_tower, batch)
    p_click, watch = predict(bundle.ranker, batch)
    neighbour = bundle.neighbour_scores(batch["history"], batch["item_hash"])
    return pd.DataFrame({"p_click": p_click, "watch_time_ms_pred": watch,
                         "score": bundle.blend.score(p_click, watch, batch["retrieval_score"],
                                                     neighbour)})


# --- one user, plain values -------------------------------------------------------------------


def _as_float(value: Any) -> float:
    """``pd.to_numeric(errors="coerce").fillna(0)`` for one value."""
    if value is None:
        return 0.0
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0.0
    return 0.0 if math.isnan(number) else number


def encode_user(spec: EncoderSpec, user_id: str, history: Sequence[Any],
                features: Mapping[str, Any]) -> Batch:
    """One user's model inputs: ``user_hash`` (1,), ``history`` (1, H), ``user_num`` (1, U).

    Equal to ``encode_users`` on a one-row frame with ``user_id``, ``user_history`` and the
    numeric features.
    """
    history_row = np.zeros((1, spec.history_length), dtype=np.int64)
    kept = list(history)[: spec.history_length]
    if kept:
        history_row[0, : len(kept)] = hash_strings(kept, spec.item_buckets, ITEM_SALT)
    if spec.user_features:
        raw = np.array([[_as_float(features.get(n)) for n in spec.user_features]])
        user_num = signed_log(raw)
    else:
        user_num = np.zeros((1, 0), dtype=np.float32)
    return {"user_hash": hash_strings([user_id], spec.user_buckets, USER_SALT),
            "history": history_row, "user_num": user_num}


USER_VECTOR = "user_vector"  # key under which embed_user leaves its result in the encoding


@torch.inference_mode()
def embed_user(bundle: Bundle, user: Batch) -> np.ndarray:
    """User-tower embedding (1, dim) of :func:`encode_user`'s output.

    The vector is also kept in ``user[USER_VECTOR]``, so that :func:`score_candidates` reuses
    the retrieval embedding for the ranker's retrieval score instead of running the user tower
    a second time on the request path.
    """
    cached = user.get(USER_VECTOR)
    if cached is not None:
        return cached
    tower = bundle.two_tower.user_tower
    out = tower(torch.from_numpy(user["user_hash"]), torch.from_numpy(user["history"]),
                torch.from_numpy(user["user_num"]).float())
    vector = out.numpy().astype(np.float32)
    user[USER_VECTOR] = vector
    return vector


# --- the catalog, encoded once per (bundle, item snapshot) -------------------------------------


@dataclass(frozen=True)
class RankingCatalog:
    """The ranker's item side of every catalog item, with one snapshot's item features.

    ``tensors``: the ranker's item embeddings ``item`` and ``category`` (n, d) each,
    ``static`` (n, 2d + 2 + I): creator and tag embeddings, then ``item_dense`` (the static
    metadata columns and the snapshot's numeric item features), ``vector`` (n, dim): the
    item tower's embedding (for the retrieval score), and ``item_hash`` (n,): the encoded id
    (for the neighbour score); row ``positions[item_id]``.
    """

    rows: int  # len(bundle.catalog) when built
    features: object  # the item-feature snapshot it was built from (identity checked)
    positions: dict[str, int]
    tensors: dict[str, torch.Tensor]


def _unique_catalog(catalog: pd.DataFrame, seen: dict[str, int] | None = None
                    ) -> pd.DataFrame:
    rows = catalog.drop_duplicates("item_id", keep="last")
    if seen:
        rows = rows[~rows["item_id"].astype(str).isin(seen)]
    return rows.reset_index(drop=True)


def _encode_part(bundle: Bundle, rows: pd.DataFrame, item_features: pd.DataFrame | None
                 ) -> dict[str, torch.Tensor]:
    known = rows["item_id"].isin(bundle.known_items).to_numpy()
    items = encode_items(rows, bundle.spec, known)
    dense = items["item_dense"].astype(np.float32, copy=True)
    names = bundle.spec.item_features
    if names and item_features is not None:
        aligned = item_features.reindex(pd.Index(rows["item_id"]))
        dense[:, dense.shape[1] - len(names):] = numeric_features(aligned, names)
    return _item_side(bundle, items, dense)


def ranking_catalog(bundle: Bundle, item_features: pd.DataFrame | None = None,
                    features_key: object = None) -> RankingCatalog:
    """The cached :class:`RankingCatalog` of ``bundle`` (built once per bundle and feature
    snapshot; items added to the bundle since are encoded and appended, not the whole
    catalog again).

    Args:
        bundle: The bundle (its catalog may have grown through ``add_items``).
        item_features: Numeric item features indexed by ``item_id`` (absent items: zeros).
            Serving passes None and gives each query its candidates' features instead
            (:attr:`Query.item_features`).
        features_key: Identity of the snapshot (defaults to the frame itself); a new key
            rebuilds the catalog.
    """
    key = item_features if features_key is None else features_key
    cached: RankingCatalog | None = bundle.__dict__.get(_RANKING_ATTR)
    if cached is not None and cached.features is key and cached.rows == len(bundle.catalog):
        return cached
    with _LOCK:
        cached = bundle.__dict__.get(_RANKING_ATTR)
        rows = len(bundle.catalog)
        if cached is not None and cached.features is key:
            if cached.rows == rows:
                return cached
            if cached.rows < rows:  # items were added: encode only those
                new = _unique_catalog(bundle.catalog.iloc[cached.rows:], cached.positions)
                base = len(cached.positions)
                positions = dict(cached.positions)
                positions.update((str(item), base + n) for n, item in enumerate(new["item_id"]))
                part = _encode_part(bundle, new, item_features)
                tensors = {k: torch.cat([v, part[k]]) for k, v in cached.tensors.items()}
                built = RankingCatalog(rows, key, positions, tensors)
                bundle.__dict__[_RANKING_ATTR] = built
                return built
        catalog = _unique_catalog(bundle.catalog)
        tensors = _encode_part(bundle, catalog, item_features)
        positions = {str(item): pos for pos, item in enumerate(catalog["item_id"])}
        built = RankingCatalog(rows, key, positions, tensors)
        bundle.__dict__[_RANKING_ATTR] = built
        return built


@torch.inference_mode()
def _item_side(bundle: Bundle, items: Batch, dense: np.ndarray) -> dict[str, torch.Tensor]:
    ranker = bundle.ranker.eval()
    t = {k: torch.from_numpy(np.ascontiguousarray(items[k]))
         for k in ("item_hash", "category", "creator", "tags")}
    tower = bundle.two_tower.item_tower.eval()
    return {
        "vector": tower(t["item_hash"], t["category"], t["creator"], t["tags"],
                        torch.from_numpy(np.ascontiguousarray(items["item_dense"])).float()),
        "item": ranker.item_emb(t["item_hash"]),  # (n, d)
        "category": ranker.category_emb(t["category"]),  # (n, d)
        "static": torch.cat([ranker.creator_emb(t["creator"]), ranker.tag_emb(t["tags"]),
                             torch.from_numpy(dense)], dim=1),  # (n, 2d + dense)
        "item_hash": t["item_hash"],  # (n,)
    }


@dataclass(frozen=True)
class Query:
    """One request to score: the encoded user and candidate rows of the catalog."""

    user: Batch  # encode_user's output
    rows: np.ndarray  # (n,) int64 positions in RankingCatalog
    item_features: np.ndarray | None = None  # (n, I) raw numeric item features (serving)


def catalog_rows(catalog: RankingCatalog, item_ids: Sequence[str]) -> np.ndarray | None:
    """Catalog positions of ``item_ids``; None when one is not in the catalog."""
    get = catalog.positions.get
    rows = [get(i, -1) for i in item_ids]
    out = np.fromiter(rows, dtype=np.int64, count=len(rows))
    return None if (out < 0).any() else out


@torch.inference_mode()
def score_candidates(bundle: Bundle, catalog: RankingCatalog,
                     queries: Sequence[Query]) -> list[np.ndarray]:
    """Blended scores per query, from ONE ranker pass over all their candidates.

    The same arithmetic as :meth:`recsys_models.ranker.Ranker.forward`, with the user side
    (id and history embeddings, numeric features) computed once per query instead of once
    per candidate row, and the item side gathered from the catalog's pre-computed embeddings.
    """
    sizes = [len(q.rows) for q in queries]
    if not sizes or sum(sizes) == 0:
        return [np.zeros(0, np.float32) for _ in queries]
    ranker = bundle.ranker
    rows = torch.from_numpy(np.concatenate([q.rows for q in queries]))
    item = catalog.tensors["item"].index_select(0, rows)  # (B, d)
    cat = catalog.tensors["category"].index_select(0, rows)  # (B, d)
    static = catalog.tensors["static"].index_select(0, rows)  # (B, 2d + dense)
    names = len(bundle.spec.item_features)
    if names and any(q.item_features is not None for q in queries):
        raw = np.concatenate([q.item_features if q.item_features is not None
                              else np.zeros((len(q.rows), names)) for q in queries])
        static[:, static.shape[1] - names:] = torch.from_numpy(signed_log(raw))
    user_hash = torch.from_numpy(np.concatenate([q.user["user_hash"] for q in queries]))
    history = torch.from_numpy(np.concatenate([q.user["history"] for q in queries]))
    user_num = torch.from_numpy(np.concatenate([q.user["user_num"] for q in queries])).float()
    owner = torch.from_numpy(np.repeat(np.arange(len(queries)), sizes))
    if all(USER_VECTOR in q.user for q in queries):  # the retrieval embeddings, reused
        user_vec = torch.from_numpy(np.concatenate([q.user[USER_VECTOR] for q in queries]))
    else:
        user_vec = bundle.two_tower.user_tower(user_hash, history, user_num)  # (Q, dim)
    vector = catalog.tensors["vector"].index_select(0, rows)  # (B, dim)
    retrieval = (user_vec.index_select(0, owner) * vector).sum(1, keepdim=True)  # (B, 1)
    user = ranker.user_emb(user_hash).index_select(0, owner)  # (B, d)
    hist = ranker.history_emb(history).index_select(0, owner)  # (B, d)
    width = 2 * ranker.cfg.emb_dim
    creator_tags, item_dense = static[:, :width], static[:, width:]
    x = torch.cat([user, item, hist, cat, creator_tags, hist * item, hist * cat,
                   user_num.index_select(0, owner), item_dense, retrieval], dim=1)  # (B, width)
    h = ranker.bottom(x)  # (B, hidden)
    logit = ranker.click_head(h).squeeze(1) + ranker.retrieval_weight * retrieval.squeeze(1)
    wlog = ranker.watch_head(h).squeeze(1)
    p_click = torch.sigmoid(logit).numpy().astype(np.float32)
    watch = (torch.expm1(wlog.clamp(min=0, max=20)) * 1000.0).numpy().astype(np.float32)
    neighbour = None
    if bundle.neighbours is not None and bundle.blend.neighbour_weight:
        items = np.split(catalog.tensors["item_hash"].index_select(0, rows).numpy(),
                         np.cumsum(sizes)[:-1])
        neighbour = np.concatenate([bundle.neighbours.score_one(q.user["history"][0], part)
                                    for q, part in zip(queries, items, strict=True)])
    scores = bundle.blend.score(p_click, watch, retrieval.squeeze(1).numpy(), neighbour)
    return list(np.split(scores, np.cumsum(sizes)[:-1]))
