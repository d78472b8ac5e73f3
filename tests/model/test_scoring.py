"""The one ranking path (recsys_models.scoring): serving's catalog-gathered scoring, Bundle.rank's
frame entry and the ranker's training graph give the same scores."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import torch

from recsys_models.ann import HnswIndex
from recsys_models.bundle import Bundle
from tests.model.snapshots import trained_bundle


def _training_graph(bundle: Bundle, users: pd.DataFrame, items: pd.DataFrame) -> np.ndarray:
    """The blended score of aligned rows through Ranker.forward, as training computes it:
    every row encoded on its own (encode_rows), the retrieval score from both towers."""
    from recsys_models.bundle import retrieval_scores
    from recsys_models.data import encode_rows
    from recsys_models.ranker import click_and_watch

    frame = bundle._item_rows(items).assign(
        user_id=users["user_id"].to_numpy(), user_history=users["user_history"].to_numpy(),
        clicked=0, watch_time_ms=np.nan, event_time=bundle.as_of)
    batch = encode_rows(frame, bundle.spec)
    batch["item_hash"] = np.where(frame["item_id"].isin(bundle.known_items), batch["item_hash"], 0)
    batch["retrieval_score"] = retrieval_scores(bundle.two_tower, batch)
    keys = ("user_hash", "history", "user_num", "item_hash", "category", "creator", "tags",
            "item_dense", "retrieval_score")
    with torch.no_grad():
        p_click, watch = click_and_watch(*bundle.ranker.eval()(
            {k: torch.as_tensor(batch[k]) for k in keys}))
    neighbour = (bundle.neighbours.score(batch["history"], batch["item_hash"])
                 if bundle.neighbours is not None else None)
    return bundle.blend.score(p_click, watch, batch["retrieval_score"], neighbour)


def test_bundle_rank_equals_the_training_graph() -> None:
    """Bundle.rank encodes each distinct user once and scores through the ranker's parts;
    the scores equal Ranker.forward's on rows encoded one by one, for one user broadcast and
    for aligned rows of several users with different histories (an evaluation frame)."""
    from recsys_models.neighbours import fit_neighbours
    from tests.model.snapshots import synthetic_case

    bundle = trained_bundle()
    ids = np.asarray(bundle.item_ids[:300])
    one = pd.DataFrame([{"user_id": "u1", "user_history": list(ids[:7])}])
    items = pd.DataFrame({"item_id": ids, "item_ctr_7d": np.linspace(0, 0.3, len(ids)),
                          "item_clicks_7d": np.arange(len(ids), dtype=float)})
    broadcast = one.loc[np.zeros(len(ids), dtype=np.int64)].reset_index(drop=True)
    np.testing.assert_allclose(bundle.rank(one, items)["score"],
                               _training_graph(bundle, broadcast, items), rtol=1e-5, atol=1e-6)
    # the same user id with two histories (two impressions at different times) and a second
    # user: three distinct encodings, each row scored with its own
    mixed = pd.DataFrame({"user_id": ["u1"] * 100 + ["u1"] * 100 + ["u2"] * 100,
                          "user_history": [list(ids[:7])] * 100 + [list(ids[7:9])] * 100
                          + [[]] * 100})
    with_neighbours = dataclasses.replace(
        bundle, neighbours=fit_neighbours(synthetic_case().train, bundle.spec),
        blend=dataclasses.replace(bundle.blend, neighbour_weight=10.0))
    for candidate in (bundle, with_neighbours):
        ranked = candidate.rank(mixed, items)
        np.testing.assert_allclose(ranked["score"], _training_graph(candidate, mixed, items),
                                   rtol=1e-5, atol=1e-6)
    assert (ranked["neighbour_score"] != 0).sum() > 10
    first, second = ranked["score"].iloc[:100].to_numpy(), ranked["score"].iloc[100:200]
    assert not np.allclose(first, second.to_numpy())  # the histories told apart


def test_serving_fast_path_equals_frame_encoding_and_bundle_rank() -> None:
    from recsys_models.data import encode_users
    from recsys_models.scoring import (
        USER_VECTOR,
        Query,
        catalog_rows,
        embed_user,
        encode_user,
        ranking_catalog,
        score_candidates,
    )

    bundle = trained_bundle()
    ids = np.asarray(bundle.item_ids[:200])
    features = {name: float(i) * 3.5 for i, name in enumerate(bundle.spec.user_features)}
    user = {"user_id": "u1", "user_history": [str(x) for x in ids[:5]] + ["", "gone"],
            **features}
    encoded = encode_user(bundle.spec, "u1", user["user_history"], features)
    expected = encode_users(pd.DataFrame([user]), bundle.spec)
    for key in ("user_hash", "history", "user_num"):
        np.testing.assert_array_equal(encoded[key], expected[key])
    np.testing.assert_allclose(embed_user(bundle, encoded),
                               bundle.encode_users(pd.DataFrame([user])), atol=1e-6)

    snapshot = pd.DataFrame({"item_ctr_7d": np.linspace(0, 0.3, len(ids)),
                             "item_clicks_7d": np.arange(len(ids), dtype=float)},
                            index=pd.Index(ids, name="item_id"))
    catalog = ranking_catalog(bundle, snapshot)
    assert ranking_catalog(bundle, snapshot) is catalog  # built once per snapshot
    rows = catalog_rows(catalog, list(ids))
    assert rows is not None and catalog_rows(catalog, ["not-an-item"]) is None
    other = encode_user(bundle.spec, "u2", [], {})
    one, two = score_candidates(bundle, catalog, [Query(encoded, rows), Query(other, rows[:50])])
    items = snapshot.rename_axis("item_id").reset_index()
    slow = bundle.rank(pd.DataFrame([user]), items)["score"]
    np.testing.assert_allclose(one, slow, rtol=1e-5, atol=1e-6)
    slow_two = bundle.rank(pd.DataFrame([{"user_id": "u2", "user_history": []}]), items[:50])
    np.testing.assert_allclose(two, slow_two["score"], rtol=1e-5, atol=1e-6)
    # The request path reuses the retrieval embedding (no second user-tower pass), and a
    # final score that weighs the retrieval score in gives Bundle.rank's scores too.
    assert USER_VECTOR in encoded
    blended = dataclasses.replace(bundle, blend=dataclasses.replace(bundle.blend,
                                                                    retrieval_weight=3.0))
    (reused,) = score_candidates(blended, ranking_catalog(blended, snapshot),
                                 [Query(encoded, rows)])
    np.testing.assert_allclose(reused, blended.rank(pd.DataFrame([user]), items)["score"],
                               rtol=1e-5, atol=1e-6)
    # ... and so does a final score with the item-item neighbour score in it.
    from recsys_models.neighbours import fit_neighbours
    from tests.model.snapshots import synthetic_case

    with_neighbours = dataclasses.replace(
        blended, neighbours=fit_neighbours(synthetic_case().train, bundle.spec),
        blend=dataclasses.replace(blended.blend, neighbour_weight=10.0))
    slow = with_neighbours.rank(pd.DataFrame([user]), items)
    assert (slow["neighbour_score"] != 0).sum() > 10
    (fast,) = score_candidates(with_neighbours, ranking_catalog(with_neighbours, snapshot),
                               [Query(encoded, rows)])
    np.testing.assert_allclose(fast, slow["score"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(fast, reused)


def test_tune_blend_picks_the_best_validation_weight_and_never_below_retrieval_order() -> None:
    from recsys_models.data import time_split
    from recsys_models.validation import tune_blend
    from tests.model.snapshots import synthetic_case

    case = synthetic_case()
    bundle = dataclasses.replace(trained_bundle())  # a copy: the cached bundle stays as it is
    fit_rows, val_rows, _ = time_split(case.train, 0.1)
    choice = tune_blend(bundle, fit_rows, val_rows, candidates=100, grid=(0.0, 1.0, 1e6),
                        max_users=60)
    assert choice is not None and choice.users == 60
    assert bundle.blend.retrieval_weight == choice.retrieval_weight
    assert bundle.blend.neighbour_weight == choice.neighbour_weight
    assert bundle.blend.click_logit == choice.click_logit
    best = choice.scores[(choice.retrieval_weight, choice.neighbour_weight, choice.click_logit)]
    assert best == max(choice.scores.values())
    assert best >= choice.scores[(1e6, 0.0, False)]  # retrieval order
    assert {n for _, n, _ in choice.scores} == {0.0}  # no neighbour table: its weight stays 0
    assert {c for _, _, c in choice.scores} == {False, True}

    from recsys_models.neighbours import fit_neighbours

    bundle.neighbours = fit_neighbours(fit_rows, bundle.spec)
    choice = tune_blend(bundle, fit_rows, val_rows, candidates=100, grid=(0.0, 1e6),
                        neighbour_grid=(0.0, 1.0, 1e7), max_users=60)
    assert choice is not None and len(choice.scores) == 12
    assert bundle.blend.neighbour_weight == choice.neighbour_weight
    assert choice.scores[(choice.retrieval_weight, choice.neighbour_weight,
                          choice.click_logit)] >= choice.scores[(1e6, 0.0, False)]


def test_per_query_item_features_and_appended_items_rank_like_bundle_rank() -> None:
    """Serving's path: a catalog encoded once per bundle without item features, each query
    carrying its candidates' features; items added later are appended, not re-encoded."""
    from recsys_models.scoring import (
        Query,
        catalog_rows,
        encode_user,
        ranking_catalog,
        score_candidates,
    )

    shared = trained_bundle()  # a copy with its own index: add_items must not touch it
    index = HnswIndex.build(shared.item_ids, shared.item_embeddings, shared.index.cfg)
    bundle = dataclasses.replace(shared, index=index)
    catalog = ranking_catalog(bundle)
    assert ranking_catalog(bundle) is catalog
    new = bundle.catalog.iloc[:3].assign(item_id=["fresh-a", "fresh-b", "fresh-c"])
    bundle.add_items(new)
    grown = ranking_catalog(bundle)
    assert grown is not catalog and len(grown.positions) == len(catalog.positions) + 3
    ids = [*map(str, bundle.item_ids[:40]), "fresh-b", "fresh-a"]
    names = bundle.spec.item_features
    raw = np.arange(len(ids) * len(names), dtype=np.float64).reshape(len(ids), len(names))
    rows = catalog_rows(grown, ids)
    assert rows is not None
    user = {"user_id": "u1", "user_history": ids[:4]}
    encoded = encode_user(bundle.spec, "u1", user["user_history"], {})
    fast = score_candidates(bundle, grown, [Query(encoded, rows, raw)])[0]
    items = pd.DataFrame({"item_id": ids, **{n: raw[:, j] for j, n in enumerate(names)}})
    slow = bundle.rank(pd.DataFrame([user]), items)["score"]
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-6)
    del bundle.__dict__["_ranking_catalog"]  # the whole catalog encoded at once
    full = ranking_catalog(bundle)
    assert full.positions == grown.positions
    for key, tensor in full.tensors.items():
        np.testing.assert_allclose(grown.tensors[key].numpy(), tensor.numpy(), atol=1e-6)


