"""The sequential user tower and its training task on tiny deterministic data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from recsys_models.data import EncoderSpec, time_split
from recsys_models.sequences import engaged_mask, pit_histories
from recsys_models.train import TrainConfig, _Progress, fit_local, lr_factor
from recsys_models.two_tower import (
    RetrievalTask,
    TwoTowerConfig,
    TwoTowerModel,
    UserTower,
    use_full_softmax,
)

SPEC = EncoderSpec(user_buckets=50, item_buckets=200, creator_buckets=10, tag_buckets=10,
                   categories=("c0", "c1"))


def _batch(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "user_hash": torch.randint(1, 50, (n,), generator=g),
        "history": torch.randint(0, 200, (n, SPEC.history_length), generator=g),
        "user_num": torch.zeros(n, 0),
        "item_hash": torch.tensor([3, 5, 3, 9])[:n],
        "category": torch.zeros(n, dtype=torch.long), "creator": torch.ones(n, dtype=torch.long),
        "tags": torch.zeros(n, 4, dtype=torch.long), "item_dense": torch.zeros(n, 2),
        "log_q": torch.log(torch.tensor([0.5, 0.25, 0.5, 0.25]))[:n],
    }


def test_sampled_softmax_matches_a_hand_computation_with_logq_and_duplicate_masking() -> None:
    cfg = TwoTowerConfig(dim=8, id_dim=8, meta_dim=4, hidden=8, sparse=False, id_dropout=0.0,
                         temperature=0.2, seq_dropout=0.0)
    torch.manual_seed(0)
    model = TwoTowerModel(SPEC, cfg).eval()
    b = _batch(4)
    loss = RetrievalTask(model, cfg)(b)
    u, v = model.embed_users(b), model.embed_items(b)
    logits = u @ v.T / 0.2 - b["log_q"][None, :]
    for i in range(4):
        for j in range(4):
            if i != j and b["item_hash"][i] == b["item_hash"][j]:
                logits[i, j] = -float("inf")  # the same item elsewhere is not a negative
    expected = F.cross_entropy(logits, torch.arange(4))
    torch.testing.assert_close(loss, expected)


def test_full_softmax_matches_a_hand_computation_over_the_catalog() -> None:
    cfg = TwoTowerConfig(dim=8, id_dim=8, meta_dim=4, hidden=8, sparse=False, id_dropout=0.0,
                         temperature=0.2, seq_dropout=0.0, softmax="full")
    torch.manual_seed(0)
    model = TwoTowerModel(SPEC, cfg).eval()
    b = _batch(4)
    catalog = {"item_hash": torch.tensor([3, 5, 9, 11, 12]),
               "category": torch.tensor([0, 1, 0, 1, 0]),
               "creator": torch.ones(5, dtype=torch.long),
               "tags": torch.zeros(5, 4, dtype=torch.long), "item_dense": torch.zeros(5, 2)}
    loss = RetrievalTask(model, cfg, catalog, full=True)(b)
    u, c = model.embed_users(b), model.embed_items(catalog)
    expected = []
    for i in range(4):  # a softmax over the catalog, the target being the positive's catalog row
        logits = (c @ u[i]) / 0.2
        target = int((catalog["item_hash"] == b["item_hash"][i]).nonzero()[0, 0])
        expected.append(-torch.log_softmax(logits, 0)[target])
    torch.testing.assert_close(loss, torch.stack(expected).mean())


def test_softmax_switches_to_sampled_above_the_catalog_size_setting() -> None:
    cfg = TwoTowerConfig(softmax="auto", full_softmax_max_items=1000)
    assert use_full_softmax(cfg, 1000) and not use_full_softmax(cfg, 1001)
    assert not use_full_softmax(TwoTowerConfig(softmax="sampled"), 10)
    assert use_full_softmax(TwoTowerConfig(softmax="full"), 10**7)


def test_user_tower_reads_newest_first_and_ignores_padding() -> None:
    cfg = TwoTowerConfig(dim=8, id_dim=8, hidden=8, sparse=False, seq_dropout=0.0)
    torch.manual_seed(1)
    tower = UserTower(SPEC, cfg).eval()
    h = torch.zeros(2, SPEC.history_length, dtype=torch.long)
    h[0, :2] = torch.tensor([7, 4])  # newest 7
    h[1, :2] = torch.tensor([4, 7])  # newest 4
    a = tower.encode_sequence(h)
    assert not torch.allclose(a[0], a[1])  # order matters
    longer = h.clone()
    longer[:, 5:] = 0  # still padding: same vectors
    torch.testing.assert_close(tower.encode_sequence(longer), a)
    empty = tower.encode_sequence(torch.zeros(1, SPEC.history_length, dtype=torch.long))
    assert torch.isfinite(empty).all()


def _pattern_rows(n_users: int = 120, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each user engages with random items, and item ``A<k>`` is always followed by ``B<k>``."""
    rng = np.random.default_rng(seed)
    items = [f"r{i}" for i in range(60)]
    rows = []
    t0 = pd.Timestamp("2026-01-01", tz="UTC")
    for u in range(n_users):
        t = t0 + pd.Timedelta(u, "min")
        seq: list[str] = []
        while len(seq) < 12:
            if rng.random() < 0.4:
                k = int(rng.integers(0, 5))
                seq += [f"A{k}", f"B{k}"]
            else:
                seq.append(str(rng.choice(items)))
        for step, item in enumerate(seq):
            rows.append({"user_id": f"u{u}", "item_id": item, "clicked": 1,
                         "event_time": t + pd.Timedelta(step, "h"), "watch_time_ms": np.nan})
    frame = pd.DataFrame(rows)
    ids = sorted(set(frame["item_id"]))
    catalog = pd.DataFrame({"item_id": ids, "category": "c0", "creator_id": "cr",
                            "tags": [["t"]] * len(ids), "duration_ms": 1000.0,
                            "published_at": t0})
    frame = frame.merge(catalog.drop(columns="published_at"), on="item_id")
    frame = frame.sort_values("event_time", kind="stable").reset_index(drop=True)
    frame["item_age_days"] = 1.0
    frame["user_history"] = pit_histories(frame, engaged_mask(frame), SPEC.history_length)
    return frame, catalog


