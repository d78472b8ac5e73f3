"""Model cards: what the MLflow UI shows for a bundle version and the gate's decision."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd

from recsys_models.model_card import (
    GATE_HEADING,
    gate_section,
    model_description,
    version_card,
    with_gate,
)

BUNDLE = SimpleNamespace(version="20261201-abc", snapshot_id="ddd1545bb8252286",
                         feature_service="ranker_v1", catalog=pd.DataFrame({"item_id": ["a", "b"]}))
METRICS = {"two_tower/recall@50": 0.133, "popularity/recall@50": 0.137, "ranker/auc": 0.754,
           "holdout/users": 812.0}


def test_version_card_names_contents_snapshot_and_metrics_next_to_the_baseline() -> None:
    card = version_card(BUNDLE, METRICS, run_id="r1")
    assert "snapshot `ddd1545bb8252286`" in card and "run `r1`" in card
    assert "2 items" in card and "812 users" in card
    assert "| retrieval recall@50 | 0.1330 | 0.1370 |" in card
    assert "| ranker AUC | 0.7540 | - |" in card
    assert "ndcg" not in card  # metrics the evaluation did not produce are left out


def test_the_latest_gate_decision_replaces_the_previous_one() -> None:
    card = version_card(BUNDLE, METRICS, run_id="r1")
    refused = gate_section("refused", "ci", "weekly retrain", "2026-12-01T00:00:00+00:00",
                           {"ranker/auc": {"challenger": 0.70, "champion": 0.75}}, "3",
                           ["ranker/auc 0.7000 < champion 0.7500 - 1%"])
    once = with_gate(card, refused)
    assert "**refused** by ci" in once and "Previous champion: version 3." in once
    assert "| ranker/auc | 0.7000 | 0.7500 |" in once and "Refused because" in once
    promoted = gate_section("promoted", "ana", "forced after review", "2026-12-02T00:00:00+00:00",
                            {"ranker/auc": {"challenger": 0.70, "champion": None}}, None, [])
    twice = with_gate(once, promoted)
    assert twice.count(GATE_HEADING) == 1 and "refused" not in twice
    assert twice.startswith(card) and "| ranker/auc | 0.7000 | - |" in twice


def test_model_description_explains_the_aliases() -> None:
    text = model_description("recsys-bundle")
    assert "`champion`" in text and "`challenger`" in text and "recsys models promote" in text
