"""Online experiments end to end on real Ray Serve, Redis, MLflow and Prefect.

One Serve app on its own MLflow registry and data dir (the session's Feast store and Redis DB
1), serving the session's trained bundle as champion (version 1) and, as the treatment, the
same bundle with its ranker's heads negated (version 2: it ranks differently, so a response
shows which arm served it). Users are real HTTP requests; clicks are simulated at a known rate
per arm and land as raw click events; ``decide`` runs the real flow: ETL of the landing area
(served impressions + clicks) into the lake, the delayed label join (window 1 s), analysis,
decision, audit tags in MLflow. Scenarios run in order on the same app:

1. split 50%, treatment clicked 3x more: promoted (``champion`` -> 2); assignment stable per
   user and equal to the hash; SRM passes;
2. split 50% of version 1 against the new champion 2, with the rates reversed (the treatment
   is now the worse one): rolled back, champion stays 2;
3. equal rates and a minimum sample size far above the traffic: keeps running (then stopped);
4. shadow: every request's treatment ranking is logged, no response ever shows one.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from recsys_core.settings import Settings, load_settings
from recsys_platform.experiments.definition import Guardrails
from tests.fixtures.champion import sqlite_mlflow
from tests.fixtures.feast_store import derive_config
from tests.integration.serving.env import ServingEnv, _app_url, _wait, call

pytestmark = [pytest.mark.integration, pytest.mark.slow]

USERS = 120  # x 2 requests each, k = 10: 2,400 impressions per scenario
K = 10
# Latency on a shared 2-core CI box under load is noise (p99s of 0.2-1 s, either arm): the
# p99 guardrail gets room here; tests/unit/test_experiment_stats.py checks that it bites.
LOADED_BOX = Guardrails(max_p99_ratio=10.0, p99_slack_ms=1_000.0)


@dataclass(frozen=True)
class ExperimentEnv:
    url: str
    settings: Settings
    users: list[str]


@pytest.fixture(scope="module")
def exp_env(serving_env: ServingEnv, prefect_harness: None,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExperimentEnv]:
    import torch
    from mlflow import MlflowClient
    from ray import serve

    from recsys_models.registry import register_bundle
    from recsys_pipelines.etl import read_lake_events
    from recsys_platform.serving.app import RecommenderDeployment
    from recsys_platform.serving.ingress import direct_ingress_requested

    root = tmp_path_factory.mktemp("experiments")
    config = derive_config(serving_env.config_file, root / "settings.yaml", {
        "data_dir": str(root / "data"),
        "mlflow": {**sqlite_mlflow(root, "exp-test"), "model_name": "recsys-bundle"},  # own db
        "serving": {"poll_interval_s": 0.5, "candidates": 100},
        "labels": {"window_s": 1},
    })
    settings = load_settings("local", config)
    shutil.copytree(serving_env.settings.landing_dir / "catalog",
                    settings.landing_dir / "catalog")  # the catalog and users the ETL syncs
    bundle = serving_env.outcome.bundle
    name = settings.mlflow.model_name
    client = MlflowClient(settings.mlflow_tracking_uri, settings.mlflow_tracking_uri)
    champion = register_bundle(settings, bundle, run_name="exp-control").version
    client.set_registered_model_alias(name, "champion", champion)
    heads = [bundle.ranker.click_head, bundle.ranker.watch_head]
    saved = [(h.weight.detach().clone(), h.bias.detach().clone()) for h in heads]
    weight = bundle.ranker.retrieval_weight.detach().clone()
    with torch.no_grad():  # the treatment: the same model ranking (roughly) upside down
        for head in heads:
            head.weight.neg_()
            head.bias.neg_()
        bundle.ranker.retrieval_weight.neg_()
    try:
        register_bundle(settings, bundle, run_name="exp-treatment")
    finally:
        with torch.no_grad():
            for head, (w, b) in zip(heads, saved, strict=True):
                head.weight.copy_(w)
                head.bias.copy_(b)
            bundle.ranker.retrieval_weight.copy_(weight)
    serve.run(RecommenderDeployment.options(name="recommender-exp", autoscaling_config=None,
                                            num_replicas=1)
              # admit everything (a loaded CI box would refuse some at the default budget)
              .bind(config_file=str(config), queue_budget_ms=10_000, cheap_path=False),
              name="recsys-exp", route_prefix="/exp", blocking=False)
    try:
        url = _app_url("recsys-exp", serving_env.proxy_port,
                       direct_ingress_requested(default=False), "/exp")
        _wait(lambda: call(f"{url}/readyz")[0] == 200, 120, "the experiment app")
        events = read_lake_events(serving_env.settings.lake_dir)
        known = sorted(set(events["user_id"].astype(str)))[: USERS // 2]
        users = known + [f"exp-new-{n}" for n in range(USERS - len(known))]  # + cold users
        yield ExperimentEnv(url, settings, users)
    finally:
        serve.delete("recsys-exp")


def _live(env: ExperimentEnv, exp_id: str | None) -> None:
    def ready() -> bool:
        body = call(f"{env.url}/readyz")[2]
        got = body.get("experiment")
        return got is None if exp_id is None else bool(got and got["id"] == exp_id
                                                       and got["live"])
    _wait(ready, 60, f"serving to pick up experiment {exp_id}")


def _traffic(env: ExperimentEnv, users: list[str], rounds: int = 2) -> list[dict[str, Any]]:
    bodies = [{"user_id": u, "k": K, "context": {"surface": "feed", "device": "ios"}}
              for _ in range(rounds) for u in users]
    def send(body: dict[str, Any]) -> tuple[int, Any]:
        for _ in range(20):  # a 503 (admission) is retried, as clients do after Retry-After
            status, _, answer = call(f"{env.url}/recommend", body)
            if status != 503:
                return status, answer
            time.sleep(0.2)
        return status, answer

    with ThreadPoolExecutor(max_workers=3) as pool:
        answers = list(pool.map(send, bodies))
    assert {status for status, _ in answers} == {200}
    return [answer for _, answer in answers]


def _click(env: ExperimentEnv, responses: list[dict[str, Any]], served: pd.DataFrame,
           rates: dict[str, float], seed: int) -> None:
    """Clicks at ``rates[bundle_version]`` per served item, 200 ms after it was served (inside
    the 1 s label window), landed as a client's raw click events."""
    from recsys_core.contracts import RAW_EVENT_SCHEMA
    from recsys_pipelines.etl import atomic_write_table

    rng = np.random.default_rng(seed)
    at = served.groupby("request_id")["served_at"].first() + pd.Timedelta(milliseconds=200)
    stamps = at.dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ").to_dict()
    rows = [{"event_id": f"click-{uuid.uuid4().hex}", "event_time": stamps[r["request_id"]],
             "user_id": r["user_id"], "item_id": item["item_id"], "event_type": "click",
             "watch_time_ms": None, "item_duration_ms": None, "surface": "feed",
             "device": "ios", "request_id": r["request_id"], "model_version": None}
            for r in responses for item in r["items"]
            if rng.random() < rates[r["bundle_version"]]]
    now = datetime.now(UTC)
    path = (env.settings.landing_dir / "events" / f"date={now.date().isoformat()}"
            / f"clicks-{uuid.uuid4().hex[:8]}.parquet")
    atomic_write_table(pa.Table.from_pylist(rows, schema=RAW_EVENT_SCHEMA), path)


