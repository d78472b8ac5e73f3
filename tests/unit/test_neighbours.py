"""The item-item neighbour table: EASE weights looked up from the models' encoded ids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from recsys_models.data import EncoderSpec, encode_items, encode_users
from recsys_models.neighbours import ItemNeighbours, NeighbourConfig, fit_neighbours

SPEC = EncoderSpec(categories=("c",), user_buckets=100, item_buckets=1_000,
                   creator_buckets=10, tag_buckets=10)


def _rows() -> pd.DataFrame:
    """Users who engage with "a" also engage with "b"; "c" goes with "d"; "z" is disliked."""
    pairs = [(f"u{i}", x) for i in range(20) for x in ("a", "b")]
    pairs += [(f"v{i}", x) for i in range(20) for x in ("c", "d")]
    pairs += [("w", "a"), ("w", "c"), ("w", "e")]
    rows = pd.DataFrame(pairs, columns=["user_id", "item_id"]).assign(clicked=1)
    disliked = pd.DataFrame({"user_id": [f"u{i}" for i in range(20)], "item_id": "z",
                             "clicked": 0})
    return pd.concat([rows, disliked], ignore_index=True)


def _score(table: ItemNeighbours, history: list[str], items: list[str]) -> np.ndarray:
    users = encode_users(pd.DataFrame({"user_id": ["q"] * len(items),
                                       "user_history": [history] * len(items)}), SPEC)
    frame = pd.DataFrame({"item_id": items, "category": "c", "creator_id": "k",
                          "tags": [[]] * len(items)})
    return table.score(users["history"], encode_items(frame, SPEC)["item_hash"])


def test_co_engaged_items_score_and_others_do_not() -> None:
    table = fit_neighbours(_rows(), SPEC, NeighbourConfig(lam=1.0, k=2))
    b, d, z, new = _score(table, ["a"], ["b", "d", "z", "never-seen"])
    assert b > 0.1 and d <= 0.0 and z == 0.0 and new == 0.0
    # a history of two sums their weights; padding and an empty history add nothing
    both = _score(table, ["a", "c"], ["b", "d"])
    assert both[0] == b and both[1] > 0.1
    assert (_score(table, [], ["b", "d"]) == 0).all()


def test_size_is_bounded_by_items_and_neighbours() -> None:
    table = fit_neighbours(_rows(), SPEC, NeighbourConfig(lam=1.0, k=1, max_items=3))
    assert table.matrix.nnz <= 3  # the 3 most engaged items, 1 neighbour each


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    table = fit_neighbours(_rows(), SPEC, NeighbourConfig(lam=1.0, k=2))
    table.save(tmp_path)
    loaded = ItemNeighbours.load(tmp_path)
    assert loaded is not None and loaded.cfg == table.cfg
    assert (loaded.matrix != table.matrix).nnz == 0
    assert ItemNeighbours.load(tmp_path / "missing") is None


def test_top_lists_a_historys_best_neighbours_as_item_ids() -> None:
    table = fit_neighbours(_rows(), SPEC, NeighbourConfig(lam=1.0, k=2))
    history = encode_users(pd.DataFrame({"user_id": ["q"], "user_history": [["a", "c"]]}),
                           SPEC)["history"][0]
    ids, scores = table.top(history, 5)
    assert {"b", "d"} <= set(ids) and "a" not in ids[:2] and (np.diff(scores) <= 0).all()
    assert len(table.top(history, 1)[0]) == 1 and len(table.top(history[:0], 5)[0]) == 0
