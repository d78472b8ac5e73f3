"""Admission control of one replica: serve, serve the cheaper path, or refuse at once.

A replica runs its hot path on a few worker threads (one by default), so a request it admits
waits for the work admitted before it. :class:`Admission` keeps the measured service time of
each path (a moving average of the seconds a request held a worker) and the predicted work in
flight, and admits a request only while its predicted queue wait stays within a budget:

- predicted wait <= ``degrade_share`` x budget: the full path;
- predicted wait <= budget: the cheaper path (fewer candidates, retrieval order; the response
  says ``degraded: ["load"]``), when enabled;
- beyond: refused (503 with ``Retry-After``), in microseconds, before any work is done.

The budget is ``queue_budget_s`` but never less than one full request's service time: one
request may always wait behind the one in service, so a worker never idles between two
requests under load (the goodput) even where the service time exceeds the budget.

The limit is therefore a concurrency limit derived from the measured service time (a slower
machine or a heavier bundle admits fewer requests at once), not a fixed count: the replica
keeps its workers busy at about its capacity while the requests it admits keep close to their
unloaded latency, instead of everyone waiting in a queue.

A replica's own background work is not overload: while ``background_busy()`` says so (the
replica loads and smoke-tests the next bundle version beside the one it serves, taking the
GIL and a core for seconds), the service times measured are not learnt, so the estimate stays
the replica's steady one and a hot swap sheds nothing. CPU taken by anything else (another
replica starting on the same machine) is learnt as usual: that slowdown is real capacity lost.

Under direct ingress the replica's HTTP server asks first (``ingress.AdmissionGate``, before
Ray Serve's per-request machinery: a refusal then costs little of the replica's CPU); the
request handler asks when no gate did (through Serve's proxy). Thread-safe: the gate runs on
Serve's event loop, the handler on the user code's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum


class Mode(StrEnum):
    FULL = "full"
    CHEAP = "cheap"  # fewer candidates, retrieval order: degraded ["load"]


@dataclass(frozen=True)
class AdmissionPolicy:
    """How much queueing a replica accepts (``serving.admission`` settings)."""

    queue_budget_s: float = 0.010  # the most predicted queue wait an admitted request gets
    degrade_share: float = 0.5  # past this share of the budget: the cheaper path
    cheap_path: bool = True  # False: full path up to the budget, then refuse
    workers: int = 1  # threads running the hot path
    smoothing: float = 0.05  # weight of each new service time in the moving average
    # ... of one longer than the average: a replica that slows down (its CPU taken by a replica
    # starting beside it, say) admits fewer requests within a few of them, and relaxes slowly.
    rising: float = 0.3
    initial_service_s: float = 0.005  # the estimate before anything was measured


@dataclass
class Ticket:
    """One admitted request: its path and the work it was counted for."""

    mode: Mode
    predicted_s: float
    released: bool = False
    background: bool = False  # admitted while the replica's background work ran


class Admission:
    """Admits by predicted queue time; learns each path's service time as requests finish.

    Example:
        >>> admission = Admission(AdmissionPolicy(queue_budget_s=0.01))
        >>> ticket = admission.admit()
        >>> ticket.mode
        <Mode.FULL: 'full'>
        >>> admission.done(ticket, service_s=0.004)
    """

    def __init__(self, policy: AdmissionPolicy = AdmissionPolicy(),
                 on_refuse: Callable[[], None] | None = None,
                 background_busy: Callable[[], bool] | None = None) -> None:
        if policy.queue_budget_s <= 0 or policy.workers < 1:
            raise ValueError("queue_budget_s must be > 0 and workers >= 1")
        self.policy = policy
        self.on_refuse = on_refuse  # e.g. counts the refusal in the replica's metrics
        # True while the replica's own background work runs (a bundle load): not overload
        self.background_busy = background_busy or (lambda: False)
        self.unlearnt = 0  # service times not learnt (measured during background work)
        self._lock = threading.Lock()
        start = policy.initial_service_s
        self.service_s = {Mode.FULL: start, Mode.CHEAP: start / 2}
        self.pending_s = 0.0  # predicted seconds of hot-path work admitted, not finished
        self.in_flight = 0

    def predicted_wait_s(self) -> float:
        """How long a request admitted now would wait for a worker."""
        return self.pending_s / self.policy.workers

    def admit(self) -> Ticket | None:
        """The path a request takes now, or None: refuse it (503 + Retry-After)."""
        with self._lock:
            budget = max(self.policy.queue_budget_s, self.service_s[Mode.FULL])
            wait = self.predicted_wait_s()
            if self.in_flight < self.policy.workers:  # a worker is idle: never refuse
                mode = Mode.FULL
            elif wait <= budget * (self.policy.degrade_share if self.policy.cheap_path else 1):
                mode = Mode.FULL
            elif self.policy.cheap_path and wait <= budget:
                mode = Mode.CHEAP
            else:
                mode = None
            if mode is not None:
                ticket = Ticket(mode, self.service_s[mode], background=self.background_busy())
                self.pending_s += ticket.predicted_s
                self.in_flight += 1
                return ticket
        if self.on_refuse is not None:
            self.on_refuse()
        return None

    def done(self, ticket: Ticket, service_s: float | None) -> None:
        """Releases ``ticket`` (once; later calls do nothing); ``service_s``: the seconds it
        held a worker (None: unknown, e.g. refused by validation before the hot path)."""
        with self._lock:
            if ticket.released:
                return
            ticket.released = True
            self.pending_s = max(0.0, self.pending_s - ticket.predicted_s)
            self.in_flight -= 1
            if self.in_flight == 0:
                self.pending_s = 0.0  # no drift of the float sum
            if service_s is None or service_s < 0:
                return
            if ticket.background or self.background_busy():
                self.unlearnt += 1  # slowed by the replica's own background work
                return
            old = self.service_s[ticket.mode]
            a = self.policy.smoothing
            if service_s > old:
                a = max(a, self.policy.rising)
            self.service_s[ticket.mode] = (1 - a) * old + a * service_s

    def concurrency_limit(self) -> int:
        """Requests admitted at once when all take the full path (for /readyz)."""
        full = self.service_s[Mode.FULL]
        budget = max(self.policy.queue_budget_s, full)
        return self.policy.workers + int(budget * self.policy.workers / full)

    def state(self) -> dict[str, float | int | bool]:
        """What ``/readyz`` shows of it."""
        return {"queue_budget_ms": 1000 * self.policy.queue_budget_s,
                "cheap_path": self.policy.cheap_path,
                "service_ms_full": round(1000 * self.service_s[Mode.FULL], 3),
                "service_ms_cheap": round(1000 * self.service_s[Mode.CHEAP], 3),
                "concurrency_limit": self.concurrency_limit(), "in_flight": self.in_flight,
                "background_busy": self.background_busy(), "unlearnt": self.unlearnt}


_installed: Admission | None = None


def install(admission: Admission | None) -> None:
    """Makes ``admission`` the one this process's HTTP gate asks (a replica: its own)."""
    global _installed
    _installed = admission


def installed() -> Admission | None:
    """The admission of the replica in this process, None elsewhere (e.g. Serve's proxy)."""
    return _installed
