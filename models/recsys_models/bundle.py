"""The serving bundle: everything one model version needs, saved and loaded as one unit.

A bundle holds the user tower, the item embeddings of the whole catalog with their HNSW
index, the ranker, the encoder spec, the feature-service name and the training-snapshot id, so
that serving can never mix parts of different versions. On disk::

    bundle.json          version, feature_service, snapshot_id, configs, spec, blend
    weights.pt           two-tower and ranker state dicts
    catalog.parquet      item metadata in index order (item_ids == catalog order)
    item_embeddings.npy  (n_items, dim) float32, index order
    known_items.npy      item ids seen in training (others are embedded from metadata)
    index/               hnswlib index + its item ids
    neighbours.npz       optional item-item neighbour table (recsys_models.neighbours)
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from recsys_core.features import USER_HISTORY
from recsys_models.ann import HnswConfig, HnswIndex
from recsys_models.data import EncoderSpec, catalog_frame, encode_items, encode_users
from recsys_models.errors import BundleFormatError
from recsys_models.neighbours import ItemNeighbours
from recsys_models.ranker import Blend, Ranker, RankerConfig
from recsys_models.scoring import rank_frame
from recsys_models.two_tower import Retriever, TwoTowerConfig, TwoTowerModel, embed_item_batch

logger = logging.getLogger(__name__)

FORMAT = 2  # 2: sequential user tower, ranker reads the retrieval score
CATALOG_COLUMNS = ("item_id", "category", "creator_id", "tags", "duration_ms", "published_at")


@dataclass
class Bundle:
    """One model version for serving.

    ``rank(users, items)`` scores ALIGNED rows: row i of the result is (users row i, items row
    i); a one-row ``users`` frame is broadcast against every item row (one user, many
    candidates). Use :meth:`cross` to build the aligned frames of users x candidates.

    Example:
        >>> bundle = load_bundle("models:/recsys-bundle@champion")
        >>> ids, scores = bundle.search(bundle.encode_users(users), 100)
        >>> ranked = bundle.rank(users.iloc[[0]], pd.DataFrame({"item_id": ids[0]}))
    """

    version: str
    feature_service: str
    snapshot_id: str
    spec: EncoderSpec
    two_tower: TwoTowerModel
    ranker: Ranker
    index: HnswIndex
    item_embeddings: np.ndarray  # (n_items, dim), index order
    catalog: pd.DataFrame  # CATALOG_COLUMNS + item_age_days, index order
    known_items: frozenset[str]
    as_of: pd.Timestamp  # reference time for item ages
    blend: Blend = field(default_factory=Blend)
    metrics: dict[str, float] = field(default_factory=dict)
    build_stats: dict[str, float] = field(default_factory=dict)  # embedding, index build
    neighbours: ItemNeighbours | None = None  # item-item scores for the final blend

    @property
    def item_ids(self) -> np.ndarray:
        return self.index.item_ids

    @property
    def dim(self) -> int:
        return int(self.item_embeddings.shape[1])

    def encode_users(self, users: pd.DataFrame) -> np.ndarray:
        """User embeddings (n, dim) from ``user_id``, ``user_history`` and numeric features."""
        return Retriever(self.two_tower.user_tower, self.index).embed(
            encode_users(users, self.spec))

    def search(self, user_emb: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``n`` item ids and scores per user embedding: (n_users, n) each."""
        return self.index.search(np.atleast_2d(user_emb), n)

    def _item_rows(self, items: pd.DataFrame) -> pd.DataFrame:
        missing = [c for c in ("category", "creator_id", "tags") if c not in items.columns]
        if not missing and "item_age_days" in items.columns:
            return items.reset_index(drop=True)
        meta = self.catalog.drop_duplicates("item_id").set_index("item_id")
        base = items.reset_index(drop=True)
        add = [c for c in meta.columns if c not in base.columns]
        return base.join(meta[add], on="item_id")

    def neighbour_candidates(self, history: np.ndarray) -> list[str]:
        """The item-item source of candidates: the best-scored catalog neighbours of one
        encoded history (H,), at most ``neighbours.cfg.candidates`` (none without a table)."""
        if self.neighbours is None or self.neighbours.cfg.candidates <= 0:
            return []
        n = self.neighbours.cfg.candidates
        ids, _ = self.neighbours.top(history, n)
        return [str(x) for x in ids if x is not None and str(x) in self.known_items]

    def rank(self, users: pd.DataFrame, items: pd.DataFrame) -> pd.DataFrame:
        """``user_id, item_id, p_click, watch_time_ms_pred, score, retrieval_score,
        neighbour_score`` per row.

        From ``users`` only ``user_id``, ``user_history`` and numeric user features are read;
        ``items`` needs ``item_id`` (metadata columns are taken from the bundle's catalog when
        absent).
        """
        items = self._item_rows(items)
        users = users.reset_index(drop=True)
        if len(users) == 1 and len(items) != 1:
            users = users.loc[np.zeros(len(items), dtype=np.int64)].reset_index(drop=True)
        if len(users) != len(items):
            raise ValueError(f"rank: users has {len(users)} rows and items {len(items)}; "
                             "pass aligned frames or one user row")
        scores = rank_frame(self, users, items)
        return pd.DataFrame({
            "user_id": users["user_id"].to_numpy(), "item_id": items["item_id"].to_numpy(),
            "p_click": scores.p_click, "watch_time_ms_pred": scores.watch_time_ms_pred,
            "score": scores.score, "retrieval_score": scores.retrieval_score,
            "neighbour_score": scores.neighbour_score,
        })

    @staticmethod
    def cross(users: pd.DataFrame, item_ids: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Aligned frames for ``rank`` from users and a (n_users, n) candidate matrix."""
        n = item_ids.shape[1]
        u = users.loc[users.index.repeat(n)].reset_index(drop=True)
        return u, pd.DataFrame({"item_id": item_ids.reshape(-1)})

    def add_items(self, items: pd.DataFrame) -> None:
        """Embeds catalog items (unseen ones from metadata alone) and adds them to the index."""
        new = items[~items["item_id"].isin(set(self.item_ids))]
        if new.empty:
            return
        rows = catalog_frame(new[list(CATALOG_COLUMNS)], self.as_of)
        emb = embed_items_frame(self, rows)
        self.index.add(rows["item_id"].to_numpy(), emb)
        self.item_embeddings = np.concatenate([self.item_embeddings, emb])
        self.catalog = pd.concat([self.catalog, rows], ignore_index=True)
        logger.info("added %d items to bundle %s", len(rows), self.version)

    def rank_candidates(self, users: pd.DataFrame, candidates: int = 200,
                        exclude: dict[str, set[str]] | None = None,
                        chunk: int = 32) -> pd.DataFrame:
        """Retrieves ``candidates`` per user and scores them all with the ranker (unsorted).

        Items in ``exclude[user_id]`` and in the user's ``user_history`` are dropped first (as
        serving does); with a neighbour table, the history's best neighbours
        (:meth:`neighbour_candidates`) join retrieval's ``candidates`` (as in serving).
        Returns :meth:`rank`'s columns plus ``query``, the user's row in ``users``.
        """
        exclude = exclude or {}
        users = users.reset_index(drop=True)
        histories = (users[USER_HISTORY] if USER_HISTORY in users.columns
                     else pd.Series([[]] * len(users)))
        drop = [exclude.get(u, set()) | (set(h) if isinstance(h, list | tuple | np.ndarray)
                                         else set())  # a missing history is NaN in a frame
                for u, h in zip(users["user_id"], histories, strict=True)]
        extra = max((len(v) for v in drop), default=0)
        ids, _ = self.search(self.encode_users(users), candidates + extra)
        history = encode_users(users, self.spec)["history"] if self.neighbours else None
        out = []
        for start in range(0, len(users), chunk):
            members = range(start, min(start + chunk, len(users)))
            cands = [[x for x in ids[i] if x not in drop[i]][:candidates] for i in members]
            if history is not None:  # the neighbour source: serving's second candidate list
                for i, listed in zip(members, cands, strict=True):
                    have = drop[i] | set(listed)
                    listed += [x for x in self.neighbour_candidates(history[i])
                               if x not in have]
            which = np.repeat(np.arange(start, start + len(cands)), [len(c) for c in cands])
            ranked = self.rank(users.loc[which], pd.DataFrame(
                {"item_id": [x for c in cands for x in c]}))
            out.append(ranked.assign(query=which))
        if not out:
            return pd.DataFrame(columns=["user_id", "item_id", "p_click", "watch_time_ms_pred",
                                         "score", "retrieval_score", "neighbour_score",
                                         "query"])
        return pd.concat(out, ignore_index=True)

    def recommend(self, users: pd.DataFrame, k: int, candidates: int = 200,
                  exclude: dict[str, set[str]] | None = None, chunk: int = 32) -> pd.DataFrame:
        """Two stages: retrieve ``candidates`` per user, rank them, keep the top ``k``.

        Items in ``exclude[user_id]`` and in the user's ``user_history`` are never returned
        (as serving does). Returns ``user_id, rank, item_id, score, p_click,
        watch_time_ms_pred``.
        """
        cols = ["user_id", "rank", "item_id", "score", "p_click", "watch_time_ms_pred"]
        ranked = self.rank_candidates(users, candidates, exclude, chunk)
        if ranked.empty:
            return pd.DataFrame(columns=cols)
        ranked = ranked.sort_values(["query", "score"], ascending=[True, False], kind="stable")
        top = ranked.groupby("query", sort=False).head(k)
        return top.assign(rank=top.groupby("query").cumcount() + 1)[cols].reset_index(drop=True)


@torch.no_grad()
def retrieval_scores(two_tower: TwoTowerModel, batch: dict[str, np.ndarray],
                     chunk: int = 8192) -> np.ndarray:
    """The two-tower's score (cosine) of each encoded (user, item) row: (n,) float32."""
    two_tower.eval()
    out = []
    for start in range(0, len(batch["item_hash"]), chunk):
        t = {k: torch.as_tensor(batch[k][start:start + chunk]) for k in (
            "user_hash", "history", "user_num", "item_hash", "category", "creator", "tags",
            "item_dense")}
        u = two_tower.user_tower(t["user_hash"], t["history"], t["user_num"].float())
        v = two_tower.item_tower(t["item_hash"], t["category"], t["creator"], t["tags"],
                                 t["item_dense"].float())
        out.append((u * v).sum(1).numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def embed_items_frame(bundle: Bundle, rows: pd.DataFrame) -> np.ndarray:
    """Item-tower embeddings of catalog rows; items unseen in training use metadata only."""
    known = rows["item_id"].isin(bundle.known_items).to_numpy()
    encoded = encode_items(rows, bundle.spec, known=known)
    return embed_item_batch(bundle.two_tower.item_tower, encoded)


def build_bundle(
    two_tower: TwoTowerModel, ranker: Ranker, spec: EncoderSpec, items: pd.DataFrame,
    known_items: set[str], *, version: str, feature_service: str, snapshot_id: str,
    as_of: pd.Timestamp, blend: Blend | None = None, hnsw: HnswConfig | None = None,
) -> Bundle:
    """Embeds the whole catalog with the item tower and builds the HNSW index over it."""
    rows = catalog_frame(items[list(CATALOG_COLUMNS)].drop_duplicates("item_id"), as_of)
    began = time.perf_counter()
    emb = embed_catalog(two_tower, spec, rows, known_items)
    embedded = time.perf_counter()
    index = HnswIndex.build(rows["item_id"].to_numpy(), emb, hnsw)
    built = time.perf_counter()
    stats = {"items": float(len(rows)), "embed_items_s": embedded - began,
             "index_build_s": built - embedded, "index_build_threads": float(
                 (hnsw or HnswConfig()).build_threads or os.cpu_count() or 1)}
    logger.info("bundle %s: %d items embedded in %.1f s, HNSW built in %.1f s", version,
                len(rows), stats["embed_items_s"], stats["index_build_s"])
    return Bundle(version=version, feature_service=feature_service, snapshot_id=snapshot_id,
                  spec=spec, two_tower=two_tower.eval(), ranker=ranker.eval(), index=index,
                  item_embeddings=emb, catalog=rows, known_items=frozenset(known_items),
                  as_of=as_of, blend=blend or Blend(), build_stats=stats)


RAY_EMBED_MIN_ITEMS = 200_000  # below this, Ray Data's start-up costs more than it saves


def embed_catalog(two_tower: TwoTowerModel, spec: EncoderSpec, rows: pd.DataFrame,
                  known_items: set[str] | frozenset[str], chunk: int = 65_536,
                  use_ray: bool | None = None) -> np.ndarray:
    """Item-tower embeddings of catalog rows (n, dim), in row order.

    With Ray running (and at least :data:`RAY_EMBED_MIN_ITEMS` rows, unless ``use_ray`` says
    otherwise) the catalog is embedded by Ray Data ``map_batches`` on the cluster's workers;
    otherwise ``chunk`` rows at a time in this process, so the encoded inputs of a million
    items never sit in memory at once. Both give the same embeddings.
    """
    if use_ray is None:
        import ray

        use_ray = ray.is_initialized() and len(rows) >= RAY_EMBED_MIN_ITEMS
    if use_ray and len(rows):
        return _embed_with_ray(two_tower, spec, rows, known_items, chunk)
    parts = []
    for start in range(0, len(rows), chunk):
        part = rows.iloc[start:start + chunk]
        known = part["item_id"].isin(known_items).to_numpy()
        parts.append(embed_item_batch(two_tower.item_tower, encode_items(part, spec, known)))
    if not parts:
        return np.zeros((0, two_tower.item_tower.dim), np.float32)
    return np.concatenate(parts)


def _embed_with_ray(two_tower: TwoTowerModel, spec: EncoderSpec, rows: pd.DataFrame,
                    known_items: set[str] | frozenset[str], chunk: int) -> np.ndarray:
    import pyarrow as pa
    import ray.data

    tower = two_tower.item_tower.eval()
    known = frozenset(known_items)

    def embed(batch: pd.DataFrame) -> pd.DataFrame:
        mask = batch["item_id"].isin(known).to_numpy()
        emb = embed_item_batch(tower, encode_items(batch, spec, mask))
        return pd.DataFrame({"row": batch["row"].to_numpy(), "embedding": list(emb)})

    # Through Arrow: Ray's pandas ingestion turns the ragged tags lists into tensors and fails.
    table = pa.Table.from_pandas(rows.assign(row=np.arange(len(rows))), preserve_index=False)
    out = ray.data.from_arrow(table).repartition(max(1, -(-len(rows) // chunk))).map_batches(
        embed, batch_format="pandas", batch_size=chunk).to_pandas()
    emb = np.zeros((len(rows), tower.dim), np.float32)
    emb[out["row"].to_numpy()] = np.stack(out["embedding"].to_numpy())
    return emb


def serving_memory_bytes(bundle: Bundle, index_bytes: int) -> int:
    """What one replica holds for this bundle: the HNSW index (``index_bytes``, its file
    size), the item embeddings, both models' weights and the ranker's per-item inputs
    (:func:`recsys_models.scoring.ranking_catalog`: item vector, id and category
    embeddings, creator + tag embeddings and the dense columns, float32) and the item
    neighbour table, if any."""
    weights = sum(t.numel() * t.element_size() for m in (bundle.two_tower, bundle.ranker)
                  for t in m.state_dict().values())
    per_item = bundle.dim + 4 * bundle.ranker.cfg.emb_dim + bundle.spec.item_dense_dim
    table = 0
    if bundle.neighbours is not None:  # CSR: float32 values, int32 columns, int32/64 offsets
        m = bundle.neighbours.matrix
        table = m.data.nbytes + m.indices.nbytes + m.indptr.nbytes
    return int(index_bytes + bundle.item_embeddings.nbytes + weights + table
               + 4 * per_item * len(bundle.catalog))


def save_bundle(bundle: Bundle, directory: Path | str) -> Path:
    """Writes the bundle under ``directory`` (created); returns the directory."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT, "version": bundle.version, "feature_service": bundle.feature_service,
        "snapshot_id": bundle.snapshot_id, "as_of": bundle.as_of.isoformat(),
        "spec": bundle.spec.to_dict(), "two_tower": bundle.two_tower.cfg.to_dict(),
        "ranker": bundle.ranker.cfg.to_dict(), "blend": bundle.blend.to_dict(),
        # build_threads is a build-time knob: bundles stay loadable by code without it.
        "hnsw": {k: v for k, v in vars(bundle.index.cfg).items() if k != "build_threads"},
        "metrics": bundle.metrics,
        "build_stats": bundle.build_stats,
    }
    (out / "bundle.json").write_text(json.dumps(meta, indent=2, default=str))
    torch.save({"two_tower": bundle.two_tower.state_dict(), "ranker": bundle.ranker.state_dict()},
               out / "weights.pt")
    bundle.catalog.to_parquet(out / "catalog.parquet", index=False)
    np.save(out / "item_embeddings.npy", bundle.item_embeddings)
    np.save(out / "known_items.npy", np.asarray(sorted(bundle.known_items), dtype=str))
    bundle.index.save(out / "index")
    if bundle.neighbours is not None:
        bundle.neighbours.save(out)
    return out


def _read_dir(path: Path) -> Bundle:
    meta_path = path / "bundle.json"
    if not meta_path.is_file():
        raise BundleFormatError(str(path), "bundle.json is missing")
    meta: dict[str, Any] = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise BundleFormatError(str(path), f"format {meta.get('format')} != {FORMAT}")
    spec = EncoderSpec.from_dict(meta["spec"])
    tt_cfg = replace(TwoTowerConfig(**meta["two_tower"]), sparse=False)
    rk_cfg = replace(RankerConfig(**meta["ranker"]), sparse=False)
    two_tower, ranker = TwoTowerModel(spec, tt_cfg), Ranker(spec, rk_cfg)
    weights = torch.load(path / "weights.pt", weights_only=True)
    try:
        two_tower.load_state_dict(weights["two_tower"])
    except RuntimeError as exc:  # e.g. an item tower that still read numeric item features
        raise BundleFormatError(str(path), "two-tower weights do not fit this code's "
                                f"architecture; retrain the bundle ({exc})") from exc
    ranker.load_state_dict(weights["ranker"])
    emb = np.load(path / "item_embeddings.npy")
    index = HnswIndex.load(path / "index", emb.shape[1], HnswConfig(**meta["hnsw"]))
    return Bundle(
        version=meta["version"], feature_service=meta["feature_service"],
        snapshot_id=meta["snapshot_id"], spec=spec, two_tower=two_tower.eval(),
        ranker=ranker.eval(), index=index, item_embeddings=emb,
        catalog=pd.read_parquet(path / "catalog.parquet"),
        known_items=frozenset(np.load(path / "known_items.npy").tolist()),
        as_of=pd.Timestamp(meta["as_of"]), blend=Blend(**meta["blend"]),
        metrics=dict(meta.get("metrics", {})),
        build_stats=dict(meta.get("build_stats", {})),
        neighbours=ItemNeighbours.load(path),
    )


def load_bundle(path_or_models_uri: str | Path, tracking_uri: str | None = None) -> Bundle:
    """Loads a bundle from a directory or an MLflow URI (``models:/<name>@<alias>``,
    ``models:/<name>/<version>``, ``runs:/...``) through the registered pyfunc model."""
    text = str(path_or_models_uri)
    if "://" not in text and ":/" not in text:
        return _read_dir(Path(text))
    import mlflow

    previous, previous_registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    if tracking_uri is not None:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(text)
    finally:
        mlflow.set_tracking_uri(previous)
        mlflow.set_registry_uri(previous_registry)
    inner = model.unwrap_python_model()
    bundle = getattr(inner, "bundle", None)
    if not isinstance(bundle, Bundle):
        raise BundleFormatError(text, "the MLflow model is not a recsys bundle pyfunc")
    return bundle
