"""Admission by predicted queue time, and Retry-After on every 503 of Serve's HTTP servers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from recsys_platform.serving.admission import Admission, AdmissionPolicy, Mode
from recsys_platform.serving.ingress import AdmissionGate, RetryAfterOn503, http_middlewares


def fill(admission: Admission, n: int) -> list[Any]:
    return [admission.admit() for _ in range(n)]


def test_the_limit_follows_the_measured_service_time() -> None:
    """A 10.5 ms budget admits 1 + 10.5/s requests at once: 3 at 4 ms each, 11 at 1 ms."""
    policy = AdmissionPolicy(queue_budget_s=0.0105, cheap_path=False, smoothing=1.0)
    for service_s, expected in ((0.004, 3), (0.001, 11)):
        admission = Admission(policy)
        admission.done(admission.admit(), service_s)  # learn the service time
        tickets = fill(admission, 20)
        admitted = [t for t in tickets if t is not None]
        assert len(admitted) == expected == admission.concurrency_limit()
        assert tickets[len(admitted):] == [None] * (20 - len(admitted))  # then refused


def test_past_the_degrade_share_requests_take_the_cheaper_path() -> None:
    admission = Admission(AdmissionPolicy(queue_budget_s=0.0095, degrade_share=0.5,
                                          smoothing=1.0))
    admission.done(admission.admit(), 0.004)
    admission.service_s[Mode.CHEAP] = 0.002
    modes = [t.mode if t else None for t in fill(admission, 8)]
    # waits 0, 4, 8, 10 ms: full while <= 4.75 ms, cheap while <= 9.5 ms, then refused
    assert modes == [Mode.FULL, Mode.FULL, Mode.CHEAP, None, None, None, None, None]


def test_finished_work_frees_room_and_an_idle_worker_always_admits() -> None:
    admission = Admission(AdmissionPolicy(queue_budget_s=0.001, initial_service_s=1.0,
                                          cheap_path=False))
    first = admission.admit()
    assert first is not None  # an idle worker takes any request, however slow they are
    second = admission.admit()
    assert second is not None  # and one may wait behind it
    assert admission.admit() is None
    admission.done(first, None)
    admission.done(second, None)
    admission.done(second, None)  # a second release changes nothing
    assert admission.pending_s == 0 and admission.in_flight == 0
    assert admission.admit() is not None


def test_invalid_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="queue_budget_s"):
        Admission(AdmissionPolicy(queue_budget_s=0))


def _responses(app: Any) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    asyncio.run(RetryAfterOn503(app)({"type": "http"}, receive, send))
    return sent


def test_every_503_gets_retry_after_and_others_are_untouched() -> None:
    def app_answering(status: int, headers: list[tuple[bytes, bytes]]) -> Any:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": b"x"})
        return app

    ray_503 = _responses(app_answering(503, []))  # Ray's backpressure answer: no header
    assert (b"retry-after", b"1") in ray_503[0]["headers"]
    own = _responses(app_answering(503, [(b"Retry-After", b"3")]))
    assert own[0]["headers"] == [(b"Retry-After", b"3")]  # the app's own header is kept
    ok = _responses(app_answering(200, [(b"content-type", b"text/plain")]))
    assert ok[0]["headers"] == [(b"content-type", b"text/plain")]
    assert [m.cls for m in http_middlewares()] == [RetryAfterOn503, AdmissionGate]


def test_the_gate_refuses_before_the_app_and_always_releases_its_ticket() -> None:
    from recsys_platform.serving import admission as module
    from recsys_platform.serving.ingress import TICKET

    admission = Admission(AdmissionPolicy(queue_budget_s=0.001, initial_service_s=1.0,
                                          cheap_path=False))
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:  # never releases the ticket
        seen.append(scope.get(TICKET))
        await send({"type": "http.response.start", "status": 422, "headers": []})

    async def call(path: str) -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await AdmissionGate(app)({"type": "http", "method": "POST", "path": path}, None, send)
        return sent

    async def scenario() -> None:
        answered = (await call("/recommend"))[0]
        assert answered["status"] == 422  # admitted: reaches the app
        timing = dict(answered["headers"])[b"server-timing"]  # ms from admission to answer
        assert timing.startswith(b"app;dur=") and float(timing[8:]) >= 0
        assert seen[-1] is not None and seen[-1].released  # and the gate released it
        busy = [admission.admit(), admission.admit()]  # one in service, one waiting
        refused = await call("/recommend")
        assert refused[0]["status"] == 503 and (b"retry-after", b"1") in refused[0]["headers"]
        assert len(seen) == 1  # the app never saw the refused request
        assert (await call("/readyz"))[0]["status"] == 422  # other paths pass through
        for ticket in busy:
            assert ticket is not None
            admission.done(ticket, None)

    module.install(admission)
    try:
        asyncio.run(scenario())
    finally:
        module.install(None)
    assert admission.in_flight == 0


def test_one_request_may_always_wait_behind_the_one_in_service() -> None:
    """A service time past the budget still lets one request queue: no idle worker."""
    admission = Admission(AdmissionPolicy(queue_budget_s=0.002, cheap_path=False,
                                          smoothing=1.0))
    admission.done(admission.admit(), 0.008)
    modes = [t.mode if t else None for t in fill(admission, 4)]
    assert modes == [Mode.FULL, Mode.FULL, None, None] and admission.concurrency_limit() == 2


def test_a_slower_replica_is_learnt_within_a_few_requests_and_relaxes_slowly() -> None:
    admission = Admission(AdmissionPolicy(initial_service_s=0.005))
    for _ in range(5):  # CPU taken away: 4x the service time
        admission.done(admission.admit(), 0.020)
    slowed = admission.service_s[Mode.FULL]
    assert slowed > 0.015
    for _ in range(5):  # back to normal: the estimate comes down, but slowly
        admission.done(admission.admit(), 0.005)
    assert 0.010 < admission.service_s[Mode.FULL] < slowed


def test_service_times_measured_during_a_bundle_load_are_not_learnt() -> None:
    """The replica's own background work (loading the next bundle) is not overload: the
    slow requests it causes change neither the estimate nor the limit, so nothing is shed;
    once the load is over, a slowdown is learnt again."""
    loading = [False]
    admission = Admission(AdmissionPolicy(initial_service_s=0.005, cheap_path=False),
                          background_busy=lambda: loading[0])
    limit = admission.concurrency_limit()
    loading[0] = True
    for _ in range(10):  # 4x slower while the load takes the GIL
        admission.done(admission.admit(), 0.020)
    ticket = admission.admit()  # admitted during the load, finished after it
    loading[0] = False
    assert ticket is not None
    admission.done(ticket, 0.020)
    assert admission.service_s[Mode.FULL] == 0.005 and admission.concurrency_limit() == limit
    assert admission.unlearnt == 11 and admission.state()["unlearnt"] == 11
    admission.done(admission.admit(), 0.020)  # no load now: a slower replica is real
    assert admission.service_s[Mode.FULL] > 0.005


def test_the_bundle_manager_says_while_it_loads() -> None:
    from recsys_platform.serving.bundle_manager import BundleManager
    from recsys_platform.serving.metrics import ServingMetrics

    seen: list[bool] = []

    def load(version: str) -> str:
        seen.append(manager.loading)
        if version == "2":
            raise ValueError("broken")
        return f"bundle {version}"

    versions = iter(["1", "2"])
    manager = BundleManager(lambda: next(versions), load, lambda bundle: None,
                            ServingMetrics())
    assert not manager.loading
    assert manager.refresh() and not manager.refresh()  # 2 is rejected
    assert seen == [True, True] and not manager.loading
