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


def test_card_and_gate_show_the_tuned_baselines_next_to_the_version() -> None:
    metrics = {**METRICS, "final/recall@50": 0.21, "ease/recall@50": 0.19, "als/recall@50": 0.17,
               "final/recall@50_vs_popularity": 0.21 / 0.137, "final/recall@50_vs_ease":
               0.21 / 0.19, "final/recall@50_vs_als": 0.21 / 0.17}
    card = version_card(BUNDLE, metrics, run_id="r1")
    assert "| metric | this version | popularity baseline | EASE | ALS |" in card
    assert "| served recall@50 (ranked) | 0.2100 | 0.1370 | 0.1900 | 0.1700 |" in card
    assert "Served recall@50 = 1.53x popularity, 1.11x EASE, 1.24x ALS." in card
    section = gate_section("promoted", "ci", "weekly", "2026-12-01T00:00:00+00:00",
                           {"final/recall@50": {"challenger": 0.21, "champion": None}}, None, [],
                           baselines={"ease/recall@50": 0.19, "als/recall@50": 0.17})
    assert "Baselines on the same holdout (not gated): ease/recall@50 0.1900, als/recall@50 " \
        "0.1700." in section
