"""The one ranking path: candidates scored by the ranker and blended into the final score.

Training runs :meth:`recsys_models.ranker.Ranker.forward` on encoded impression rows.
Inference runs the same model in its three parts (:meth:`~recsys_models.ranker.Ranker.
user_side`, :meth:`~recsys_models.ranker.Ranker.item_side`, :meth:`~recsys_models.ranker.
Ranker.head`), so that a request computes its user side once and gathers item sides computed
once per catalog. Every inference caller ends in :func:`_score`:

- serving (:func:`score_candidates`): one or more requests, each an encoded user
  (:func:`encode_user`, once per request; the user tower's vector is kept for the retrieval
  score) and its candidates as rows of the bundle's :class:`RankingCatalog`, with the
  candidates' numeric item features read per request;
- :meth:`recsys_models.bundle.Bundle.rank` (evaluation, validation, ``recsys recommend``, the
  serving smoke test) through :func:`rank_frame`: aligned user and item frames, each distinct
  user encoded once, the items encoded from their own metadata.

Scores equal the training graph's (tests/model/test_scoring.py checks it).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch

from recsys_models.data import Batch, EncoderSpec, encode_items, encode_users, signed_log
from recsys_models.neighbours import ItemNeighbours
from recsys_models.ranker import Blend, Ranker, click_and_watch
from recsys_models.two_tower import TwoTowerModel


class Bundle(Protocol):
    """What scoring reads of a :class:`recsys_models.bundle.Bundle` (which imports this
    module for its ``rank``)."""

    spec: EncoderSpec
    two_tower: TwoTowerModel
    ranker: Ranker
    blend: Blend
    neighbours: ItemNeighbours | None
    known_items: frozenset[str]
    catalog: pd.DataFrame

USER_VECTOR = "user_vector"  # key under which embed_user leaves its result in the encoding

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
        history_row[0, : len(kept)] = spec.item_codes.encode_strings(kept)
    if spec.user_features:
        raw = np.array([[_as_float(features.get(n)) for n in spec.user_features]])
        user_num = signed_log(raw)
    else:
        user_num = np.zeros((1, 0), dtype=np.float32)
    return {"user_hash": spec.user_codes.encode_strings([user_id]),
            "history": history_row, "user_num": user_num}


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
    vector = _user_vectors(bundle, user).numpy().astype(np.float32)
    user[USER_VECTOR] = vector
    return vector


def _user_vectors(bundle: Bundle, users: Batch) -> torch.Tensor:
    return bundle.two_tower.user_tower.eval()(
        torch.from_numpy(users["user_hash"]), torch.from_numpy(users["history"]),
        torch.from_numpy(users["user_num"]).float())


# --- item sides: the catalog's once per bundle, a frame's per call ------------------------------


@torch.inference_mode()
def _item_tensors(bundle: Bundle, items: Batch) -> dict[str, torch.Tensor]:
    """What scoring reads of each encoded item: the ranker's item side, the item tower's
    ``vector`` (for the retrieval score) and ``item_hash`` (for the neighbour score)."""
    t = {k: torch.from_numpy(np.ascontiguousarray(items[k]))
         for k in ("item_hash", "category", "creator", "tags", "item_dense")}
    dense = t["item_dense"].float()
    side = bundle.ranker.eval().item_side(t["item_hash"], t["category"], t["creator"],
                                          t["tags"], dense)
    vector = bundle.two_tower.item_tower.eval()(t["item_hash"], t["category"], t["creator"],
                                                t["tags"], dense)
    return {**side, "vector": vector, "item_hash": t["item_hash"]}


def _encode_frame_items(bundle: Bundle, rows: pd.DataFrame) -> dict[str, torch.Tensor]:
    """Item tensors of metadata rows (items unseen in training: id bucket 0)."""
    known = rows["item_id"].isin(bundle.known_items).to_numpy()
    return _item_tensors(bundle, encode_items(rows, bundle.spec, known))


@dataclass(frozen=True)
class RankingCatalog:
    """The item tensors (:func:`_item_tensors`) of every catalog item, row
    ``positions[item_id]``, with one snapshot's numeric item features."""

    rows: int  # len(bundle.catalog) when built
    features: object  # the item-feature snapshot it was built from (identity checked)
    positions: dict[str, int]
    tensors: dict[str, torch.Tensor]


_RANKING_ATTR = "_ranking_catalog"  # cached on the bundle itself: it lives and dies with it
_LOCK = threading.Lock()  # one build at a time; readers never take it


def _unique_catalog(catalog: pd.DataFrame, seen: dict[str, int] | None = None
                    ) -> pd.DataFrame:
    rows = catalog.drop_duplicates("item_id", keep="last")
    if seen:
        rows = rows[~rows["item_id"].astype(str).isin(seen)]
    return rows.reset_index(drop=True)


def _catalog_part(bundle: Bundle, rows: pd.DataFrame, item_features: pd.DataFrame | None
                  ) -> dict[str, torch.Tensor]:
    names = bundle.spec.item_features
    if names and item_features is not None:
        aligned = item_features.reindex(pd.Index(rows["item_id"]))
        rows = rows.assign(**{n: aligned[n].to_numpy() if n in aligned.columns else 0.0
                              for n in names})
    return _encode_frame_items(bundle, rows)


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
                part = _catalog_part(bundle, new, item_features)
                tensors = {k: torch.cat([v, part[k]]) for k, v in cached.tensors.items()}
                built = RankingCatalog(rows, key, positions, tensors)
                bundle.__dict__[_RANKING_ATTR] = built
                return built
        catalog = _unique_catalog(bundle.catalog)
        tensors = _catalog_part(bundle, catalog, item_features)
        positions = {str(item): pos for pos, item in enumerate(catalog["item_id"])}
        built = RankingCatalog(rows, key, positions, tensors)
        bundle.__dict__[_RANKING_ATTR] = built
        return built


