"""What a training worker checkpoints, and that a resume puts it back (no Ray needed)."""

from __future__ import annotations

import io
from functools import partial
from typing import Any

import numpy as np
import torch

from recsys_models.data import encode_rows, item_log_q
from recsys_models.train import (
    TrainConfig,
    _catalog_tensors,
    _make_loops,
    _numpy_batches,
    _Progress,
    build_models,
    checkpoint_state,
    restore_loops,
)
from recsys_models.two_tower import TwoTowerConfig
from tests.model.snapshots import synthetic_case

CFG = TrainConfig(epochs=1, ranker_epochs=2, batch_size=64, max_steps_per_epoch=3,
                  two_tower=TwoTowerConfig(dim=16, id_dim=16, hidden=32))


def _trained_one_step_each() -> tuple[Any, ...]:
    case = synthetic_case()
    lq, default = item_log_q(case.train.loc[case.train["clicked"] == 1, "item_id"])
    encoded = encode_rows(case.train, case.spec, lq, default)
    positives = {k: v[encoded["clicked"] == 1] for k, v in encoded.items()}
    two_tower, ranker = build_models(case.spec, CFG)
    loops = _make_loops(two_tower, ranker, two_tower, CFG,
                        _catalog_tensors(case.items, case.spec, CFG), total_steps=3)
    loops.retrieval_epoch(_numpy_batches(positives, 64, 0))
    loops.ranker_epoch(_numpy_batches(encoded, 64, 0))
    return case, two_tower, ranker, loops, partial(_numpy_batches, encoded, 64, 1)


def _round_trip(state: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded: dict[str, Any] = torch.load(buffer, weights_only=False)
    return loaded


def test_the_ranker_phase_checkpoint_drops_the_retrieval_optimizers_and_resumes_the_same() -> None:
    case, two_tower, ranker, loops, batches = _trained_one_step_each()
    in_retrieval = checkpoint_state(two_tower, ranker, loops, _Progress(), [], 0)
    assert all(o is not None for o in in_retrieval["optimizers"])
    done = _Progress(retrieval_epochs=1)
    state = _round_trip(checkpoint_state(two_tower, ranker, loops, done, [], 0))
    n_retrieval = len(loops.retrieval_opts)
    assert state["optimizers"][:n_retrieval] == [None] * n_retrieval
    assert all(o is not None for o in state["optimizers"][n_retrieval:])
    assert len(_round_trip(in_retrieval)["optimizers"]) == len(state["optimizers"])

    # A resumed worker (fresh models and optimizers, the checkpoint loaded) takes the same
    # next ranker step as the one that wrote it.
    tt2, rk2 = build_models(case.spec, CFG)
    tt2.load_state_dict(state["two_tower"])
    rk2.load_state_dict(state["ranker"])
    resumed = _make_loops(tt2, rk2, tt2, CFG, _catalog_tensors(case.items, case.spec, CFG),
                          total_steps=3)
    restore_loops(resumed, state)
    assert resumed.step == loops.step
    loops.ranker_epoch(batches())
    resumed.ranker_epoch(batches())
    for a, b in zip(ranker.parameters(), rk2.parameters(), strict=True):
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-5,
                                   atol=1e-6)
