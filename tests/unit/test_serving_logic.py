"""Pure serving logic: candidate merging, diversity, atomic bundle swaps, fallbacks.

These use small in-memory stand-ins for the bundle and the feature source; the real components
are exercised in tests/integration/serving.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pandas as pd
import pytest

from recsys_platform.serving.bundle_manager import BundleManager
from recsys_platform.serving.candidates import Candidate, diversify, merge_sources
from recsys_platform.serving.item_features import ColdStartLists, ItemFeatureCache, ItemRows
from recsys_platform.serving.metrics import ServingMetrics
from recsys_platform.serving.recommender import Recommender, ServingOptions
from recsys_platform.serving.schemas import RecommendRequest


class TinyBundle:
    """Scores items by a fixed vector; ``fail_rank`` makes the ranker raise."""

    def __init__(self, version: str, n_items: int = 30, fail_rank: bool = False,
                 nan_items: frozenset[str] = frozenset()) -> None:
        self.version = version
        self.item_ids = np.array([f"i{i}" for i in range(n_items)], dtype=object)
        self.fail_rank = fail_rank
        self.nan_items = nan_items  # items the ranker scores NaN (a broken embedding row)
        self.ranked_versions: list[str] = []

    def encode_users(self, users: pd.DataFrame) -> np.ndarray:
        return np.ones((len(users), 4))

    def search(self, emb: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        ids = self.item_ids[:n]
        return ids[None, :], np.linspace(1, 0, len(ids))[None, :]

    def rank(self, users: pd.DataFrame, items: pd.DataFrame) -> pd.DataFrame:
        if self.fail_rank:
            raise RuntimeError("ranker exploded")
        self.ranked_versions.append(self.version)
        score = items["item_id"].str.slice(1).astype(float).to_numpy()  # higher id, higher score
        score = np.where(items["item_id"].isin(self.nan_items), np.nan, score)
        return pd.DataFrame({"p_click": score, "watch_time_ms_pred": score, "score": score})


class Features:
    """The feature source over an in-memory item table (``i<n>``: creator ``cr<n % 3>``,
    category ``cat<n % 2>``) through the real :class:`ItemFeatureCache`."""

    def __init__(self, known: bool = True, down: bool = False, empty: bool = False) -> None:
        self.known, self.down, self.empty = known, down, empty  # empty: no online features
        self.items = ItemFeatureCache(lambda ids: [((f"cr{int(i[1:]) % 3}", 0.0),
                                                    (f"cat{int(i[1:]) % 2}", 0.0)) for i in ids],
                                      ("creator_id", "category"))

    def user_features(self, user_id: str) -> dict[str, Any] | None:
        if self.down:
            raise ConnectionError("redis unreachable")
        return {"user_history": ["i29"], "user_ctr_7d": 0.1} if self.known else None

    def item_rows(self, item_ids: list[str]) -> ItemRows:
        if self.down:
            raise ConnectionError("redis unreachable")
        return self.items.rows(item_ids)

    def cold_start_lists(self) -> dict[str, list[str]]:
        if self.empty:
            return {"trending": [], "fresh": [], "popular": []}
        return {"trending": ["i100"], "fresh": ["i101"], "popular": ["i1", "i2", "i3"]}

    def has_item_features(self) -> bool:
        return not self.empty


def _manager(versions: dict[str, TinyBundle], alias: list[str]) -> BundleManager:
    def load(v: str) -> TinyBundle:
        bundle = versions[v]
        if bundle.version == "broken":
            raise OSError("artifact missing")
        return bundle

    def smoke(bundle: TinyBundle) -> None:
        if bundle.fail_rank:
            raise ValueError("smoke ranking failed")

    manager = BundleManager(lambda: alias[0], load, smoke, ServingMetrics())
    manager.refresh()
    return manager


def test_merge_keeps_first_source_and_limit() -> None:
    merged = merge_sources([("retrieval", ["a", "b"], [0.9, 0.8]), ("popular", ["b", "c"], None)],
                           limit=3)
    assert [(c.item_id, c.source) for c in merged] == [
        ("a", "retrieval"), ("b", "retrieval"), ("c", "popular")]


def test_diversify_caps_creator_then_backfills() -> None:
    ranked = [(Candidate(f"i{i}", "retrieval", 0.0), 10.0 - i) for i in range(5)]
    meta = {f"i{i}": ("same", f"c{i}") for i in range(5)}
    top = diversify(ranked, meta, k=3, max_per_creator=1, max_per_category=5)
    assert [c.item_id for c, _ in top] == ["i0", "i1", "i2"]  # backfilled after the cap
    top2 = diversify(ranked, {**meta, "i3": ("other", "c3")}, k=2, max_per_creator=1,
                     max_per_category=5)
    assert [c.item_id for c, _ in top2] == ["i0", "i3"]


def test_model_path_ranks_filters_seen_and_excluded() -> None:
    rec = Recommender(_manager({"1": TinyBundle("1")}, ["1"]), Features(), None, ServingMetrics(),
                      ServingOptions(candidates=20, max_per_creator=10, max_per_category=10))
    resp = rec.recommend(RecommendRequest(user_id="u1", k=5, exclude=["i15"]))
    ids = [i.item_id for i in resp.items]
    assert resp.source == "model" and resp.bundle_version == "1" and not resp.degraded
    assert "i29" not in ids and "i15" not in ids  # seen and excluded
    # 16 retrieval slots (i0..i15) + 4 cold-start; ranked by the (fake) ranker score
    assert ids == ["i101", "i100", "i14", "i13", "i12"]
    assert {i.source for i in resp.items} == {"fresh", "trending", "retrieval"}


def test_the_cheaper_path_under_load_skips_the_ranker_and_says_so() -> None:
    options = ServingOptions(candidates=20, load_candidates=5, max_per_creator=10,
                             max_per_category=10)
    rec = Recommender(_manager({"1": TinyBundle("1")}, ["1"]), Features(), None, ServingMetrics(),
                      options)
    resp = rec.recommend(RecommendRequest(user_id="u1", k=5), cheap=True)
    # 5 candidates (4 retrieval slots + 1 cold start) in retrieval order, no ranker fallback
    assert resp.source == "retrieval_order" and resp.degraded == ["load"]
    assert [i.item_id for i in resp.items][:4] == ["i0", "i1", "i2", "i3"]
    ranked = Recommender(rec.manager, Features(), None, ServingMetrics(),
                         ServingOptions(candidates=20, load_candidates=5, load_rank=True,
                                        max_per_creator=10, max_per_category=10))
    resp = ranked.recommend(RecommendRequest(user_id="u1", k=5), cheap=True)
    assert resp.source == "model" and resp.degraded == ["load"]


def test_unknown_user_gets_cold_start_sources() -> None:
    rec = Recommender(_manager({"1": TinyBundle("1")}, ["1"]), Features(known=False), None,
                      ServingMetrics())
    resp = rec.recommend(RecommendRequest(user_id="new", k=5))
    assert {i.source for i in resp.items} <= {"trending", "fresh", "popular"}
    assert len(resp.items) == 5


def test_redis_down_and_ranker_failure_degrade_without_error() -> None:
    bundle = TinyBundle("1", fail_rank=False)
    manager = _manager({"1": bundle}, ["1"])
    bundle.fail_rank = True  # fails after it passed the smoke test
    rec = Recommender(manager, Features(down=True), None, ServingMetrics())
    resp = rec.recommend(RecommendRequest(user_id="u1", k=3))
    assert resp.source == "retrieval_order"
    assert "user_features" in resp.degraded and "ranker" in resp.degraded
    # retrieval still runs, with default features, and its order is kept
    assert [i.item_id for i in resp.items] == ["i0", "i1", "i2"]
    assert {i.source for i in resp.items} == {"retrieval"}


def test_no_bundle_serves_popular() -> None:
    manager = BundleManager(lambda: None, lambda v: None, lambda b: None, ServingMetrics())
    rec = Recommender(manager, Features(), None, ServingMetrics())
    resp = rec.recommend(RecommendRequest(user_id="u1", k=2))
    assert resp.source == "popular" and "bundle" in resp.degraded and resp.bundle_version is None


def test_bad_versions_are_rejected_and_old_keeps_serving() -> None:
    alias = ["1"]
    versions = {"1": TinyBundle("1"), "2": TinyBundle("broken"),
                "3": TinyBundle("3", fail_rank=True), "4": TinyBundle("4")}
    manager = _manager(versions, alias)
    for bad in ("2", "3"):
        alias[0] = bad
        assert manager.refresh() is False
        assert manager.current is not None and manager.current.version == "1"
    assert manager.rejected_versions == {"2", "3"}
    alias[0] = "4"
    assert manager.refresh() is True and manager.current.version == "4"


def test_swap_never_mixes_versions_mid_request() -> None:
    alias = ["1"]
    versions = {"1": TinyBundle("1"), "2": TinyBundle("2")}
    manager = _manager(versions, alias)
    rec = Recommender(manager, Features(), None, ServingMetrics())
    prepared = rec.prepare(RecommendRequest(user_id="u1", k=3))
    alias[0] = "2"
    assert manager.refresh()
    scores = rec.rank(prepared)  # ranked with the version the request started with
    resp = rec.finish(prepared, scores)
    assert resp.bundle_version == "1" and versions["1"].ranked_versions == ["1"]
    assert versions["2"].ranked_versions == []


def test_concurrent_requests_during_swaps_never_fail() -> None:
    alias = ["1"]
    versions = {str(v): TinyBundle(str(v)) for v in range(1, 6)}
    manager = _manager(versions, alias)
    rec = Recommender(manager, Features(), None, ServingMetrics())
    errors: list[BaseException] = []
    seen: set[str | None] = set()

    def client() -> None:
        for _ in range(40):
            try:
                resp = rec.recommend(RecommendRequest(user_id="u1", k=3))
                seen.add(resp.bundle_version)
                assert resp.source == "model"
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for v in range(2, 6):
        alias[0] = str(v)
        manager.refresh()
    for t in threads:
        t.join()
    assert not errors and manager.current is not None and manager.current.version == "5"


@pytest.mark.parametrize("body", [{"user_id": "u", "k": 0}, {"user_id": "u", "k": 201},
                                  {"user_id": "u", "colour": "red"}, {"k": 3}])
def test_request_validation(body: dict[str, Any]) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        RecommendRequest(**body)


def test_impression_log_writes_contract_rows_and_keeps_rows_on_failure(tmp_path: Any) -> None:
    import pyarrow.parquet as pq

    from recsys_core.contracts import validate_events
    from recsys_platform.serving.impressions import ImpressionLogger

    blocked = tmp_path / "blocked"
    blocked.write_text("a file where a folder should be")
    failing = ImpressionLogger(blocked, flush_every=10_000)
    failing.log("r1", "u1", [("i1", 0.5, "retrieval")], "3", "feed", "ios")
    with pytest.raises(OSError):
        failing.flush()
    assert len(failing._served) == 1  # kept for the next flush

    log = ImpressionLogger(tmp_path / "landing", stream_dir=tmp_path / "stream",
                           flush_every=10_000)
    log.log("r1", "u1", [("i1", 0.5, "retrieval"), ("i2", 0.4, "popular")], "3", "feed", "ios")
    assert log.flush() == 2
    events = pq.read_table(next((tmp_path / "landing" / "events").rglob("*.parquet"))).to_pandas()
    valid, rejected = validate_events(events)
    assert rejected.empty and list(valid["event_id"]) == ["r1-0", "r1-1"]
    assert set(valid["model_version"]) == {"3"}
    served = pq.read_table(next((tmp_path / "landing" / "served").rglob("*.parquet")))
    assert served.column("position").to_pylist() == [0, 1]
    assert len(list((tmp_path / "stream").glob("*.jsonl"))) == 1


def test_pseudonymized_user_id_is_looked_up_and_logged(tmp_path: Any) -> None:
    import pyarrow.parquet as pq

    from recsys_core.privacy import pseudonymize
    from recsys_platform.serving.impressions import ImpressionLogger

    asked: list[str] = []

    class Recording(Features):
        def user_features(self, user_id: str) -> dict[str, Any] | None:
            asked.append(user_id)
            return super().user_features(user_id)

    log = ImpressionLogger(tmp_path / "landing", flush_every=10_000)
    options = ServingOptions(candidates=20, pseudonym_key="secret")
    rec = Recommender(_manager({"1": TinyBundle("1")}, ["1"]), Recording(), log,
                      ServingMetrics(), options)
    resp = rec.recommend(RecommendRequest(user_id="alice", k=3))
    pseudonym = pseudonymize("alice", "secret")
    assert asked == [pseudonym] and resp.user_id == "alice"  # the caller's own id comes back
    assert log.flush() == 3
    served = pq.read_table(next((tmp_path / "landing" / "served").rglob("*.parquet")))
    assert set(served.column("user_id").to_pylist()) == {pseudonym}

    plain = Recommender(_manager({"1": TinyBundle("1")}, ["1"]), Recording(), None,
                        ServingMetrics(), ServingOptions(candidates=20))
    plain.recommend(RecommendRequest(user_id="alice", k=3))
    assert asked[-1] == "alice"  # off by default


def test_the_impression_log_records_the_user_features_and_history_the_model_was_given(
    tmp_path: Any,
) -> None:
    import json

    import pyarrow.parquet as pq

    from recsys_platform.serving.impressions import ImpressionLogger

    log = ImpressionLogger(tmp_path / "landing", flush_every=10_000)
    rec = Recommender(_manager({"1": TinyBundle("1")}, ["1"]), Features(), log,
                      ServingMetrics(), ServingOptions(candidates=20))
    resp = rec.recommend(RecommendRequest(user_id="u1", k=3))
    assert log.flush() == 3
    served = pq.read_table(next((tmp_path / "landing" / "served").rglob("*.parquet")))
    assert set(served.column("request_id").to_pylist()) == {resp.request_id}
    assert [json.loads(t) for t in served.column("user_features").to_pylist()] == [
        {"user_ctr_7d": 0.1}] * 3  # the numeric features: no lists, no ids
    assert [json.loads(t) for t in served.column("user_history").to_pylist()] == [["i29"]] * 3


def test_item_cache_reads_misses_once_and_expires_rows_after_the_ttl() -> None:
    now = [0.0]
    table = {"a": (3, "cr1", "cat1"), "b": (None, None, "cat2")}
    reads: list[list[str]] = []

    def fetch(ids: Any) -> list[tuple[Any, ...]]:
        reads.append(list(ids))
        return [tuple((v, float(v) if isinstance(v, int) else 0.0)
                      for v in table.get(i, (None, None, None))) for i in ids]

    cache = ItemFeatureCache(fetch, ("item_clicks_7d", "creator_id", "category"), ttl_s=30,
                             capacity=3, clock=lambda: now[0], refresh_after=1.0)
    rows = cache.rows(["a", "b", "a", "gone"])
    assert reads == [["a", "b", "gone"]]  # one read of the distinct misses
    assert rows.metadata["a"] == ("cr1", "cat1") and rows.metadata["b"] == ("", "cat2")
    np.testing.assert_array_equal(rows.numeric(["b", "a", "x"], ["item_clicks_7d", "nope"]),
                                  [[0, 0], [3, 0], [0, 0]])
    assert rows.values("b") == {"category": "cat2"} and rows.values("x") == {}
    table["a"] = (5, "cr1", "cat1")
    now[0] = 29.0
    assert cache.rows(["a"]).values("a")["item_clicks_7d"] == 3 and len(reads) == 1
    now[0] = 31.0  # past the TTL: read again, new value served
    assert cache.rows(["a"]).values("a")["item_clicks_7d"] == 5 and reads[-1] == ["a"]
    cache.rows(["c", "d"])
    assert len(cache) == 3  # bounded: the least recently used row was dropped


def test_rows_in_use_are_re_read_in_the_background_before_they_expire() -> None:
    now = [0.0]
    value = [1]
    cache = ItemFeatureCache(lambda ids: [((value[0], float(value[0])),) for _ in ids],
                             ("item_clicks_7d",), ttl_s=30, clock=lambda: now[0])
    assert cache.rows(["a"]).values("a") == {"item_clicks_7d": 1}
    value[0] = 2
    now[0] = 20.0  # past half the TTL: served as it is, and marked for a re-read
    cache._thread = threading.Thread()  # no background thread: refresh_due is called here
    assert cache.rows(["a"]).values("a") == {"item_clicks_7d": 1}
    assert cache.refresh_due() == 1 and cache.misses == 1
    now[0] = 45.0  # past the first read's TTL, within the re-read's
    assert cache.rows(["a"]).values("a") == {"item_clicks_7d": 2} and cache.misses == 1


def test_a_failed_item_read_serves_stale_rows_and_pauses_reads() -> None:
    from recsys_platform.serving.item_features import ItemReadError

    now = [0.0]
    down = [False]
    reads: list[list[str]] = []

    def fetch(ids: Any) -> list[tuple[Any, ...]]:
        reads.append(list(ids))
        if down[0]:
            raise ConnectionError("redis down")
        return [((7, 7.0),) for _ in ids]

    cache = ItemFeatureCache(fetch, ("item_clicks_7d",), ttl_s=30, clock=lambda: now[0],
                             refresh_after=1.0)
    cache.rows(["a"])
    down[0], now[0] = True, 40.0  # "a" expired, Redis down
    with pytest.raises(ItemReadError) as failed:
        cache.rows(["a", "b"])
    assert failed.value.rows.values("a") == {"item_clicks_7d": 7}  # stale beats nothing
    assert failed.value.rows.values("b") == {}
    with pytest.raises(ItemReadError):
        cache.rows(["b"])
    assert len(reads) == 2  # paused: no third read within retry_after_s
    down[0], now[0] = False, 42.0
    assert cache.rows(["b"]).values("b") == {"item_clicks_7d": 7} and len(reads) == 3


def test_cold_start_lists_keep_the_old_lists_when_a_read_fails() -> None:
    answers: list[Any] = [{"popular": ["a"], "fresh": ["b"]}, RuntimeError("redis down")]

    def read() -> dict[str, list[str]]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    lists = ColdStartLists(read)
    assert not lists.has_features and lists.refresh() and lists.has_features
    assert not lists.refresh()
    assert lists.lists == {"trending": [], "fresh": ["b"], "popular": ["a"]}


def test_nonfinite_scores_fall_back_to_retrieval_order_and_are_counted() -> None:
    """Before: NaN ranker scores were served (``score: null``) with ``degraded: []``."""
    metrics = ServingMetrics()
    bundle = TinyBundle("1", nan_items=frozenset({"i3", "i7"}))
    manager = BundleManager(lambda: "1", lambda v: bundle, lambda b: None, metrics)
    manager.refresh()
    rec = Recommender(manager, Features(), None, metrics,
                      ServingOptions(candidates=20, max_per_creator=10, max_per_category=10))
    resp = rec.recommend(RecommendRequest(user_id="u1", k=5))
    assert resp.source == "retrieval_order" and resp.degraded == ["ranker"]
    assert [i.item_id for i in resp.items] == ["i0", "i1", "i2", "i3", "i4"]
    assert all(np.isfinite(i.score) for i in resp.items)
    assert metrics.fallbacks.labels("ranker")._value.get() == 1
    assert metrics.nonfinite_scores._value.get() == 2
    prepared = rec.prepare(RecommendRequest(user_id="u1", k=5))  # the batched path too
    scores = np.full(len(prepared.candidates), np.inf)
    assert rec.finish(prepared, scores, log=False).degraded == ["ranker"]


def test_the_smoke_check_rejects_a_ranker_with_nan_scores() -> None:
    """Before: the smoke query ranked the cold user's retrieval only; a bundle whose
    ranker gives NaN for real catalog items passed and was served."""
    from recsys_platform.serving.factory import smoke_test

    smoke_test(TinyBundle("1"))
    with pytest.raises(ValueError, match="non-finite scores"):
        smoke_test(TinyBundle("2", nan_items=frozenset({"i17"})))  # not in the top 10
    metrics = ServingMetrics()
    alias = ["1"]
    versions = {"1": TinyBundle("1"), "2": TinyBundle("2", nan_items=frozenset({"i17"}))}
    manager = BundleManager(lambda: alias[0], versions.__getitem__, smoke_test, metrics)
    assert manager.refresh()
    alias[0] = "2"
    assert not manager.refresh() and manager.rejected_versions == {"2"}
    assert manager.current is not None and manager.current.version == "1"


def test_an_empty_online_store_is_reported_not_served_as_cold_start() -> None:
    """Before: Redis up with no keys served known users popular items with ``degraded: []``."""
    metrics = ServingMetrics()
    rec = Recommender(_manager({"1": TinyBundle("1")}, ["1"]),
                      Features(known=False, empty=True), None, metrics)
    resp = rec.recommend(RecommendRequest(user_id="u1", k=3))
    assert resp.degraded == ["user_features_missing"]
    assert "retrieval" in {i.source for i in resp.items}  # the bundle still retrieves
    assert metrics.fallbacks.labels("user_features_missing")._value.get() == 1
    cold = Recommender(_manager({"1": TinyBundle("1")}, ["1"]), Features(known=False), None,
                       ServingMetrics()).recommend(RecommendRequest(user_id="new", k=3))
    assert cold.degraded == []  # a populated store: an unknown user is a new user


def test_a_restart_on_a_broken_champion_serves_the_last_good_version(tmp_path: Any) -> None:
    """Before: a replica (re)started while the alias named a broken version served popular
    items only, and /readyz was 503, for as long as the alias stayed broken."""
    from recsys_platform.serving.bundle_manager import LastGood

    versions = {"1": TinyBundle("1"), "2": TinyBundle("broken"),
                "3": TinyBundle("3", fail_rank=True), "4": TinyBundle("4")}
    last_good = LastGood(tmp_path / "last_good.json", "recsys-bundle")

    def manager(alias: list[str], metrics: ServingMetrics) -> BundleManager:
        def load(v: str) -> TinyBundle:
            if versions[v].version == "broken":
                raise OSError("artifact missing")
            return versions[v]

        def smoke(bundle: TinyBundle) -> None:
            if bundle.fail_rank:
                raise ValueError("smoke ranking failed")

        built = BundleManager(lambda: alias[0], load, smoke, metrics, last_good)
        built.refresh()
        return built

    first = manager(["1"], ServingMetrics())
    assert first.current is not None and not first.fallback and last_good.read() == "1"
    for broken in ("2", "3"):  # a restart while the alias names a broken version
        metrics = ServingMetrics()
        alias = [broken]
        restarted = manager(alias, metrics)
        assert restarted.current is not None and restarted.current.version == "1"
        assert restarted.fallback and restarted.champion_version == broken
        assert restarted.rejected_versions == {broken}
        assert metrics.bundle_fallback._value.get() == 1
        assert last_good.read() == "1"  # a fallback is not a new last good version
        alias[0] = "4"  # the alias is fixed
        assert restarted.refresh() and restarted.current.version == "4"
        assert not restarted.fallback and metrics.bundle_fallback._value.get() == 0
        assert last_good.read() == "4"
        last_good.write("1")
    assert LastGood(tmp_path / "last_good.json", "another-model").read() is None
    def missing(version: str) -> TinyBundle:
        raise OSError(f"version {version}: artifact missing")

    nothing = BundleManager(lambda: "2", missing, lambda b: None, ServingMetrics(),
                            LastGood(tmp_path / "none.json", "recsys-bundle"))
    assert not nothing.refresh() and nothing.current is None  # no last good version anywhere
