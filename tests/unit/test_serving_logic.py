"""Pure serving logic: candidate merging, diversity, atomic bundle swaps, fallbacks.

The bundles are tiny real ones (tests/unit/tiny_bundle.py: untrained towers and ranker over 30
items, built like training builds them), scored through the one ranking path; the feature
source is an in-memory stand-in. The real components are exercised in tests/integration/serving.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from recsys_models.bundle import Bundle
from recsys_platform.serving.bundle_manager import BundleManager
from recsys_platform.serving.candidates import Candidate, diversify, merge_sources
from recsys_platform.serving.item_features import ColdStartLists, ItemFeatureCache, ItemRows
from recsys_platform.serving.metrics import ServingMetrics
from recsys_platform.serving.recommender import Recommender, ServingOptions
from recsys_platform.serving.schemas import RecommendRequest
from tests.unit.tiny_bundle import (
    USER_FEATURES,
    break_ranker,
    poison_items,
    ranked_order,
    record_rankings,
    retrieval_order,
    tiny_bundle,
)


class Features:
    """The feature source over an in-memory item table (``i<n>``: creator ``cr<n % 3>``,
    category ``cat<n % 2>``) through the real :class:`ItemFeatureCache`."""

    def __init__(self, known: bool = True, down: bool = False, empty: bool = False,
                 lists: dict[str, list[str]] | None = None) -> None:
        self.known, self.down, self.empty = known, down, empty  # empty: no online features
        self.lists = lists or {"trending": ["i27"], "fresh": ["i28"], "popular": ["i1", "i2", "i3"]}
        self.items = ItemFeatureCache(lambda ids: [((f"cr{int(i[1:]) % 3}", 0.0),
                                                    (f"cat{int(i[1:]) % 2}", 0.0)) for i in ids],
                                      ("creator_id", "category"))

    def user_features(self, user_id: str) -> dict[str, Any] | None:
        if self.down:
            raise ConnectionError("redis unreachable")
        return {"user_history": ["i29"], **USER_FEATURES} if self.known else None

    def item_rows(self, item_ids: list[str]) -> ItemRows:
        if self.down:
            raise ConnectionError("redis unreachable")
        return self.items.rows(item_ids)

    def cold_start_lists(self) -> dict[str, list[str]]:
        if self.empty:
            return {"trending": [], "fresh": [], "popular": []}
        return self.lists

    def has_item_features(self) -> bool:
        return not self.empty


def _manager(versions: dict[str, Bundle], alias: list[str]) -> BundleManager:
    """A manager over ``versions`` with the real smoke test; version "broken" fails to load."""
    from recsys_platform.serving.factory import smoke_test

    def load(v: str) -> Bundle:
        if v == "broken" or versions[v].version == "broken":
            raise OSError("artifact missing")
        return versions[v]

    manager = BundleManager(lambda: alias[0], load, smoke_test, ServingMetrics())
    manager.refresh()
    return manager


def _broken(version: str) -> Bundle:
    """A bundle whose ranker raises (it fails the smoke test)."""
    bundle = tiny_bundle(version)
    break_ranker(bundle)
    return bundle


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
    bundle = tiny_bundle("1")
    rec = Recommender(_manager({"1": bundle}, ["1"]), Features(), None, ServingMetrics(),
                      ServingOptions(candidates=20, max_per_creator=10, max_per_category=10))
    history = ["i29"]
    retrieved = retrieval_order(bundle, "u1", history, USER_FEATURES, 16)
    excluded = retrieved[0]  # the user's best retrieved item, excluded by the caller
    resp = rec.recommend(RecommendRequest(user_id="u1", k=5, exclude=[excluded]))
    ids = [i.item_id for i in resp.items]
    assert resp.source == "model" and resp.bundle_version == "1" and not resp.degraded
    assert "i29" not in ids and excluded not in ids  # seen and excluded
    # 16 retrieval slots + the cold-start lists, ranked by the bundle's own blended score
    candidates = list(dict.fromkeys([*retrieved, "i27", "i28", "i1", "i2", "i3"]))
    candidates = [c for c in candidates if c not in {excluded, "i29"}]
    assert ids == ranked_order(bundle, "u1", history, USER_FEATURES, candidates)[:5]
    assert ids != [c for c in retrieved if c != excluded][:5]  # the ranker re-ordered them
    assert {i.source for i in resp.items} <= {"fresh", "trending", "popular", "retrieval"}


def test_a_candidate_the_bundle_has_not_indexed_is_ranked_from_its_metadata() -> None:
    """A cold-start list item the bundle has no row for (not indexed yet) is scored through
    Bundle.rank (the same scoring's frame entry) with the rest of the request."""
    bundle = tiny_bundle("1")
    lists = {"trending": ["i100"], "fresh": [], "popular": []}
    rec = Recommender(_manager({"1": bundle}, ["1"]), Features(lists=lists), None,
                      ServingMetrics(), ServingOptions(candidates=10, max_per_creator=10,
                                                      max_per_category=10))
    prepared = rec.prepare(RecommendRequest(user_id="u1", k=10))
    ids = [c.item_id for c in prepared.candidates]
    assert "i100" in ids and "i100" not in set(map(str, bundle.item_ids))
    scores = rec.rank(prepared)
    assert np.isfinite(scores).all()
    resp = rec.finish(prepared, scores, log=False)
    assert resp.source == "model" and not resp.degraded
    assert [i.item_id for i in resp.items] == ranked_order(bundle, "u1", ["i29"], USER_FEATURES,
                                                           ids)


def test_the_cheaper_path_under_load_skips_the_ranker_and_says_so() -> None:
    options = ServingOptions(candidates=20, load_candidates=5, max_per_creator=10,
                             max_per_category=10)
    bundle = tiny_bundle("1")
    rec = Recommender(_manager({"1": bundle}, ["1"]), Features(), None, ServingMetrics(),
                      options)
    resp = rec.recommend(RecommendRequest(user_id="u1", k=5), cheap=True)
    # 5 candidates (4 retrieval slots + 1 cold start) in retrieval order, no ranker fallback
    assert resp.source == "retrieval_order" and resp.degraded == ["load"]
    retrieved = [i for i in retrieval_order(bundle, "u1", ["i29"], USER_FEATURES, 5) if i != "i29"]
    assert [i.item_id for i in resp.items][:4] == retrieved[:4]
    ranked = Recommender(rec.manager, Features(), None, ServingMetrics(),
                         ServingOptions(candidates=20, load_candidates=5, load_rank=True,
                                        max_per_creator=10, max_per_category=10))
    resp = ranked.recommend(RecommendRequest(user_id="u1", k=5), cheap=True)
    assert resp.source == "model" and resp.degraded == ["load"]


def test_unknown_user_gets_cold_start_sources() -> None:
    rec = Recommender(_manager({"1": tiny_bundle("1")}, ["1"]), Features(known=False), None,
                      ServingMetrics())
    resp = rec.recommend(RecommendRequest(user_id="new", k=5))
    assert {i.source for i in resp.items} <= {"trending", "fresh", "popular"}
    assert len(resp.items) == 5


def test_redis_down_and_ranker_failure_degrade_without_error() -> None:
    bundle = tiny_bundle("1")
    manager = _manager({"1": bundle}, ["1"])
    break_ranker(bundle)  # fails after it passed the smoke test
    rec = Recommender(manager, Features(down=True), None, ServingMetrics())
    resp = rec.recommend(RecommendRequest(user_id="u1", k=3))
    assert resp.source == "retrieval_order"
    assert "user_features" in resp.degraded and "ranker" in resp.degraded
    # retrieval still runs, with default features, and its order is kept
    assert [i.item_id for i in resp.items] == retrieval_order(bundle, "u1", [], {}, 3)
    assert {i.source for i in resp.items} == {"retrieval"}


def test_no_bundle_serves_popular() -> None:
    manager = BundleManager(lambda: None, lambda v: None, lambda b: None, ServingMetrics())
    rec = Recommender(manager, Features(), None, ServingMetrics())
    resp = rec.recommend(RecommendRequest(user_id="u1", k=2))
    assert resp.source == "popular" and "bundle" in resp.degraded and resp.bundle_version is None


def test_bad_versions_are_rejected_and_old_keeps_serving() -> None:
    alias = ["1"]
    versions = {"1": tiny_bundle("1"), "2": tiny_bundle("broken"), "3": _broken("3"),
                "4": tiny_bundle("4")}
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
    versions = {"1": tiny_bundle("1"), "2": tiny_bundle("2")}
    manager = _manager(versions, alias)  # smoke-tested version 1 before the hooks
    rec = Recommender(manager, Features(), None, ServingMetrics())
    prepared = rec.prepare(RecommendRequest(user_id="u1", k=3))
    alias[0] = "2"
    assert manager.refresh()
    calls: list[str] = []
    for bundle in versions.values():
        record_rankings(bundle, calls)
    scores = rec.rank(prepared)  # ranked with the version the request started with
    resp = rec.finish(prepared, scores)
    assert resp.bundle_version == "1" and calls == ["1"]


def test_concurrent_requests_during_swaps_never_fail() -> None:
    alias = ["1"]
    versions = {str(v): tiny_bundle(str(v)) for v in range(1, 6)}
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
    rec = Recommender(_manager({"1": tiny_bundle("1")}, ["1"]), Recording(), log,
                      ServingMetrics(), options)
    resp = rec.recommend(RecommendRequest(user_id="alice", k=3))
    pseudonym = pseudonymize("alice", "secret")
    assert asked == [pseudonym] and resp.user_id == "alice"  # the caller's own id comes back
    assert log.flush() == 3
    served = pq.read_table(next((tmp_path / "landing" / "served").rglob("*.parquet")))
    assert set(served.column("user_id").to_pylist()) == {pseudonym}

    plain = Recommender(_manager({"1": tiny_bundle("1")}, ["1"]), Recording(), None,
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
    rec = Recommender(_manager({"1": tiny_bundle("1")}, ["1"]), Features(), log,
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
    bundle = tiny_bundle("1")
    retrieved = [i for i in retrieval_order(bundle, "u1", ["i29"], USER_FEATURES, 17) if i != "i29"]
    poison_items(bundle, [retrieved[3], retrieved[7]])
    manager = BundleManager(lambda: "1", lambda v: bundle, lambda b: None, metrics)
    manager.refresh()
    rec = Recommender(manager, Features(), None, metrics,
                      ServingOptions(candidates=20, max_per_creator=10, max_per_category=10))
    resp = rec.recommend(RecommendRequest(user_id="u1", k=5))
    assert resp.source == "retrieval_order" and resp.degraded == ["ranker"]
    assert [i.item_id for i in resp.items] == retrieved[:5]
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

    smoke_test(tiny_bundle("1"))
    poisoned = tiny_bundle("2")
    poison_items(poisoned, ["i17"])  # not in the top 10
    with pytest.raises(ValueError, match="non-finite"):
        smoke_test(poisoned)
    metrics = ServingMetrics()
    alias = ["1"]
    versions = {"1": tiny_bundle("1"), "2": poisoned}
    manager = BundleManager(lambda: alias[0], versions.__getitem__, smoke_test, metrics)
    assert manager.refresh()
    alias[0] = "2"
    assert not manager.refresh() and manager.rejected_versions == {"2"}
    assert manager.current is not None and manager.current.version == "1"


def test_an_empty_online_store_is_reported_not_served_as_cold_start() -> None:
    """Before: Redis up with no keys served known users popular items with ``degraded: []``."""
    metrics = ServingMetrics()
    rec = Recommender(_manager({"1": tiny_bundle("1")}, ["1"]),
                      Features(known=False, empty=True), None, metrics)
    resp = rec.recommend(RecommendRequest(user_id="u1", k=3))
    assert resp.degraded == ["user_features_missing"]
    assert "retrieval" in {i.source for i in resp.items}  # the bundle still retrieves
    assert metrics.fallbacks.labels("user_features_missing")._value.get() == 1
    cold = Recommender(_manager({"1": tiny_bundle("1")}, ["1"]), Features(known=False), None,
                       ServingMetrics()).recommend(RecommendRequest(user_id="new", k=3))
    assert cold.degraded == []  # a populated store: an unknown user is a new user


def test_a_restart_on_a_broken_champion_serves_the_last_good_version(tmp_path: Any) -> None:
    """Before: a replica (re)started while the alias named a broken version served popular
    items only, and /readyz was 503, for as long as the alias stayed broken."""
    from recsys_platform.serving.bundle_manager import LastGood
    from recsys_platform.serving.factory import smoke_test

    versions = {"1": tiny_bundle("1"), "2": tiny_bundle("broken"), "3": _broken("3"),
                "4": tiny_bundle("4")}
    last_good = LastGood(tmp_path / "last_good.json", "recsys-bundle")

    def manager(alias: list[str], metrics: ServingMetrics) -> BundleManager:
        def load(v: str) -> Bundle:
            if versions[v].version == "broken":
                raise OSError("artifact missing")
            return versions[v]

        built = BundleManager(lambda: alias[0], load, smoke_test, metrics, last_good)
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
    def missing(version: str) -> Bundle:
        raise OSError(f"version {version}: artifact missing")

    nothing = BundleManager(lambda: "2", missing, lambda b: None, ServingMetrics(),
                            LastGood(tmp_path / "none.json", "recsys-bundle"))
    assert not nothing.refresh() and nothing.current is None  # no last good version anywhere
