"""Small deterministic checks of the models' building blocks (no services)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from recsys_core import features as F
from recsys_models.ann import HnswIndex, recall_vs_exact
from recsys_models.bundle import build_bundle, load_bundle, save_bundle
from recsys_models.data import EncoderSpec, encode_rows
from recsys_models.evaluate import popularity_recommender, retrieval_metrics
from recsys_models.hashing import hash_ids
from recsys_models.ranker import Ranker, RankerConfig, ranker_loss
from recsys_models.registry import gate, metric_key
from recsys_models.train import TrainConfig, fit_local, to_tensors
from recsys_models.two_tower import RetrievalTask, TwoTowerConfig, TwoTowerModel
from tests.model.snapshots import synthetic_case, trained_bundle

SPEC = EncoderSpec(user_buckets=100, item_buckets=100, creator_buckets=10, tag_buckets=10,
                   categories=("a", "b"))


def _rows(n: int = 8, watch: float = np.nan) -> pd.DataFrame:
    return pd.DataFrame({
        "user_id": [f"u{i % 3}" for i in range(n)], "item_id": [f"i{i}" for i in range(n)],
        "event_time": pd.Timestamp("2026-11-01", tz="UTC"), "clicked": [i % 2 for i in range(n)],
        "watch_time_ms": watch, "user_history": [["i1", "i2"]] * n,
        "category": ["a", "b"] * (n // 2), "creator_id": "c1", "tags": [["t1"]] * n,
        "duration_ms": 30_000.0, "item_age_days": 3.0,
    })


def test_hash_ids_are_stable_across_processes_and_reserve_zero() -> None:
    here = hash_ids(np.array(["u1", "u2", None, ""], dtype=object), 1000, "u:")
    code = ("import numpy as np; from recsys_models.hashing import hash_ids; "
            "print(hash_ids(np.array(['u1', 'u2'], dtype=object), 1000, 'u:').tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str([int(x) for x in here[:2]])
    assert here[2] == here[3] == 0 and (here[:2] > 0).all()


def test_retrieval_metrics_match_hand_computation() -> None:
    recs = np.array([["a", "x", "b"], ["y", "z", "c"]], dtype=object)
    relevant = [{"a", "b"}, {"q"}]
    m = retrieval_metrics(recs, relevant, ks=(1, 3))
    assert m["recall@1"] == pytest.approx((0.5 + 0.0) / 2)
    assert m["recall@3"] == pytest.approx((1.0 + 0.0) / 2)
    ideal = 1 + 1 / np.log2(3)
    assert m["ndcg@3"] == pytest.approx(((1 + 1 / np.log2(4)) / ideal + 0.0) / 2)


def test_popularity_excludes_the_users_training_items() -> None:
    train = pd.DataFrame({"user_id": ["u1", "u2", "u2", "u3"], "item_id": ["a", "a", "b", "a"],
                          "clicked": [1, 1, 1, 1]})
    recs = popularity_recommender(train)(pd.DataFrame({"user_id": ["u1"]}), 2, {"u1": {"a"}})
    assert list(recs[0]) == ["b", None]


def test_gate_refuses_only_beyond_tolerance() -> None:
    champion = {"two_tower/recall@50": 0.30, "ranker/auc": 0.80}
    assert gate({"two_tower/recall@50": 0.298, "ranker/auc": 0.80}, champion, 0.01) == []
    reasons = gate({"two_tower/recall@50": 0.20, "ranker/auc": 0.80}, champion, 0.01)
    assert len(reasons) == 1 and "recall@50" in reasons[0]
    assert gate({"two_tower/recall@50": float("nan"), "ranker/auc": 0.9}, champion, 0.01)
    assert metric_key("recall@50") == "recall_at_50"


def test_retrieval_loss_masks_duplicate_items_and_applies_logq() -> None:
    torch.manual_seed(0)
    batch = to_tensors(encode_rows(_rows(), SPEC, {"i0": -1.0}, -5.0))
    batch["item_hash"][1] = batch["item_hash"][0]  # the same item twice in the batch
    model = TwoTowerModel(SPEC, TwoTowerConfig(dim=8, id_dim=8, meta_dim=4, hidden=8,
                                               sparse=False, id_dropout=0.0))
    with_q = RetrievalTask(model, model.cfg)(batch)
    without = RetrievalTask(model, TwoTowerConfig(**{**model.cfg.to_dict(),
                                                     "logq_correction": False}))(batch)
    assert torch.isfinite(with_q) and torch.isfinite(without) and with_q != without


def test_ranker_loss_is_finite_when_watch_time_is_never_known() -> None:
    ranker = Ranker(SPEC, RankerConfig(emb_dim=4, hidden=8, sparse=False))
    batch = to_tensors(encode_rows(_rows(watch=np.nan), SPEC))
    batch["retrieval_score"] = torch.zeros(len(batch["clicked"]))
    assert batch["watch_mask"].sum() == 0
    loss = ranker_loss(ranker, batch, 0.5)
    loss.backward()
    assert torch.isfinite(loss)
    assert ranker.watch_head.weight.grad is not None
    assert float(ranker.watch_head.weight.grad.abs().sum()) == 0.0  # masked out


def test_hnsw_recall_against_exact_and_add_items() -> None:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(3000, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    index = HnswIndex.build(np.array([f"i{i}" for i in range(3000)], dtype=object), emb)
    assert recall_vs_exact(index, emb, emb[:200], 100) >= 0.95
    index.add(np.array(["new"], dtype=object), emb[:1] * -1)
    ids, _ = index.search(-emb[:1], 1)
    assert ids[0, 0] == "new"


def test_bundle_directory_round_trip_and_rank_shapes(tmp_path: Path) -> None:
    case = synthetic_case()
    bundle = trained_bundle()
    loaded = load_bundle(save_bundle(bundle, tmp_path / "b"))
    rows = case.holdout.head(50)
    a = bundle.rank(rows, rows[["item_id"]])
    b = loaded.rank(rows, rows[["item_id"]])
    pd.testing.assert_frame_equal(a, b)
    assert list(a.columns) == ["user_id", "item_id", "p_click", "watch_time_ms_pred", "score",
                               "retrieval_score", "neighbour_score"]
    one_user = loaded.rank(rows.iloc[[0]], rows[["item_id"]])  # broadcast one user
    assert len(one_user) == 50 and (one_user["user_id"] == rows.iloc[0]["user_id"]).all()
    with pytest.raises(ValueError, match="aligned"):
        loaded.rank(rows.head(2), rows[["item_id"]].head(3))
    recs = loaded.recommend(rows.drop_duplicates("user_id").head(3), k=5)
    assert recs.groupby("user_id").size().eq(5).all()


def test_training_is_reproducible_for_a_seed() -> None:
    case = synthetic_case()
    rows = case.train.head(4000)
    cfg = TrainConfig(epochs=1, batch_size=256,
                      two_tower=TwoTowerConfig(dim=8, id_dim=8, meta_dim=4, hidden=8))
    a = fit_local(rows, case.items, case.spec, cfg)
    b = fit_local(rows, case.items, case.spec, cfg)
    c = fit_local(rows, case.items, case.spec, TrainConfig(**{**cfg.__dict__, "seed": 8}))
    for key, value in a.two_tower.state_dict().items():
        assert torch.equal(value, b.two_tower.state_dict()[key]), key
    def metrics(history: list[dict[str, float]]) -> list[dict[str, float]]:
        return [{k: v for k, v in h.items() if k != "epoch_s"} for h in history]  # not wall time

    assert metrics(a.history) == metrics(b.history)
    assert not torch.equal(a.two_tower.state_dict()["item_tower.mlp.0.weight"],
                           c.two_tower.state_dict()["item_tower.mlp.0.weight"])


def test_index_embeddings_match_the_item_tower_on_training_rows() -> None:
    # Training rows carry numeric item features (windowed counts from the Feast join); the
    # catalog rows build_bundle embeds into the index do not. The item tower must give an item
    # the same vector in both places, or retrieval searches vectors it was never trained on.
    spec = EncoderSpec(user_buckets=100, item_buckets=100, creator_buckets=10, tag_buckets=10,
                       categories=("a", "b"), item_features=("item_clicks_7d", "item_ctr_7d"))
    rows = _rows().assign(item_clicks_7d=np.arange(8) * 50.0, item_ctr_7d=0.4)
    torch.manual_seed(0)
    model = TwoTowerModel(spec, TwoTowerConfig(dim=8, id_dim=8, meta_dim=4, hidden=16)).eval()
    as_of = pd.Timestamp("2026-11-01", tz="UTC")
    catalog = rows[["item_id", "category", "creator_id", "tags", "duration_ms"]].assign(
        published_at=as_of - pd.Timedelta(days=3))
    bundle = build_bundle(model, Ranker(spec, RankerConfig()), spec, catalog,
                          set(rows["item_id"]), version="t", feature_service=F.RECOMMENDER_V1,
                          snapshot_id="t", as_of=as_of)
    with torch.no_grad():
        trained_on = model.embed_items(to_tensors(encode_rows(rows, spec))).numpy()
    order = pd.Index(rows["item_id"]).get_indexer(bundle.item_ids)
    np.testing.assert_allclose(bundle.item_embeddings, trained_on[order], atol=1e-5)
