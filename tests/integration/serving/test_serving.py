"""Ray Serve end to end: a real bundle from MLflow, features from Feast/Redis, HTTP requests.

One session-scoped environment: the batch pipeline's lake and online store (Redis DB 1), one
trained + promoted bundle in a SQLite MLflow registry, and the serving app on the session's
Ray cluster. Requests go where ``recsys serve up`` sends clients by default: the replica's own
HTTP port under direct ingress (see ``conftest.py``), the proxy on a free port otherwise.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from recsys_core.settings import Settings, load_settings
from tests.fixtures.feast_store import derive_config
from tests.fixtures.net import free_port
from tests.integration.serving.env import ServingEnv, _app_url, _wait, call

pytestmark = [pytest.mark.integration, pytest.mark.slow]


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


def test_batched_ranking_equals_one_request_at_a_time(serving_env: ServingEnv) -> None:
    """``batch_ranker=True`` ranks concurrent requests in one ranker call (``rank_many``):
    each request's scores must equal those of ranking it alone. (Before the hot-swap tests:
    a fresh recommender loads whatever the alias names, and they end on a broken version.)"""
    import numpy as np

    from recsys_platform.serving.factory import build_recommender
    from recsys_platform.serving.recommender import Recommender, rank_many
    from recsys_platform.serving.schemas import RecommendRequest

    recommender, cache = build_recommender(serving_env.settings)
    try:
        users = [serving_env.known_user, "never-seen-user", serving_env.known_user]
        batch = [recommender.prepare(RecommendRequest(user_id=u, k=10, exclude=exclude))
                 for u, exclude in zip(users, ([], [], ["no-such-item"]), strict=True)]
        assert all(p.loaded is not None and p.candidates for p in batch)
        together = rank_many(batch)
        for prepared, scores in zip(batch, together, strict=True):
            assert not isinstance(scores, Exception), scores
            alone = Recommender.rank(prepared)
            assert scores.shape == (len(prepared.candidates),)
            np.testing.assert_allclose(scores, alone, rtol=1e-5, atol=1e-6)
            response = recommender.finish(prepared, scores, log=False)
            assert response.source == "model" and len(response.items) == 10
        assert not np.allclose(together[0][:5], together[1][:5])  # different users differ
    finally:
        cache.stop()
        recommender.manager.stop()
        if recommender.impressions is not None:
            recommender.impressions.stop()


def test_direct_redis_read_equals_feast(serving_env: ServingEnv) -> None:
    from recsys_platform.serving.factory import serving_store
    from recsys_platform.serving.online_features import FeastUserFeatures, RedisUserFeatures

    store = serving_store(serving_env.settings, timeout_s=5.0)
    direct = RedisUserFeatures(store, serving_env.settings.redis.url, 5.0)
    feast = FeastUserFeatures(store)
    for user in (serving_env.known_user, "never-seen"):
        assert direct(user) == feast(user)
    assert direct(serving_env.known_user)["user_history"]


def _catalog_ids(settings: Settings, n: int) -> list[str]:
    import pyarrow.parquet as pq

    catalog = settings.landing_dir / "catalog" / "items.parquet"
    return sorted(map(str, pq.read_table(catalog, columns=["item_id"]).column(0).to_pylist()))[:n]


def test_per_request_item_read_equals_feast(serving_env: ServingEnv) -> None:
    import pandas as pd

    from recsys_platform.serving.factory import serving_store
    from recsys_platform.serving.item_features import ItemFeatureCache, redis_item_fetch
    from recsys_platform.serving.online_features import feast_item_frame

    store = serving_store(serving_env.settings, timeout_s=5.0)
    ids = [*_catalog_ids(serving_env.settings, 300), "never-seen-item"]
    fetch, names = redis_item_fetch(store, serving_env.settings.redis.url, 5.0)
    rows = ItemFeatureCache(fetch, names).rows(ids)
    direct = rows.frame(ids)
    feast = feast_item_frame(store, ids)
    pd.testing.assert_frame_equal(direct, feast, check_like=True, check_dtype=False)
    assert direct.notna().any(axis=None)
    assert rows.metadata[ids[0]] == (str(feast.loc[ids[0], "creator_id"]),
                                     str(feast.loc[ids[0], "category"]))


@pytest.fixture(scope="module")
def short_ttl(serving_env: ServingEnv, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[tuple[Any, Any]]:
    """A recommender (not the deployment) whose item rows and lists live 1 s."""
    from recsys_platform.serving.factory import build_recommender

    config = derive_config(serving_env.config_file,
                           tmp_path_factory.mktemp("ttl") / "settings.yaml",
                           {"serving": {"item_cache_ttl_s": 1.0}})
    recommender, lists = build_recommender(load_settings("local", config))
    recommender.manager.stop()  # keeps the version it loaded while other tests swap theirs
    yield recommender, lists
    lists.stop()
    recommender.manager.stop()
    if recommender.impressions is not None:
        recommender.impressions.stop()


def test_changed_item_features_are_served_within_the_ttl(
        serving_env: ServingEnv, short_ttl: tuple[Any, Any]) -> None:
    import redis

    from recsys_core.features import ITEM_KEY
    from recsys_platform.serving.factory import serving_store
    from recsys_platform.serving.online_features import ITEM_VIEWS, RedisHashReader
    from recsys_platform.serving.schemas import RecommendRequest

    recommender, _ = short_ttl
    prepared = recommender.prepare(RecommendRequest(user_id=serving_env.known_user, k=10))
    ids = [c.item_id for c in prepared.candidates]
    column = "item_clicks_7d"
    item = next(i for i in ids if prepared.items.values(i).get(column))
    before = prepared.items.values(item)[column]
    store = serving_store(serving_env.settings, timeout_s=5.0)
    url = serving_env.settings.redis.url
    hashes = RedisHashReader(store, url, 5.0, ITEM_KEY, ITEM_VIEWS)
    key, field = hashes.key(item), hashes.fields[hashes.names.index(column)]
    client = redis.Redis.from_url(url)
    saved = cast(bytes, client.hget(key, field))
    from recsys_core.online_layout import encode_value

    try:
        client.hset(key, field, encode_value(before + 1000))  # type: ignore[arg-type]
        changed = _wait(lambda: recommender.features.item_rows([item]).values(item)[column]
                        == before + 1000, 5, "the changed value")
        assert changed
        again = recommender.prepare(RecommendRequest(user_id=serving_env.known_user, k=10))
        assert again.items.values(item)[column] == before + 1000
        # The fast path ranks with the candidates' read features, as Bundle.rank does.
        import numpy as np
        import pandas as pd

        from recsys_platform.serving.recommender import Recommender

        bundle = again.loaded.bundle
        assert bundle.spec.item_features
        frame = again.items.frame([c.item_id for c in again.candidates])
        features = frame[list(bundle.spec.item_features)]  # metadata, age: the catalog's
        expected = bundle.rank(pd.DataFrame([{**again.user, "user_id": again.user_key}]),
                               features.rename_axis("item_id").reset_index())["score"]
        np.testing.assert_allclose(Recommender.rank(again), expected, rtol=1e-4, atol=1e-5)
    finally:
        client.hset(key, field, saved)  # type: ignore[arg-type]  # bytes are fine


def test_a_replica_serves_items_added_after_its_bundle(
        serving_env: ServingEnv, short_ttl: tuple[Any, Any]) -> None:
    """A new item (metadata written online by Feast, listed fresh by the pipelines) is indexed
    from the cold-start lists, retrieved and ranked by the model, with no catalog scan."""
    from datetime import UTC, datetime

    import numpy as np
    import pandas as pd
    import redis

    from recsys_core.features import ITEM_KEY, WINDOW_END
    from recsys_models.scoring import catalog_rows, ranking_catalog
    from recsys_pipelines import cold_start
    from recsys_platform.serving.factory import serving_store
    from recsys_platform.serving.schemas import RecommendRequest

    recommender, lists = short_ttl
    settings = serving_env.settings
    bundle = recommender.manager.current.bundle
    item = f"new-item-{time.time_ns()}"
    assert item not in set(map(str, bundle.item_ids))
    template = bundle.catalog.iloc[0]
    now = datetime.now(UTC)
    store = serving_store(settings, timeout_s=5.0)
    store.write_to_online_store("item_metadata", pd.DataFrame([{
        ITEM_KEY: item, "category": str(template["category"]),
        "creator_id": str(template["creator_id"]), "tags": list(template["tags"]),
        "duration_ms": int(template["duration_ms"]), "published_at": pd.Timestamp(now),
        "item_age_days": 0.0, WINDOW_END: pd.Timestamp(now)}]))
    client = redis.Redis.from_url(settings.redis.url)
    key = cold_start.list_key(settings.redis.key_prefix, settings.feast.project, "fresh")
    client.zadd(key, {item: now.timestamp()})
    try:
        _wait(lambda: item in set(map(str, bundle.item_ids)), 10, "the new item indexed")
        assert item in lists.lists["fresh"]
        row = int(np.flatnonzero(bundle.item_ids == item)[0])
        found, _ = bundle.search(bundle.item_embeddings[row][None, :], 5)
        assert item in list(found[0])  # retrievable
        assert catalog_rows(ranking_catalog(bundle), [item]) is not None  # fast-path ranked
        prepared = recommender.prepare(RecommendRequest(user_id="never-seen-user", k=10))
        assert item in [c.item_id for c in prepared.candidates]
        response = recommender.finish(prepared, recommender.rank(prepared), log=False)
        assert response.source == "model"
    finally:
        client.zrem(key, item)


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

    def timed(_: int) -> tuple[int, dict[str, str], Any, float]:
        start = time.perf_counter()
        return (*call(f"{serving_env.url}/recommend", body), time.perf_counter() - start)

    with cf.ThreadPoolExecutor(max_workers=24) as pool:
        results = list(pool.map(timed, range(48)))
    codes = [r[0] for r in results]
    assert set(codes) <= {200, 503}, codes  # admitted requests complete, the rest are refused
    assert codes.count(200) > 0 and codes.count(503) > 0, codes
    refused = [r for r in results if r[0] == 503]
    assert all(r[1].get("retry-after") == "1" for r in refused)
    assert max(r[3] for r in refused) < 2.0  # refused at once, not after waiting in a queue


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


class LoadLoop:
    """A bounded closed-loop load: ``threads`` clients calling until stopped (or 120 s)."""

    def __init__(self, url: str, body: dict[str, Any], threads: int = 3) -> None:
        self.url, self.body = url, body
        self.results: list[list[tuple[int, Any]]] = [[] for _ in range(threads)]
        self.shed = 0  # 503s with Retry-After, retried
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, i: int) -> None:
        deadline = time.monotonic() + 120
        while not self._stop.is_set() and time.monotonic() < deadline:
            status, headers, answer = call(f"{self.url}/recommend", self.body)
            if status == 503 and headers.get("retry-after"):
                # Shed by admission (a swap's bundle load or the test's own MLflow work takes
                # the replica's CPU): retried, as a client does after Retry-After; a 503
                # without it stays a failure.
                self.shed += 1
                time.sleep(0.05)
                continue
            self.results[i].append((status, answer))

    def __enter__(self) -> LoadLoop:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    @property
    def flat(self) -> list[tuple[int, Any]]:
        return [r for rs in self.results for r in rs]


class TcpProxy:
    """A loopback TCP proxy to Redis that can be cut and restored: Redis "down" for one app."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = free_port()
        self._server: socket.socket | None = None
        self._conns: list[socket.socket] = []

    def start(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            if self._server is not server:  # cut while accept() was blocked
                client.close()
                return
            upstream = socket.create_connection(self.upstream)
            self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            # close() alone does not wake a thread blocked in accept(): shut it down first
            try:
                server.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            server.close()
        for conn in self._conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            except OSError:
                pass
        self._conns.clear()


def test_redis_outage_degrades_without_5xx_and_recovers(serving_env: ServingEnv) -> None:
    """A second app reads Redis through a proxy that is cut mid-load, then restored."""
    from ray import serve

    from recsys_platform.serving.app import RecommenderDeployment

    proxy = TcpProxy(("127.0.0.1", 6379))
    proxy.start()
    fault_config = derive_config(serving_env.config_file,
                                 serving_env.config_file.with_name("fault.yaml"), {
        "redis": {"url": f"redis://127.0.0.1:{proxy.port}/1", "timeout_ms": 100},
        "feast": {"online_store": "redis"},
    })
    # While Redis is down every request waits out the 100 ms timeout on the one hot-path
    # thread: a 1 s queue budget admits the 3 clients (this checks degrading, not admission).
    serve.run(RecommenderDeployment.options(name="recommender-fault", autoscaling_config=None,
                                            num_replicas=1)
              .bind(config_file=str(fault_config), queue_budget_ms=1000),
              name="recsys-fault", route_prefix="/fault", blocking=False)
    from recsys_platform.serving.ingress import direct_ingress_requested

    try:
        url = _app_url("recsys-fault", serving_env.proxy_port,
                       direct_ingress_requested(default=False), "/fault")
        _wait(lambda: call(f"{url}/readyz")[0] == 200, 120, "the fault app")
        body = {"user_id": serving_env.known_user, "k": 5}
        assert call(f"{url}/recommend", body)[2]["degraded"] == []
        with LoadLoop(url, body) as load:
            time.sleep(2)
            proxy.stop()  # Redis unreachable
            _wait(lambda: any("user_features" in a["degraded"] for _, a in load.flat), 60,
                  "a degraded answer while Redis is down")
            time.sleep(2)
            proxy.start()  # Redis back
            _wait(lambda: call(f"{url}/recommend", body)[2]["degraded"] == [], 30,
                  "recovery after Redis is back")
        statuses = [status for status, _ in load.flat]
        assert statuses and set(statuses) == {200}, set(statuses)
        degraded = [a for _, a in load.flat if "user_features" in a["degraded"]]
        assert degraded and all(len(a["items"]) == 5 for a in degraded)
        text = call(f"{url}/metrics")[2]
        assert 'recsys_fallbacks_total{stage="user_features"}' in text
    finally:
        proxy.stop()
        serve.delete("recsys-fault")


def test_hot_swap_under_load_switches_once_and_never_fails(serving_env: ServingEnv) -> None:
    """Changes the champion: runs after every test that expects the first version."""
    from mlflow import MlflowClient

    from recsys_models.registry import register_bundle

    settings = serving_env.settings
    name = settings.mlflow.model_name
    client = MlflowClient(settings.mlflow_tracking_uri, settings.mlflow_tracking_uri)
    new = str(register_bundle(settings, serving_env.outcome.bundle,
                              run_name="serving-swap").version)
    old = serving_env.champion
    with LoadLoop(serving_env.url, {"user_id": serving_env.known_user, "k": 10}) as load:
        time.sleep(2)
        client.set_registered_model_alias(name, "champion", new)  # as in the MLflow UI
        _wait(lambda: call(f"{serving_env.url}/readyz")[2]["bundle_version"] == new, 60,
              "the new champion to be served")
        time.sleep(2)
    assert load.flat and {status for status, _ in load.flat} == {200}
    for per_client in load.results:
        versions = [answer["bundle_version"] for _, answer in per_client]
        assert set(versions) <= {old, new}
        switches = sum(1 for a, b in zip(versions, versions[1:], strict=False) if a != b)
        assert switches <= 1 and versions[-1] == new, versions  # old... then new..., once


def test_broken_version_is_rejected_and_previous_keeps_serving(serving_env: ServingEnv) -> None:
    from mlflow import MlflowClient

    settings = serving_env.settings
    name = settings.mlflow.model_name
    client = MlflowClient(settings.mlflow_tracking_uri, settings.mlflow_tracking_uri)
    serving_now = call(f"{serving_env.url}/readyz")[2]["bundle_version"]
    broken = client.create_model_version(name, source=str(Path("/nonexistent/bundle")))
    client.set_registered_model_alias(name, "champion", broken.version)

    def rejected() -> bool:
        return str(broken.version) in call(f"{serving_env.url}/readyz")[2]["rejected_versions"]

    with LoadLoop(serving_env.url, {"user_id": serving_env.known_user, "k": 5}) as load:
        _wait(rejected, 60, "the broken version to be rejected")
    assert {status for status, _ in load.flat} == {200}
    assert {answer["bundle_version"] for _, answer in load.flat} == {serving_now}
    assert "recsys_bundle_rejections_total 1.0" in call(f"{serving_env.url}/metrics")[2]



PROBE = [  # the outside probe's request set: (body bytes, expected status, reason fragment)
    (json.dumps({"user_id": "probe-marker-1", "context": {"surface": "x" * 1_000_000}}).encode(),
     413, "body"),
    (b"{" + b" " * (20 * 1024 * 1024) + b'"user_id": "probe-marker-2"}', 413, "body"),
    (json.dumps({"user_id": "probe-marker-3", "context": {"device": "toaster"}}).encode(),
     422, "context.device"),
    (json.dumps({"user_id": "probe-marker-4", "context": {"surface": "evil<script>"}}).encode(),
     422, "context.surface"),
    (json.dumps({"user_id": "../../etc/passwd"}).encode(), 422, "user_id"),
    (json.dumps({"user_id": "probe\r\nmarker\x00"}).encode(), 422, "user_id"),
    (json.dumps({"user_id": "probe-marker-5", "k": "5"}).encode(), 422, "k"),
    (json.dumps({"user_id": "probe-marker-6", "k": True}).encode(), 422, "k"),
    (json.dumps({"user_id": "probe-marker-7", "exclude": ["i" * 20_000] * 1_000}).encode(),
     413, "body"),
    (json.dumps({"user_id": "probe-marker-7", "exclude": ["i" * 20_000] * 3}).encode(),
     422, "exclude.0"),
    (json.dumps({"user_id": "probe-marker-8", "exclude": ["i" * 200]}).encode(), 422,
     "exclude.0"),
    (b'{"user_id": "probe-marker-9\xff\xfe"}', 422, "not UTF-8"),
    (b'{"user_id": "probe-marker-10", "exclude": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", 422,
     "recursion limit"),
]


def test_the_probes_hostile_requests_get_4xx_with_a_reason_and_leave_nothing_on_disk(
        serving_env: ServingEnv) -> None:
    """Before: all but the malformed JSON were served and logged verbatim (a 1 MB surface
    wrote ~210 MB of stream JSONL), non-UTF-8 and deep nesting were 400 without a reason."""
    import pyarrow.parquet as pq

    for raw, expected, fragment in PROBE:
        status, _, answer = call(f"{serving_env.url}/recommend", raw=raw)
        assert status == expected, (raw[:80], status, answer)
        assert answer["error"] in ("invalid request", "request too large")
        assert any(fragment in r for r in answer["reasons"]), (raw[:80], answer)
        assert len(json.dumps(answer)) < 4_000 and "Traceback" not in json.dumps(answer)
    status, _, body = call(f"{serving_env.url}/recommend",
                           {"user_id": serving_env.known_user, "k": 2})
    assert status == 200
    landing = serving_env.settings.landing_dir

    def logged() -> bool:
        return any(body["request_id"] in pq.read_table(p, columns=["request_id"]).column(0)
                   .to_pylist() for p in (landing / "served").rglob("served-*.parquet"))

    _wait(logged, 30, "the valid request's impressions")
    users = {u for p in landing.rglob("served-*.parquet")
             for u in pq.read_table(p, columns=["user_id"]).column(0).to_pylist()}
    assert serving_env.known_user in users
    assert not {u for u in users if "probe" in u or "passwd" in u}
    wal = serving_env.settings.data_dir / "serving"
    for path in [*landing.rglob("*.jsonl"), *wal.rglob("*")]:
        if path.is_file():
            assert b"probe" not in path.read_bytes(), path
    text = call(f"{serving_env.url}/metrics")[2]
    assert 'recsys_rejections_total{reason="invalid"}' in text
    assert 'recsys_rejections_total{reason="too_large"}' in text


def test_a_version_with_nan_ranker_weights_is_rejected(serving_env: ServingEnv) -> None:
    """Before: a bundle whose ranker history embeddings held NaN rows passed the smoke query
    (a cold user with no history) and every known user got ``score: null``."""
    import torch
    from mlflow import MlflowClient

    from recsys_models.registry import register_bundle

    settings = serving_env.settings
    client = MlflowClient(settings.mlflow_tracking_uri, settings.mlflow_tracking_uri)
    serving_now = call(f"{serving_env.url}/readyz")[2]["bundle_version"]
    bundle = serving_env.outcome.bundle
    weight = bundle.ranker.history_emb.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[1:] = float("nan")  # every real item's history row; padding row 0 intact
    try:
        poisoned = str(register_bundle(settings, bundle, run_name="serving-nan").version)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    client.set_registered_model_alias(settings.mlflow.model_name, "champion", poisoned)
    _wait(lambda: poisoned in call(f"{serving_env.url}/readyz")[2]["rejected_versions"], 60,
          "the NaN version to be rejected")
    status, _, body = call(f"{serving_env.url}/recommend",
                           {"user_id": serving_env.known_user, "k": 5})
    assert status == 200 and body["bundle_version"] == serving_now
    assert all(i["score"] is not None for i in body["items"]) and body["source"] == "model"


def test_a_restarted_replica_on_a_broken_champion_serves_the_last_good_version(
        serving_env: ServingEnv) -> None:
    """Before: with the alias on a broken version, a new replica served popular items only
    and /readyz was 503 for as long as the alias stayed broken."""
    from ray import serve

    from recsys_platform.serving.app import RecommenderDeployment
    from recsys_platform.serving.ingress import direct_ingress_requested

    ready = call(f"{serving_env.url}/readyz")[2]
    last_good, broken = ready["bundle_version"], ready["champion_version"]
    assert broken in ready["rejected_versions"] and ready["fallback"] is True  # kept serving
    serve.run(RecommenderDeployment.options(name="recommender-restart", autoscaling_config=None,
                                            num_replicas=1)
              .bind(config_file=str(serving_env.config_file)),
              name="recsys-restart", route_prefix="/restart", blocking=False)
    try:
        url = _app_url("recsys-restart", serving_env.proxy_port,
                       direct_ingress_requested(default=False), "/restart")
        _wait(lambda: call(f"{url}/readyz")[0] == 200, 120, "the restarted replica")
        status, _, restarted = call(f"{url}/readyz")
        assert restarted["bundle_version"] == last_good and restarted["fallback"] is True
        assert restarted["champion_version"] == broken
        body = call(f"{url}/recommend", {"user_id": serving_env.known_user, "k": 5})[2]
        assert body["bundle_version"] == last_good and body["source"] == "model"
        assert "recsys_bundle_fallback 1.0" in call(f"{url}/metrics")[2]
    finally:
        serve.delete("recsys-restart")


def test_kill_9_of_the_replica_under_load_loses_no_impression(serving_env: ServingEnv) -> None:
    """Before: kill -9 lost the impressions of the replica's last ~0.8 s (20 responses served,
    never logged). Clients use the proxy (the stable entry point) while the replica restarts.
    Runs last: it kills the session app's replica."""
    import os
    import signal

    import psutil
    import pyarrow.parquet as pq
    import ray

    node: Any = ray._private.worker._global_node  # the session's local cluster
    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)

    def replica_pids() -> list[int]:
        """This cluster's replica processes of the session app (its raylet's children)."""
        pids = []
        for proc in raylet.children(recursive=True):
            try:
                if "ServeReplica:recsys-test:recommender" in " ".join(proc.cmdline()):
                    pids.append(proc.pid)
            except psutil.Error:
                continue
        return pids

    class TolerantLoad(LoadLoop):  # a refused connection while no replica runs is no answer
        def _run(self, i: int) -> None:
            deadline = time.monotonic() + 300
            while not self._stop.is_set() and time.monotonic() < deadline:
                try:
                    status, _, answer = call(f"{self.url}/recommend", self.body, timeout=10)
                except OSError:
                    status, answer = 0, None
                self.results[i].append((status, answer))

    [pid] = replica_pids()
    proxy = f"http://127.0.0.1:{serving_env.proxy_port}"
    with TolerantLoad(proxy, {"user_id": serving_env.known_user, "k": 4}) as load:
        time.sleep(1.5)
        os.kill(pid, signal.SIGKILL)
        _wait(lambda: [p for p in replica_pids() if p != pid], 120, "a new replica")

        def ready() -> bool:
            try:
                return call(f"{proxy}/readyz", timeout=10)[0] == 200
            except OSError:  # the proxy waits for the starting replica
                return False

        _wait(ready, 240, "the new replica ready")
        time.sleep(1)
    served = {a["request_id"] for status, a in load.flat if status == 200}
    assert len(served) > 5, load.flat[-5:]
    landing = serving_env.settings.landing_dir / "served"

    def logged() -> set[str]:
        return {r for p in landing.rglob("served-*.parquet")
                for r in pq.read_table(p, columns=["request_id"]).column(0).to_pylist()}

    _wait(lambda: served <= logged(), 60, "every served response in the impression log")
