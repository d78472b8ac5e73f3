"""The bundle's catalog embedding (chunked or on Ray Data), build stats and saved index."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from recsys_models.bundle import embed_catalog, load_bundle, save_bundle
from tests.model.snapshots import trained_bundle


def test_ray_data_and_chunked_embeddings_equal_the_bundles(ray_cluster: Any) -> None:
    bundle = trained_bundle()
    rows = bundle.catalog
    chunked = embed_catalog(bundle.two_tower, bundle.spec, rows, bundle.known_items, chunk=97,
                            use_ray=False)
    on_ray = embed_catalog(bundle.two_tower, bundle.spec, rows, bundle.known_items, chunk=4096,
                           use_ray=True)
    np.testing.assert_allclose(chunked, bundle.item_embeddings, atol=1e-6)
    np.testing.assert_allclose(on_ray, bundle.item_embeddings, atol=1e-6)


def test_build_stats_and_the_index_are_saved_with_the_bundle(tmp_path: Path) -> None:
    bundle = trained_bundle()
    assert bundle.build_stats["items"] == len(bundle.catalog)
    assert bundle.build_stats["index_build_s"] >= 0 and bundle.build_stats["embed_items_s"] >= 0
    loaded = load_bundle(save_bundle(bundle, tmp_path / "b"))
    assert loaded.build_stats == bundle.build_stats
    query = bundle.item_embeddings[:3]
    np.testing.assert_array_equal(loaded.search(query, 10)[0], bundle.search(query, 10)[0])
