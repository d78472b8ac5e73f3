"""Ray Serve end to end: a real bundle from MLflow, features from Feast/Redis, HTTP requests.

One session-scoped environment: the batch pipeline's lake and online store (Redis DB 1), one
trained + promoted bundle in a SQLite MLflow registry, and the serving app on the session's
Ray cluster on a free loopback port.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import socket
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from recsys_platform.settings import Settings, load_settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@dataclass(frozen=True)
class ServingEnv:
    url: str
    settings: Settings
    config_file: Path
    champion: str
    known_user: str
    outcome: Any


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def call(url: str, body: Any = None, raw: bytes | None = None,
         timeout: float = 30) -> tuple[int, dict[str, str], Any]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            text = resp.read().decode()
            status, headers = resp.status, {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as err:
        text, status = err.read().decode(), err.code
        headers = {k.lower(): v for k, v in err.headers.items()}
    try:
        return status, headers, json.loads(text)
    except json.JSONDecodeError:
        return status, headers, text


def _wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="session")
def serving_env(batch_env: Any, features_state: Any, ray_cluster: Any,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServingEnv]:
    from ray import serve

    from recsys_models.registry import promote
    from recsys_models.train import TrainConfig
    from recsys_models.two_tower import TwoTowerConfig
    from recsys_models.workflow import train_evaluate_register
    from recsys_pipelines.etl import read_lake_events
    from recsys_pipelines.feature_store import load_store
    from recsys_pipelines.training_set import (
        build_training_set,
        label_impressions,
        write_training_snapshot,
    )
    from recsys_platform.serving.app import RecommenderDeployment

    assert features_state.is_completed()
    root = tmp_path_factory.mktemp("serving")
    config = yaml.safe_load(batch_env.config_file.read_text())
    config["mlflow"] = {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
                        "artifact_location": str(root / "artifacts"),
                        "model_name": f"serving-test-{uuid.uuid4().hex[:6]}"}
    config["serving"] = {"poll_interval_s": 1.0, "candidates": 100}
    config_file = root / "settings.yaml"
    config_file.write_text(yaml.safe_dump(config))
    settings = load_settings("local", config_file)

    events = read_lake_events(settings.lake_dir)
    frame = build_training_set(load_store(settings), label_impressions(events))
    snapshot = write_training_snapshot(frame, settings)
    cfg = TrainConfig(epochs=1, batch_size=256, two_tower=TwoTowerConfig(dim=16))
    outcome = train_evaluate_register(settings, cfg, snapshot_id=snapshot, workers=1)
    result = promote(settings, outcome.split.train_labels, outcome.split.holdout,
                     why="serving test", who="pytest")
    assert result.promoted

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(RecommenderDeployment.options(autoscaling_config=None, num_replicas=1)
              .bind(config_file=str(config_file), admission_limit=4),
              name="recsys-test", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    _wait(lambda: call(f"{url}/readyz")[0] == 200, 120, "/readyz")
    known = str(events.loc[events["event_type"] == "click", "user_id"].iloc[0])
    yield ServingEnv(url, settings, config_file, result.challenger, known, outcome)
    serve.delete("recsys-test")
    serve.shutdown()


def test_known_user_gets_ranked_items_from_the_champion(serving_env: ServingEnv) -> None:
    status, _, body = call(f"{serving_env.url}/recommend",
                           {"user_id": serving_env.known_user, "k": 10,
                            "context": {"surface": "feed", "device": "ios"}})
    assert status == 200, body
    assert body["bundle_version"] == serving_env.champion
    assert body["source"] == "model" and body["degraded"] == []
    assert len(body["items"]) == 10 and body["request_id"]
    assert "retrieval" in {i["source"] for i in body["items"]}
    scores = [i["score"] for i in body["items"]]
    assert [i["position"] for i in body["items"]] == list(range(10))
    assert len({i["item_id"] for i in body["items"]}) == 10 and all(s == s for s in scores)


def test_excluded_items_never_come_back(serving_env: ServingEnv) -> None:
    first = call(f"{serving_env.url}/recommend", {"user_id": serving_env.known_user, "k": 5})[2]
    banned = [i["item_id"] for i in first["items"]]
    again = call(f"{serving_env.url}/recommend",
                 {"user_id": serving_env.known_user, "k": 5, "exclude": banned})[2]
    assert not set(banned) & {i["item_id"] for i in again["items"]}


def test_unknown_user_gets_cold_start_items(serving_env: ServingEnv) -> None:
    status, _, body = call(f"{serving_env.url}/recommend", {"user_id": "never-seen", "k": 5})
    assert status == 200 and len(body["items"]) == 5
    assert {i["source"] for i in body["items"]} <= {"trending", "fresh", "popular"}


@pytest.mark.parametrize("body, fragment", [
    ({"user_id": "u1", "k": 0}, "k:"),
    ({"user_id": "u1", "k": 201}, "k:"),
    ({"user_id": "u1", "colour": "red"}, "colour"),
    ({"k": 3}, "user_id"),
])
def test_invalid_requests_get_422_with_reason(serving_env: ServingEnv, body: dict[str, Any],
                                              fragment: str) -> None:
    status, _, answer = call(f"{serving_env.url}/recommend", body)
    assert status == 422 and answer["error"] == "invalid request"
    assert any(fragment in r for r in answer["reasons"]), answer
    assert "Traceback" not in json.dumps(answer)


def test_malformed_json_is_422(serving_env: ServingEnv) -> None:
    status, _, answer = call(f"{serving_env.url}/recommend", raw=b"{not json")
    assert status == 422 and "Traceback" not in json.dumps(answer)


def test_overload_is_refused_fast_with_retry_after(serving_env: ServingEnv) -> None:
    body = {"user_id": serving_env.known_user, "k": 50}
    with cf.ThreadPoolExecutor(max_workers=24) as pool:
        results = list(pool.map(lambda _: call(f"{serving_env.url}/recommend", body), range(48)))
    codes = [r[0] for r in results]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(200) > 0 and codes.count(503) > 0, codes
    assert all(r[1].get("retry-after") == "1" for r in results if r[0] == 503)


def test_impressions_are_logged_to_the_landing_area(serving_env: ServingEnv) -> None:
    import pyarrow.parquet as pq

    status, _, body = call(f"{serving_env.url}/recommend",
                           {"user_id": serving_env.known_user, "k": 3})
    assert status == 200
    request_id = body["request_id"]
    served = serving_env.settings.landing_dir / "served"

    def logged() -> bool:
        for path in served.rglob("served-*.parquet"):
            if request_id in pq.read_table(path, columns=["request_id"]).column(0).to_pylist():
                return True
        return False

    _wait(logged, 20, "the impression log flush")
    events = serving_env.settings.landing_dir / "events"
    ids = {i for p in events.rglob("served-*.parquet")
           for i in pq.read_table(p, columns=["event_id"]).column(0).to_pylist()}
    assert {f"{request_id}-{n}" for n in range(3)} <= ids


def test_metrics_and_health(serving_env: ServingEnv) -> None:
    assert call(f"{serving_env.url}/healthz")[0] == 200
    status, _, text = call(f"{serving_env.url}/metrics")
    assert status == 200
    for name in ("recsys_stage_latency_seconds_bucket", "recsys_candidates_total",
                 "recsys_served_bundle_version"):
        assert name in text


def test_promotion_swaps_atomically_and_bad_versions_are_rejected(
        serving_env: ServingEnv) -> None:
    """Runs last in this module: it changes the champion."""
    from mlflow import MlflowClient

    from recsys_models.registry import register_bundle

    settings = serving_env.settings
    name = settings.mlflow.model_name
    client = MlflowClient(settings.mlflow_tracking_uri, settings.mlflow_tracking_uri)

    # A broken version: its artifacts do not exist. Promoted by hand (as in the MLflow UI).
    broken = client.create_model_version(name, source=str(Path("/nonexistent/bundle")))
    client.set_registered_model_alias(name, "champion", broken.version)
    body = {"user_id": serving_env.known_user, "k": 5}

    def rejected() -> bool:
        return str(broken.version) in call(f"{serving_env.url}/readyz")[2]["rejected_versions"]

    _wait(rejected, 30, "the broken version to be rejected")
    status, _, answer = call(f"{serving_env.url}/recommend", body)
    assert status == 200 and answer["bundle_version"] == serving_env.champion
    assert "recsys_bundle_rejections_total 1.0" in call(f"{serving_env.url}/metrics")[2]

    # A good new version, promoted by hand while clients keep calling.
    new = register_bundle(settings, serving_env.outcome.bundle, run_name="serving-swap")
    client.set_registered_model_alias(name, "champion", new.version)
    versions: list[str] = []
    statuses: list[int] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status, _, answer = call(f"{serving_env.url}/recommend", body)
        statuses.append(status)
        if status == 200:
            versions.append(answer["bundle_version"])
            if answer["bundle_version"] == str(new.version):
                break
    assert set(statuses) == {200}
    assert versions[-1] == str(new.version)
    assert set(versions) <= {serving_env.champion, str(new.version)}