def catalog_rows(catalog: RankingCatalog, item_ids: Sequence[str]) -> np.ndarray | None:
    """Catalog positions of ``item_ids``; None when one is not in the catalog."""
    get = catalog.positions.get
    rows = [get(i, -1) for i in item_ids]
    out = np.fromiter(rows, dtype=np.int64, count=len(rows))
    return None if (out < 0).any() else out


# --- scoring ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scores:
    """Per candidate row: the ranker's heads, both retrieval-side scores and the blend."""

    p_click: np.ndarray
    watch_time_ms_pred: np.ndarray
    retrieval_score: np.ndarray
    neighbour_score: np.ndarray
    score: np.ndarray


@torch.inference_mode()
def _score(bundle: Bundle, users: Batch, owner: np.ndarray, items: dict[str, torch.Tensor],
           neighbours: bool = True) -> Scores:
    """Scores B candidate rows: ``users`` holds Q encoded users (with ``USER_VECTOR`` when the
    retrieval embeddings are at hand), ``owner`` (B,) the user of each row, ``items`` the rows'
    item tensors (B rows). ``neighbours=False`` skips the neighbour score where the blend
    gives it no weight."""
    ranker = bundle.ranker.eval()
    which = torch.from_numpy(owner)
    if USER_VECTOR in users:
        user_vec = torch.from_numpy(users[USER_VECTOR])
    else:
        user_vec = _user_vectors(bundle, users)  # (Q, dim)
    retrieval = (user_vec.index_select(0, which) * items["vector"]).sum(1)  # (B,)
    user = ranker.user_side(torch.from_numpy(users["user_hash"]),
                            torch.from_numpy(users["history"]),
                            torch.from_numpy(users["user_num"]))
    aligned = {k: v.index_select(0, which) for k, v in user.items()}
    p_click, watch = click_and_watch(*ranker.head(aligned, items, retrieval))
    retrieval_np = retrieval.numpy().astype(np.float32)
    neighbour = np.zeros(len(owner), np.float32)
    if bundle.neighbours is not None and (neighbours or bundle.blend.neighbour_weight):
        item_hash = items["item_hash"].numpy()
        order = np.argsort(owner, kind="stable")
        bounds = np.searchsorted(owner[order], np.arange(len(users["history"]) + 1))
        for q, history in enumerate(users["history"]):  # one aggregation per user
            rows = order[bounds[q]:bounds[q + 1]]
            if len(rows):
                neighbour[rows] = bundle.neighbours.score_one(history, item_hash[rows])
    return Scores(p_click, watch, retrieval_np, neighbour,
                  bundle.blend.score(p_click, watch, retrieval_np, neighbour))


@dataclass(frozen=True)
class Query:
    """One request to score: the encoded user and candidate rows of the catalog."""

    user: Batch  # encode_user's output
    rows: np.ndarray  # (n,) int64 positions in RankingCatalog
    item_features: np.ndarray | None = None  # (n, I) raw numeric item features (serving)


def score_candidates(bundle: Bundle, catalog: RankingCatalog,
                     queries: Sequence[Query]) -> list[np.ndarray]:
    """Blended scores per query, from ONE ranker pass over all their candidates (the user
    side once per query, the item side gathered from the catalog)."""
    sizes = [len(q.rows) for q in queries]
    if not sizes or sum(sizes) == 0:
        return [np.zeros(0, np.float32) for _ in queries]
    rows = torch.from_numpy(np.concatenate([q.rows for q in queries]))
    items = {k: v.index_select(0, rows) for k, v in catalog.tensors.items()}
    names = len(bundle.spec.item_features)
    if names and any(q.item_features is not None for q in queries):
        raw = np.concatenate([q.item_features if q.item_features is not None
                              else np.zeros((len(q.rows), names)) for q in queries])
        items["item_dense"][:, -names:] = torch.from_numpy(signed_log(raw))
    keys = ["user_hash", "history", "user_num"]
    if all(USER_VECTOR in q.user for q in queries):  # the retrieval embeddings, reused
        keys.append(USER_VECTOR)
    users = {k: np.concatenate([q.user[k] for q in queries]) for k in keys}
    owner = np.repeat(np.arange(len(queries)), sizes)
    scores = _score(bundle, users, owner, items, neighbours=False).score
    return list(np.split(scores, np.cumsum(sizes)[:-1]))


def rank_frame(bundle: Bundle, users: pd.DataFrame, items: pd.DataFrame) -> Scores:
    """Scores aligned rows (users row i with items row i; ``items`` carries the metadata
    columns): each distinct user (id, history, numeric features) is encoded and embedded once,
    every item from its own row."""
    encoded = encode_users(users, bundle.spec)
    key = np.column_stack([encoded["user_hash"], encoded["history"],
                           encoded["user_num"].view(np.int32).astype(np.int64)])
    _, first, owner = np.unique(key, axis=0, return_index=True, return_inverse=True)
    distinct = {k: v[first] for k, v in encoded.items()}
    return _score(bundle, distinct, owner.reshape(-1).astype(np.int64),
                  _encode_frame_items(bundle, items))
