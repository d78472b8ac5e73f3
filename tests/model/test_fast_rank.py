"""The serving ranker path gives exactly the scores of Bundle.rank."""

from __future__ import annotations

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
