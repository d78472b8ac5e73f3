"""The final score's blend: the click head on the probability or the log-odds scale."""

from __future__ import annotations

import numpy as np

from recsys_models.ranker import Blend, log_odds


def test_log_odds_inverts_the_sigmoid_and_stays_finite_at_0_and_1() -> None:
    logits = np.array([-8.0, -1.0, 0.0, 2.5, 9.0])
    p = (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    np.testing.assert_allclose(log_odds(p), logits, atol=1e-3)
    edges = log_odds(np.array([0.0, 1.0], np.float32))
    assert np.isfinite(edges).all() and edges[0] < -15 and edges[1] > 15


def test_the_log_odds_scale_keeps_the_rankers_order_where_the_probability_squeezes_it() -> None:
    # Two candidates: b has the better retrieval score, a the far better click logit
    # (10 vs 6); as probabilities both are ~1 and retrieval decides, as log-odds the ranker does.
    p_click = (1.0 / (1.0 + np.exp(-np.array([10.0, 6.0])))).astype(np.float32)
    watch = np.zeros(2, np.float32)
    retrieval = np.array([0.2, 0.5], np.float32)
    by_probability = Blend(retrieval_weight=1.0).score(p_click, watch, retrieval)
    by_log_odds = Blend(retrieval_weight=1.0, click_logit=True).score(p_click, watch, retrieval)
    assert by_probability.argmax() == 1
    assert by_log_odds.argmax() == 0
    np.testing.assert_allclose(by_log_odds, [10.2, 6.5], atol=1e-3)


def test_a_saved_blend_without_the_flag_scores_as_before() -> None:
    saved = {"click_weight": 1.0, "watch_weight": 0.5, "watch_scale_ms": 60_000.0,
             "retrieval_weight": 3.0, "neighbour_weight": 1.0}  # a bundle from before the flag
    blend = Blend(**saved)
    assert blend.click_logit is False
    p = np.array([0.2, 0.9], np.float32)
    watch = np.array([30_000.0, 0.0], np.float32)
    retrieval = np.array([0.1, 0.3], np.float32)
    neighbour = np.array([1.0, 0.0], np.float32)
    expected = p + 0.5 * p * watch / 60_000.0 + 3.0 * retrieval + 1.0 * neighbour
    np.testing.assert_allclose(blend.score(p, watch, retrieval, neighbour), expected, rtol=1e-6)