def test_a_followed_by_b_is_learned() -> None:
    rows, catalog = _pattern_rows()
    spec = EncoderSpec.from_catalog(catalog, list(rows.columns), user_buckets=500,
                                    item_buckets=500, creator_buckets=10, tag_buckets=10)
    cfg = TrainConfig(epochs=8, ranker_epochs=0, train_ranker=False, batch_size=64,
                      two_tower=TwoTowerConfig(dim=16, id_dim=16, hidden=32, temperature=0.1,
                                               id_dropout=0.0, softmax="full"))
    models = fit_local(rows, catalog, spec, cfg)
    from recsys_models.data import encode_items, encode_users
    from recsys_models.two_tower import embed_item_batch

    items = embed_item_batch(models.two_tower.item_tower, encode_items(catalog, spec))
    queries = pd.DataFrame({"user_id": ["new"] * 5,
                            "user_history": [[f"A{k}", "r3"] for k in range(5)]})
    t = {k: torch.as_tensor(v) for k, v in encode_users(queries, spec).items()}
    with torch.no_grad():
        users = models.two_tower.user_tower(t["user_hash"], t["history"],
                                            t["user_num"].float()).numpy()
    top = np.argsort(-(users @ items.T), axis=1)[:, :3]
    hits = [f"B{k}" in set(catalog["item_id"].to_numpy()[top[k]]) for k in range(5)]
    assert sum(hits) >= 4, hits


def test_early_stopping_keeps_the_best_epoch_and_stops_after_patience() -> None:
    cfg = TrainConfig(epochs=10, patience=2)
    model = torch.nn.Linear(1, 1)
    progress = _Progress()
    for score in (0.1, 0.3, 0.2, 0.25):
        with torch.no_grad():
            model.weight.fill_(score)
        progress.after_retrieval_epoch(cfg, model, score)
    assert progress.stopped and progress.best == 0.3 and progress.retrieval_epochs == 4
    progress.restore_best(model)
    assert abs(float(model.weight) - 0.3) < 1e-6


