"""The item-item neighbour table: EASE weights looked up from the models' encoded ids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from recsys_models.data import EncoderSpec, encode_items, encode_users
from recsys_models.neighbours import (
    ItemNeighbours,
    NeighbourConfig,
    fit_neighbours,
    recency_weights,
)

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


def test_recency_weights_decay_with_position() -> None:
    assert np.allclose(recency_weights(np.arange(4), 0.5), [1.0, 0.5, 0.25, 0.125])
    assert np.allclose(recency_weights(np.arange(3), 1.0), 1.0)


def test_the_newest_history_item_weighs_most() -> None:
    flat = fit_neighbours(_rows(), SPEC, NeighbourConfig(lam=1.0, k=2, decay=1.0,
                                                         transition_weight=0.0))
    b, d = _score(flat, ["a", "c"], ["b", "d"])
    assert np.isclose(b, d)  # order-blind: "a" and "c" are alike in the data
    recent = fit_neighbours(_rows(), SPEC, NeighbourConfig(lam=1.0, k=2, decay=0.5,
                                                           transition_weight=0.0))
    b, d = _score(recent, ["a", "c"], ["b", "d"])  # "a" is the newest
    assert b == 1.0 and np.isclose(d, 0.5)
    d, b = _score(recent, ["c", "a"], ["d", "b"])
    assert d == 1.0 and np.isclose(b, 0.5)


def _sequences() -> pd.DataFrame:
    """Every user engages with "a", then "b", then "c" (one each per day), in that order."""
    rows = [(f"u{i}", item, pd.Timestamp("2026-01-01", tz="UTC") + pd.Timedelta(days=day))
            for i in range(30) for day, item in enumerate(("a", "b", "c"))]
    rows += [(f"v{i}", item, pd.Timestamp("2026-01-01", tz="UTC") + pd.Timedelta(days=day))
             for i in range(30) for day, item in enumerate(("d", "e"))]
    return pd.DataFrame(rows, columns=["user_id", "item_id", "event_time"]).assign(clicked=1)


def test_the_transition_model_learns_what_comes_next() -> None:
    cfg = NeighbourConfig(lam=1.0, k=4, transition_weight=1.0, horizon=1, transition_lam=1.0)
    table = fit_neighbours(_sequences(), SPEC, cfg)
    after_a, after_b, after_d = (_score(table, [h], ["a", "b", "c", "e"]) for h in "abd")
    assert after_a[1] == after_a.max() > after_a[2]  # after "a" comes "b", not (yet) "c"
    assert after_b[2] == after_b.max() > 0 and after_b[0] == 0  # never back to "a"
    assert after_d[3] == after_d.max() > 0 and after_d[:3].max() == 0
    # EASE alone is order-blind: "b" is as much "a"'s neighbour as the reverse
    ease = fit_neighbours(_sequences(), SPEC, NeighbourConfig(lam=1.0, k=4,
                                                              transition_weight=0.0))
    assert _score(ease, ["b"], ["a"])[0] > 0


def test_a_table_saved_before_recency_loads_order_blind(tmp_path: Path) -> None:
    table = fit_neighbours(_rows(), SPEC, NeighbourConfig(lam=1.0, k=2, transition_weight=0.0))
    table.save(tmp_path)
    with np.load(tmp_path / "neighbours.npz") as f:
        old = {k: f[k] for k in f.files if k not in (
            "cfg_decay", "cfg_transition_weight", "cfg_horizon", "cfg_transition_lam",
            "cfg_max_examples")}
    np.savez(tmp_path / "neighbours.npz", **old)
    loaded = ItemNeighbours.load(tmp_path)
    assert loaded is not None and loaded.cfg.decay == 1.0
    assert loaded.cfg.transition_weight == 0.0