def _logged(env: ExperimentEnv, folder: str, request_ids: set[str]) -> pd.DataFrame:
    def read() -> tuple[pd.DataFrame] | None:
        files = list((env.settings.landing_dir / folder).rglob("*.parquet"))
        if not files:
            return None
        frame = pd.concat(pd.read_parquet(p) for p in files)
        frame = frame[frame["request_id"].isin(request_ids)]
        return (frame,) if set(frame["request_id"]) == request_ids else None
    return _wait(read, 30, f"{len(request_ids)} requests in landing/{folder}")[0]


def _decide(env: ExperimentEnv) -> dict[str, Any]:
    from recsys_platform.flows.experiment import experiment_decide_flow

    time.sleep(1.1)  # the label window (1 s) of the last impressions closes
    return experiment_decide_flow(why="integration test", who="pytest", settings=env.settings)


def _version_tags(env: ExperimentEnv, version: str) -> dict[str, str]:
    from mlflow import MlflowClient

    client = MlflowClient(env.settings.mlflow_tracking_uri, env.settings.mlflow_tracking_uri)
    return dict(client.get_model_version(env.settings.mlflow.model_name, version).tags)


def _champion(env: ExperimentEnv) -> str:
    from recsys_models.registry import alias_version

    return alias_version(env.settings, "champion")


def test_split_promotes_a_better_treatment_with_stable_assignment(
        exp_env: ExperimentEnv) -> None:
    from recsys_platform.experiments import lifecycle
    from recsys_platform.experiments.definition import assign

    exp = lifecycle.start(exp_env.settings, "2", "split", 0.5, why="treatment clicks 3x",
                          who="pytest", min_samples=500, guardrails=LOADED_BOX)
    _live(exp_env, exp.id)
    responses = _traffic(exp_env, exp_env.users)
    by_user: dict[str, set[str]] = {}
    for r in responses:
        by_user.setdefault(r["user_id"], set()).add(r["bundle_version"])
    for user, versions in by_user.items():  # one arm per user, the hash's
        expected = "2" if assign(exp.salt, user, 0.5) == "treatment" else "1"
        assert versions == {expected}, (user, versions)
    served = _logged(exp_env, "served", {r["request_id"] for r in responses})
    assert set(served["experiment_id"]) == {exp.id}
    assert ((served["arm"] == "treatment") == (served["bundle_version"] == "2")).all()
    _click(exp_env, responses, served, {"2": 0.30, "1": 0.10}, seed=1)

    result = _decide(exp_env)
    assert result["experiment"] == exp.id and result["decision"] == "promote", result
    numbers = result["numbers"]
    assert numbers["control"]["impressions"] + numbers["treatment"]["impressions"] == \
        sum(len(r["items"]) for r in responses)  # every served impression labelled
    assert numbers["pending"] == 0
    assert numbers["srm"]["mismatch"] is False and numbers["srm"]["p_value"] > 0.001
    assert numbers["lift"]["ci"][0] > 0
    assert 0.2 < numbers["treatment"]["ctr"] < 0.4 and 0.05 < numbers["control"]["ctr"] < 0.15
    assert _champion(exp_env) == "2"
    tags = _version_tags(exp_env, "2")
    assert tags["experiment.decision"] == "promoted" and tags["experiment.who"] == "pytest"
    assert tags["experiment.id"] == exp.id and "lift" in tags["experiment.what"]
    assert tags["promoted_by"] == "pytest"
    control = _version_tags(exp_env, "1")
    assert control["experiment.control_in"] == exp.id
    assert control["experiment.control_outcome"].startswith("promoted")
    _live(exp_env, None)  # the experiment ended: replicas stop routing