def test_a_plateau_of_tiny_gains_stops_but_keeps_the_best_weights() -> None:
    cfg = TrainConfig(epochs=10, patience=2, min_improvement=0.01)
    model = torch.nn.Linear(1, 1)
    progress = _Progress()
    for score in (0.1, 0.3, 0.301, 0.302):  # +0.3% and +0.3%: below the 1% that counts
        with torch.no_grad():
            model.weight.fill_(score)
        progress.after_retrieval_epoch(cfg, model, score)
    assert progress.stopped and progress.retrieval_epochs == 4 and progress.best == 0.302
    progress.restore_best(model)
    assert abs(float(model.weight.detach()) - 0.302) < 1e-6


def test_the_ranker_stops_after_its_patience_and_keeps_its_best_epoch() -> None:
    cfg = TrainConfig(epochs=1, ranker_epochs=6, ranker_patience=1)
    model = torch.nn.Linear(1, 1)
    progress = _Progress(retrieval_epochs=1)
    for auc in (0.70, 0.78, 0.74):
        assert not progress.done(cfg)
        with torch.no_grad():
            model.weight.fill_(auc)
        progress.after_ranker_epoch(cfg, model, auc)
    assert progress.done(cfg) and progress.ranker_best == 0.78 and progress.ranker_epochs == 3
    assert progress.ranker_best_state is not None
    assert abs(float(progress.ranker_best_state["weight"]) - 0.78) < 1e-6
    # without a validation set every ranker epoch runs
    blind = _Progress(retrieval_epochs=1)
    for _ in range(6):
        assert not blind.done(cfg)
        blind.after_ranker_epoch(cfg, model, None)
    assert blind.done(cfg)


def test_ranker_training_reads_the_validation_auc_and_keeps_the_best_epoch() -> None:
    from recsys_models.validation import build_validation, ranker_validation_auc
    from tests.model.snapshots import synthetic_case

    case = synthetic_case()
    fit_rows, val_rows, _ = time_split(case.train, 0.1)
    validation = build_validation(fit_rows, val_rows, case.items, case.spec,
                                  set(fit_rows["item_id"]))
    assert validation is not None and validation.impressions is not None
    cfg = TrainConfig(epochs=1, ranker_epochs=3, ranker_patience=1,
                      two_tower=TwoTowerConfig(dim=16, id_dim=16, hidden=32))
    models = fit_local(fit_rows, case.items, case.spec, cfg, validation=validation)
    aucs = [h["val_auc"] for h in models.history if h["phase"] == 1.0]
    assert 1 <= len(aucs) <= 3 and max(aucs) > 0.6
    kept = ranker_validation_auc(models.ranker, models.two_tower, validation)
    assert kept is not None and abs(kept - max(aucs)) < 1e-6


def test_validation_recall_does_not_depend_on_the_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    from recsys_models import validation as v
    from tests.model.snapshots import synthetic_case

    case = synthetic_case()
    fit_rows, val_rows, _ = time_split(case.train, 0.1)
    val = v.build_validation(fit_rows, val_rows, case.items, case.spec,
                             set(fit_rows["item_id"]))
    assert val is not None and val.size > 3
    model = TwoTowerModel(case.spec, TwoTowerConfig(dim=16, id_dim=16, hidden=32))
    whole = v.validation_recall(model, val)  # every user in one chunk
    n_items = len(val.items["item_hash"])
    monkeypatch.setattr(v, "RECALL_CELLS", 3 * n_items)  # 3 users at a time
    assert v.validation_recall(model, val) == whole


def test_lr_schedule_warms_up_then_decays_to_the_floor() -> None:
    factors = [lr_factor(s, 100, 0.1, 0.05) for s in range(100)]
    assert factors[0] == 0.1 and abs(factors[9] - 1.0) < 1e-9
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))
    assert abs(factors[-1] - 0.05) < 0.01  # the floor passed in
