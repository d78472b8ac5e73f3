"""A tiny real bundle for the serving-logic tests, and faults injected into its real parts.

:func:`tiny_bundle` builds a :class:`~recsys_models.bundle.Bundle` the way training does
(``build_bundle``: item tower over the catalog, HNSW index), from untrained towers and ranker
seeded per version, over ``i0`` .. ``i29`` (creator ``cr<n % 3>``, category ``cat<n % 2>``).
Serving scores it through the one ranking path like any other bundle; tests compare what
serving returns with the bundle's own API (``search``, ``rank``).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from recsys_core import features as F
from recsys_models.bundle import Bundle, build_bundle
from recsys_models.data import EncoderSpec
from recsys_models.ranker import Ranker, RankerConfig
from recsys_models.scoring import embed_user, encode_user
from recsys_models.two_tower import TwoTowerConfig, TwoTowerModel

ITEMS = 30
USER_FEATURES = {"user_ctr_7d": 0.1}  # what the tests' feature source returns for a known user
AS_OF = pd.Timestamp("2026-06-01", tz="UTC")


def catalog(n: int = ITEMS) -> pd.DataFrame:
    return pd.DataFrame({
        "item_id": [f"i{i}" for i in range(n)],
        "category": [f"cat{i % 2}" for i in range(n)],
        "creator_id": [f"cr{i % 3}" for i in range(n)],
        "tags": [[f"t{i % 4}"] for i in range(n)],
        "duration_ms": [1_000.0 * (i + 1) for i in range(n)],
        "published_at": [AS_OF - pd.Timedelta(hours=i + 1) for i in range(n)],
    })


def tiny_bundle(version: str, seed: int | None = None) -> Bundle:
    """An untrained bundle; the seed (default: from the version) sets its weights, so two
    versions rank differently. The click head is randomized (an untrained ranker's is zero,
    which would only repeat retrieval order)."""
    torch.manual_seed(seed if seed is not None else sum(map(ord, version)))
    items = catalog()
    spec = EncoderSpec.from_catalog(items, ["user_ctr_7d"], user_buckets=64, item_buckets=256,
                                    creator_buckets=16, tag_buckets=16)
    two_tower = TwoTowerModel(spec, TwoTowerConfig(dim=8, id_dim=8, meta_dim=4, hidden=16))
    ranker = Ranker(spec, RankerConfig(emb_dim=4, hidden=8, sparse=False))
    nn.init.normal_(ranker.click_head.weight)
    return build_bundle(two_tower.eval(), ranker.eval(), spec, items, set(items["item_id"]),
                        version=version, feature_service=F.RECOMMENDER_V1,
                        snapshot_id=f"tiny-{version}", as_of=AS_OF)


def retrieval_order(bundle: Bundle, user_id: str, history: list[str],
                    features: dict[str, Any], n: int) -> list[str]:
    """The bundle's top-``n`` retrieval for a user, through its public API."""
    ids, _ = bundle.search(embed_user(bundle, encode_user(bundle.spec, user_id, history,
                                                          features)), n)
    return [str(x) for x in ids[0]]


def ranked_order(bundle: Bundle, user_id: str, history: list[str], features: dict[str, Any],
                 item_ids: list[str]) -> list[str]:
    """``item_ids`` by the bundle's blended score (``Bundle.rank``), best first."""
    user = pd.DataFrame([{"user_id": user_id, "user_history": history, **features}])
    ranked = bundle.rank(user, pd.DataFrame({"item_id": item_ids}))
    order = np.argsort(-ranked["score"].to_numpy(), kind="stable")
    return [item_ids[i] for i in order]


def break_ranker(bundle: Bundle) -> None:
    """The ranker raises on every call from now on (a fault after the smoke test)."""
    def explode(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("ranker exploded")

    bundle.ranker.head = explode  # type: ignore[method-assign]


@torch.no_grad()
def poison_items(bundle: Bundle, item_ids: list[str]) -> None:
    """NaN ranker embedding rows for ``item_ids`` (a broken embedding row): the ranker scores
    those items NaN; retrieval (the item tower's own tables) is unaffected."""
    rows = torch.from_numpy(bundle.spec.item_codes.encode_strings(item_ids))
    bundle.ranker.item_emb.weight[rows] = float("nan")


def record_rankings(bundle: Bundle, calls: list[str]) -> None:
    """Appends the bundle's version to ``calls`` on each ranker pass."""
    bundle.ranker.bottom.register_forward_hook(lambda *_: calls.append(bundle.version))


def gate_ranker(bundle: Bundle, gate: threading.Event) -> None:
    """Each ranker pass waits until ``gate`` is set (a stuck ranking thread)."""
    def wait(*_: Any) -> None:
        assert gate.wait(30)

    bundle.ranker.bottom.register_forward_pre_hook(wait)