def test_serving_adds_the_neighbour_candidates_the_bundle_lists() -> None:
    """POST /recommend's candidates: retrieval, then the bundle's item-item neighbours of the
    user's history (as Bundle.rank_candidates offline), then the cold-start lists."""
    from recsys_models.neighbours import fit_neighbours
    from recsys_models.scoring import encode_user
    from recsys_platform.serving.bundle_manager import BundleManager
    from recsys_platform.serving.item_features import ItemFeatureCache, ItemRows
    from recsys_platform.serving.metrics import ServingMetrics
    from recsys_platform.serving.recommender import Recommender
    from recsys_platform.serving.schemas import RecommendRequest
    from tests.model.snapshots import synthetic_case

    case = synthetic_case()
    bundle = dataclasses.replace(trained_bundle(),
                                 neighbours=fit_neighbours(case.train, trained_bundle().spec))
    liked = case.train.loc[case.train["clicked"] == 1, "item_id"]
    history = [str(x) for x in liked.value_counts().index[:5]]

    class Source:
        items = ItemFeatureCache(lambda ids: [(("c", 0.0), ("k", 0.0)) for _ in ids],
                                 ("creator_id", "category"))

        def user_features(self, user_id: str) -> dict[str, object]:
            return {"user_history": history}

        def item_rows(self, item_ids: list[str]) -> ItemRows:
            return self.items.rows(item_ids)

        def cold_start_lists(self) -> dict[str, list[str]]:
            return {"trending": [], "fresh": [], "popular": []}

        def has_item_features(self) -> bool:
            return True

    manager = BundleManager(lambda: "1", lambda v: bundle, lambda b: None, ServingMetrics())
    manager.refresh()
    rec = Recommender(manager, Source(), None, ServingMetrics())
    prepared = rec.prepare(RecommendRequest(user_id="u1", k=10))
    extra = [c.item_id for c in prepared.candidates if c.source == "neighbours"]
    listed = bundle.neighbour_candidates(encode_user(bundle.spec, "u1", history, {})["history"][0])
    retrieved = {c.item_id for c in prepared.candidates if c.source == "retrieval"}
    assert extra and extra == [x for x in listed if x not in retrieved and x not in history]


def test_a_saved_bundle_keeps_its_neighbour_table_and_blend(tmp_path: object) -> None:
    from pathlib import Path

    from recsys_models.bundle import load_bundle, save_bundle
    from recsys_models.neighbours import fit_neighbours
    from tests.model.snapshots import synthetic_case

    shared = trained_bundle()
    bundle = dataclasses.replace(
        shared, neighbours=fit_neighbours(synthetic_case().train, shared.spec),
        blend=dataclasses.replace(shared.blend, retrieval_weight=3.0, neighbour_weight=1.0))
    loaded = load_bundle(save_bundle(bundle, Path(str(tmp_path)) / "b"))
    assert loaded.neighbours is not None and loaded.blend == bundle.blend
    user = pd.DataFrame([{"user_id": "u1", "user_history": list(bundle.item_ids[:6])}])
    items = pd.DataFrame({"item_id": bundle.item_ids[:100]})
    np.testing.assert_allclose(loaded.rank(user, items)["score"], bundle.rank(user, items)["score"],
                               rtol=1e-5, atol=1e-6)
