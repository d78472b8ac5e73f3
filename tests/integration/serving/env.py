"""The serving tests' shared environment: one trained + promoted bundle in a SQLite MLflow
registry, the batch pipeline's online store (Redis DB 1), and the serving app on the session's
Ray cluster (``serving_env``, registered for this folder by ``conftest.py``), plus the HTTP
helpers every serving test uses."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from recsys_core.settings import Settings, load_settings
from tests.fixtures.champion import sqlite_mlflow, train_champion
from tests.fixtures.feast_store import derive_config
from tests.fixtures.net import free_port


@dataclass(frozen=True)
class ServingEnv:
    url: str
    proxy_port: int
    settings: Settings
    config_file: Path
    champion: str
    known_user: str
    outcome: Any


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


def _app_url(app_name: str, proxy_port: int, direct: bool, route: str = "") -> str:
    """The replica's own URL under direct ingress (asserted to skip the proxy), else the proxy's."""
    if not direct:
        return f"http://127.0.0.1:{proxy_port}{route}"
    from recsys_platform.serving.ingress import replica_urls

    urls = replica_urls(app_name, host="127.0.0.1", timeout_s=120)
    assert len(urls) == 1 and f":{proxy_port}" not in urls[0], urls
    return urls[0]


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

    from recsys_pipelines.etl import read_lake_events
    from recsys_platform.serving.app import RecommenderDeployment
    from recsys_platform.serving.ingress import direct_ingress_requested

    assert features_state.is_completed()
    root = tmp_path_factory.mktemp("serving")
    config_file = derive_config(batch_env.config_file, root / "settings.yaml", {
        "mlflow": sqlite_mlflow(root, "serving-test"),
        "serving": {"poll_interval_s": 1.0, "candidates": 100},
    })
    settings = load_settings("local", config_file)
    events = read_lake_events(settings.lake_dir)
    champion = train_champion(settings, events, why="serving test")

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(RecommenderDeployment.options(autoscaling_config=None, num_replicas=1)
              # a 50 ms queue budget: the 3-client loads below are always admitted, the
              # 24-client burst of the overload test is not
              .bind(config_file=str(config_file), queue_budget_ms=50),
              name="recsys-test", route_prefix="/", blocking=False)
    url = _app_url("recsys-test", port, direct_ingress_requested(default=False))
    _wait(lambda: call(f"{url}/readyz")[0] == 200, 120, "/readyz")
    known = str(events.loc[events["event_type"] == "click", "user_id"].iloc[0])
    yield ServingEnv(url, port, settings, config_file, champion.promotion.challenger, known,
                     champion.outcome)
    serve.delete("recsys-test")
    serve.shutdown()
