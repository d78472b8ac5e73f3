"""Experiment routing in the request path, with the serving unit tests' tiny real bundles.

Split: a user's arm decides the bundle that serves them, and the impression log names the
experiment and arm. Shadow: the champion serves everyone, the treatment's ranking of the same
request lands in ``landing/shadow`` only, and a full shadow queue drops (and counts) work
instead of slowing responses. The real Ray Serve path: tests/integration/serving.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from recsys_models.bundle import Bundle
from recsys_platform.experiments.definition import Experiment, assign
from recsys_platform.serving.experiments import ExperimentArms
from recsys_platform.serving.impressions import ImpressionLogger
from recsys_platform.serving.metrics import ServingMetrics
from recsys_platform.serving.recommender import Recommender, ServingOptions
from recsys_platform.serving.schemas import RecommendRequest
from tests.unit.test_serving_logic import Features, _manager
from tests.unit.tiny_bundle import gate_ranker, tiny_bundle


def treatment_bundle(version: str, gate: threading.Event | None = None) -> Bundle:
    """A treatment with weights of its own (its rankings differ from the champion's); with
    ``gate``, each of its ranker passes waits until the gate is set (a stuck shadow thread)."""
    bundle = tiny_bundle(version)
    if gate is not None:
        gate_ranker(bundle, gate)
    return bundle


def _recommender(tmp_path: Path, exp: Experiment | None, treatment: Bundle
                 ) -> tuple[Recommender, ExperimentArms, ImpressionLogger]:
    metrics = ServingMetrics()
    served = ImpressionLogger(tmp_path / "landing")
    shadow = ImpressionLogger(tmp_path / "landing", folder="shadow", events=False)
    arms = ExperimentArms(lambda: exp, lambda v: treatment, lambda b: None, metrics, shadow)
    arms.refresh()
    rec = Recommender(_manager({"1": tiny_bundle("1")}, ["1"]), Features(), served, metrics,
                      ServingOptions(candidates=20, max_per_creator=10, max_per_category=10),
                      experiments=arms)
    return rec, arms, served


def _read(folder: Path) -> pd.DataFrame:
    return pd.concat([pq.read_table(p).to_pandas() for p in sorted(folder.rglob("*.parquet"))])


def test_split_serves_each_user_from_their_arm_and_logs_it(tmp_path: Path) -> None:
    exp = Experiment.new("7", "split", share=0.5, control_version="1")
    rec, arms, served = _recommender(tmp_path, exp, treatment_bundle("7"))
    users = [f"u{n}" for n in range(40)]
    versions: dict[str, set[str | None]] = {u: set() for u in users}
    for _ in range(2):
        for user in users:
            versions[user].add(rec.recommend(RecommendRequest(user_id=user, k=3)).bundle_version)
    for user in users:
        expected = "7" if assign(exp.salt, user, 0.5) == "treatment" else "1"
        assert versions[user] == {expected}  # stable per user, from the assignment hash
    served.flush()
    log = _read(tmp_path / "landing" / "served")
    assert set(log["experiment_id"]) == {exp.id}
    assert ((log["arm"] == "treatment") == (log["bundle_version"] == "7")).all()
    assert log["latency_ms"].gt(0).all() and (log["degraded"].fillna("") == "").all()
    assert not (tmp_path / "landing" / "shadow").exists()
    # the experiment ends: every user back on the champion, nothing tagged any more
    arms._read = lambda: None  # type: ignore[method-assign]
    assert arms.refresh() is True
    assert {rec.recommend(RecommendRequest(user_id=u, k=3)).bundle_version
            for u in users} == {"1"}


def test_a_treatment_that_fails_its_checks_routes_nobody(tmp_path: Path) -> None:
    exp = Experiment.new("7", "split", share=0.5, control_version="1")
    metrics = ServingMetrics()

    def broken(version: str) -> Bundle:
        raise OSError("artifact missing")

    arms = ExperimentArms(lambda: exp, broken, lambda b: None, metrics)
    assert arms.refresh() is False and arms.route("u1") is None
    status = arms.status()
    assert status is not None and status["live"] is False
    assert "rejected" in status["last_error"]


def test_shadow_logs_every_request_and_never_shows_the_treatment(tmp_path: Path) -> None:
    # a queue for every request: the shadow thread may fall behind the 30 requests on a busy
    # machine (dropping is the next test's subject)
    exp = Experiment.new("7", "shadow", control_version="1", shadow_max_age_s=30.0,
                         shadow_queue=64)
    rec, arms, served = _recommender(tmp_path, exp, treatment_bundle("7"))
    responses = [rec.recommend(RecommendRequest(user_id=f"u{n}", k=4)) for n in range(30)]
    arms.shadow.drain()
    arms.shadow_log.flush()  # type: ignore[union-attr]
    served.flush()
    assert {r.bundle_version for r in responses} == {"1"}
    shadow = _read(tmp_path / "landing" / "shadow")
    assert set(shadow["request_id"]) == {r.request_id for r in responses}  # every request
    assert set(shadow["bundle_version"]) == {"7"} and set(shadow["arm"]) == {"treatment"}
    for response in responses:
        mine = shadow[shadow["request_id"] == response.request_id].sort_values("position")
        assert [i.item_id for i in response.items] != mine["item_id"].tolist()
    log = _read(tmp_path / "landing" / "served")
    assert set(log["arm"]) == {"control"} and set(log["bundle_version"]) == {"1"}
    assert not list((tmp_path / "landing" / "events").rglob("shadow-*"))  # never impressions
    assert arms.shadow.counts == {"logged": 30, "dropped": 0, "stale": 0, "failed": 0}


def test_shadow_work_is_dropped_and_counted_when_it_cannot_keep_up(tmp_path: Path) -> None:
    """The shadow thread is stuck (its ranking waits on a gate): every response still comes
    back, the queue holds 2 jobs, the rest are dropped and counted."""
    gate = threading.Event()
    exp = Experiment.new("7", "shadow", control_version="1", shadow_queue=2,
                         shadow_max_age_s=30.0)
    rec, arms, _ = _recommender(tmp_path, exp, treatment_bundle("7", gate))
    responses = [rec.recommend(RecommendRequest(user_id=f"u{n}", k=4)) for n in range(40)]
    assert {r.bundle_version for r in responses} == {"1"} and len(responses) == 40
    assert arms.shadow.counts["dropped"] >= 37  # 1 running + 2 queued at most
    gate.set()
    arms.shadow.drain()
    counts = arms.shadow.counts
    assert counts["logged"] + counts["dropped"] == 40 and counts["logged"] <= 3, counts
    text = "\n".join(line for line in _metrics_text(arms) if "shadow_total" in line)
    assert f'outcome="dropped"}} {float(counts["dropped"])}' in text


def _metrics_text(arms: ExperimentArms) -> list[str]:
    from prometheus_client import generate_latest

    return generate_latest(arms.metrics.registry).decode().splitlines()
