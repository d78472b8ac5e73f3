"""The serving ranker path gives exactly the scores of Bundle.rank."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from recsys_models.fast_rank import rank_aligned
from tests.model.snapshots import trained_bundle


def test_fast_rank_equals_bundle_rank() -> None:
    bundle = trained_bundle()
    ids = np.asarray(bundle.item_ids[:300])
    one = pd.DataFrame([{"user_id": "u1", "user_history": list(ids[:7])}])
    items = pd.DataFrame({"item_id": ids, "item_ctr_7d": np.linspace(0, 0.3, len(ids)),
                          "item_clicks_7d": np.arange(len(ids), dtype=float)})
    slow = bundle.rank(one, items)
    fast = rank_aligned(bundle, one, items)
    np.testing.assert_allclose(fast["score"], slow["score"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fast["p_click"], slow["p_click"], rtol=1e-5, atol=1e-6)

    two = pd.concat([one.assign(user_id="u1")] * 150 + [one.assign(user_id="u2",
                    user_history=[list(ids[50:60])])] * 150, ignore_index=True)
    np.testing.assert_allclose(rank_aligned(bundle, two, items)["score"],
                               bundle.rank(two, items)["score"], rtol=1e-5, atol=1e-6)


def test_serving_fast_path_equals_frame_encoding_and_bundle_rank() -> None:
    from recsys_models.data import encode_users
    from recsys_models.fast_rank import (
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
    assert choice.scores[choice.retrieval_weight] == max(choice.scores.values())
    assert choice.scores[choice.retrieval_weight] >= choice.scores[1e6]  # retrieval order
