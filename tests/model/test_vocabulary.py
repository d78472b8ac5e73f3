"""A model whose id tables are sized from its training rows trains, saves, loads and serves."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from recsys_models.bundle import load_bundle, save_bundle
from recsys_models.train import fit_local
from tests.model.snapshots import SMALL_TRAIN, make_bundle, synthetic_case


def test_a_vocabulary_sized_model_trains_saves_and_scores_the_same(tmp_path: Path) -> None:
    case = synthetic_case()
    spec = dataclasses.replace(case.spec, item_vocab_cap=500, user_vocab_cap=300,
                               tail_buckets=64).with_vocabularies(case.train)
    assert len(spec.item_vocab) == 500 and spec.item_buckets == 1 + 500 + 64
    assert len(spec.user_vocab) == 300 and spec.user_buckets == 1 + 300 + 64
    codes = spec.item_codes.encode(np.array(spec.item_vocab, dtype=object))
    assert len(set(codes.tolist())) == 500  # no two frequent items share a row
    sized = dataclasses.replace(case, spec=spec)
    models = fit_local(case.train, case.items, spec,
                       dataclasses.replace(SMALL_TRAIN, epochs=1, ranker_epochs=1))
    assert models.two_tower.item_tower.item_emb.num_embeddings == spec.item_buckets
    bundle = make_bundle(sized, models.two_tower, models.ranker, "vocab")
    loaded = load_bundle(save_bundle(bundle, tmp_path / "bundle"))
    assert loaded.spec == spec and loaded.spec.item_vocab == spec.item_vocab
    user = pd.DataFrame([{"user_id": spec.user_vocab[0],
                          "user_history": list(spec.item_vocab[:5]) + ["never-seen"]}])
    items = pd.DataFrame({"item_id": [str(i) for i in bundle.item_ids[:100]]})
    scores = loaded.rank(user, items)["score"].to_numpy()
    assert np.isfinite(scores).all()
    np.testing.assert_allclose(scores, bundle.rank(user, items)["score"], rtol=1e-5, atol=1e-6)