def test_split_rolls_back_a_worse_treatment(exp_env: ExperimentEnv) -> None:
    from recsys_platform.experiments import lifecycle

    assert _champion(exp_env) == "2"
    exp = lifecycle.start(exp_env.settings, "1", "split", 0.5, why="old version, worse",
                          who="pytest", min_samples=500, guardrails=LOADED_BOX)
    _live(exp_env, exp.id)
    responses = _traffic(exp_env, exp_env.users)
    served = _logged(exp_env, "served", {r["request_id"] for r in responses})
    _click(exp_env, responses, served, {"1": 0.10, "2": 0.30}, seed=2)  # treatment worse

    result = _decide(exp_env)
    assert result["decision"] == "rollback", result
    # worse on the primary metric (a guardrail may name itself first: the rule checks them
    # first, and the un-negated ranker serves fewer distinct items)
    assert result["numbers"]["lift"]["ci"][1] < 0, result
    assert _champion(exp_env) == "2"
    assert _version_tags(exp_env, "1")["experiment.decision"] == "rolled back"
    _live(exp_env, None)


def test_equal_rates_with_too_few_samples_keep_running(exp_env: ExperimentEnv) -> None:
    from recsys_platform.experiments import lifecycle

    exp = lifecycle.start(exp_env.settings, "1", "split", 0.5, why="A/A", who="pytest",
                          min_samples=100_000)
    _live(exp_env, exp.id)
    responses = _traffic(exp_env, exp_env.users[:40], rounds=1)
    served = _logged(exp_env, "served", {r["request_id"] for r in responses})
    _click(exp_env, responses, served, {"1": 0.2, "2": 0.2}, seed=3)

    result = _decide(exp_env)
    assert result["decision"] == "continue" and "too few samples" in result["reasons"][0]
    assert lifecycle.current(exp_env.settings) == exp
    assert _version_tags(exp_env, "1")["experiment.decision"] == "running"
    lifecycle.stop(exp_env.settings, why="test done", who="pytest")
    assert lifecycle.current(exp_env.settings) is None
    assert _version_tags(exp_env, "1")["experiment.decision"] == "stopped"
    _live(exp_env, None)


def test_shadow_logs_every_treatment_ranking_and_never_serves_one(
        exp_env: ExperimentEnv) -> None:
    from recsys_platform.experiments import lifecycle

    # Bounds wide enough that a loaded CI box drops nothing here (the unit test drops).
    exp = lifecycle.start(exp_env.settings, "1", "shadow", why="shadow first", who="pytest",
                          shadow_queue=256, shadow_max_age_s=30.0)
    _live(exp_env, exp.id)
    responses = _traffic(exp_env, exp_env.users[:60], rounds=1)
    ids = {r["request_id"] for r in responses}
    assert {r["bundle_version"] for r in responses} == {"2"}  # the champion serves everyone
    shadow = _logged(exp_env, "shadow", ids)  # every request has its shadow ranking
    assert set(shadow["bundle_version"]) == {"1"} and set(shadow["arm"]) == {"treatment"}
    ranked = {rid: group.sort_values("position")["item_id"].tolist()
              for rid, group in shadow.groupby("request_id")}
    for r in responses:
        assert [i["item_id"] for i in r["items"]] != ranked[r["request_id"]]
    served = _logged(exp_env, "served", ids)
    assert set(served["arm"]) == {"control"} and set(served["bundle_version"]) == {"2"}
    _wait(lambda: 'recsys_experiment_shadow_total{outcome="logged"} 60.0'
          in call(f"{exp_env.url}/metrics")[2], 10, "60 shadow rankings counted as logged")
    assert "recsys_experiment_shadow_total{outcome=\"dropped\"}" not in \
        call(f"{exp_env.url}/metrics")[2]
    _click(exp_env, responses, served, {"2": 0.2}, seed=4)
    result = _decide(exp_env)
    assert result["decision"] == "continue"
    shadow_numbers = result["numbers"]["shadow"]
    assert shadow_numbers["shadow_requests"] == 60 and shadow_numbers["clicks"] > 0
    assert 0 <= shadow_numbers["treatment_mrr"] <= 1 and 0 < shadow_numbers["control_mrr"] <= 1
    assert 0 <= shadow_numbers["treatment_hit_rate"] <= 1
    lifecycle.stop(exp_env.settings, why="test done", who="pytest")
