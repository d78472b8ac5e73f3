"""Online experiments in a serving replica: split routing and shadow rankings.

:class:`ExperimentArms` polls the registered model's ``experiment.active`` tag (written by
``recsys experiment start``) and holds the treatment bundle beside the champion the
:class:`~recsys_platform.serving.bundle_manager.BundleManager` serves: loaded, checked
(digest, smoke query) and prepared (ranker catalog, new items) like a new champion, then
published with one reference assignment. A request reads that reference once
(:meth:`ExperimentArms.route`), so it never mixes experiments or versions.

- ``split``: a user whose bucket (:func:`~recsys_platform.experiments.definition.assign`) falls
  in the treatment's share is served by the treatment bundle; everyone else by the champion.
- ``shadow``: the champion serves everyone. For the shadowed share of users the treatment's
  ranking of the same request (same features, same item cache, same exclusions) is
  computed by one background thread after the response is built, and written to
  ``landing/shadow/`` (never to the impression events: nobody saw it). The queue in front of
  that thread is bounded and a job older than ``max_age_s`` is not run: under load shadow
  work is dropped, never the response delayed, and each drop is counted
  (``recsys_experiment_shadow_total{outcome="dropped"|"stale"}``).

Until the treatment is loaded (or when it fails its checks) no request is routed to an
experiment at all, so the impression log never attributes a champion response to the
treatment. Every response of an experiment carries ``experiment_id`` and ``arm`` in the
impression log.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import Counter, Gauge, Histogram

from recsys_platform.experiments.definition import CONTROL, TREATMENT, Experiment, assign
from recsys_platform.serving.bundle_manager import LoadedBundle
from recsys_platform.serving.impressions import ImpressionLogger
from recsys_platform.serving.metrics import ServingMetrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    """Where one request goes: the arm that serves it and whether it is shadowed."""

    experiment: Experiment
    arm: str  # the arm whose ranking the user sees: control | treatment
    treatment: LoadedBundle
    shadowed: bool = False  # shadow mode: the treatment also ranks it, off the request path

    @property
    def serves_treatment(self) -> bool:
        return self.arm == TREATMENT


@dataclass(frozen=True)
class _Live:
    experiment: Experiment
    treatment: LoadedBundle


class ShadowRanker(Protocol):
    """What ranks a request again with another bundle (:class:`Recommender` does)."""

    def shadow_items(self, prepared: Any, treatment: LoadedBundle
                     ) -> list[tuple[str, float, str]]:
        """The top-k ``(item_id, score, source)`` of ``treatment`` for ``prepared``'s request."""


class ExperimentMetrics:
    """The replica's experiment counters, on the serving metrics' registry."""

    def __init__(self, metrics: ServingMetrics) -> None:
        r = self.registry = metrics.registry
        self.requests = Counter("recsys_experiment_requests_total",
                                "Responses served inside an online experiment, by arm.",
                                ["arm"], registry=r)
        self.shadow = Counter(
            "recsys_experiment_shadow_total",
            "Shadow rankings by outcome: logged, dropped (queue full), stale (waited past "
            "max_age_s), failed.", ["outcome"], registry=r)
        self.shadow_latency = Histogram(
            "recsys_experiment_shadow_seconds", "Time to compute one shadow ranking.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0), registry=r)
        self.active = Gauge("recsys_experiment_active",
                            "1 while an experiment routes requests in this replica.", registry=r)


class ShadowRunner:
    """One daemon thread running shadow jobs from a bounded queue; drops instead of waiting.

    The bounds come with each job (the experiment's ``shadow_queue`` and
    ``shadow_max_age_s``); ``max_queue``/``max_age_s`` are the defaults.
    """

    def __init__(self, metrics: ExperimentMetrics, max_queue: int = 16,
                 max_age_s: float = 0.5) -> None:
        self._metrics = metrics
        self._queue: queue.Queue[tuple[float, Callable[[], None]] | None] = \
            queue.Queue(maxsize=1024)  # (deadline, job)
        self.max_queue, self.max_age_s = max_queue, max_age_s
        self.counts = {"logged": 0, "dropped": 0, "stale": 0, "failed": 0}
        self._thread = threading.Thread(target=self._loop, name="shadow-ranker", daemon=True)
        self._thread.start()

    def _count(self, outcome: str) -> None:  # also ExperimentArms' (a shed request)
        self.counts[outcome] += 1
        self._metrics.shadow.labels(outcome).inc()

    def submit(self, job: Callable[[], None], max_queue: int | None = None,
               max_age_s: float | None = None) -> bool:
        """Queues ``job``; False (and counted as dropped) when ``max_queue`` jobs wait."""
        limit = self.max_queue if max_queue is None else max_queue
        age = self.max_age_s if max_age_s is None else max_age_s
        try:
            if self._queue.qsize() >= limit:
                raise queue.Full
            self._queue.put_nowait((time.monotonic() + age, job))
        except queue.Full:
            self._count("dropped")
            return False
        return True

    def _loop(self) -> None:
        while (entry := self._queue.get()) is not None:
            try:
                self._run(*entry)
            finally:
                self._queue.task_done()

    def _run(self, deadline: float, job: Callable[[], None]) -> None:
        if time.monotonic() > deadline:
            self._count("stale")
            return
        start = time.perf_counter()
        try:
            job()
        except Exception as exc:  # a shadow failure never reaches a user
            self._count("failed")
            logger.warning("shadow ranking failed: %s: %s", type(exc).__name__, exc)
            return
        self._metrics.shadow_latency.observe(time.perf_counter() - start)
        self._count("logged")

    def drain(self, timeout_s: float = 10.0) -> None:
        """Waits until every queued job ran (tests, shutdown)."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def stop(self) -> None:
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout=5)


class ExperimentArms:
    """The active experiment of this replica and its treatment bundle.

    Args:
        read_active: Returns the active experiment (None when there is none); may raise
            when the registry is unreachable (the current state is then kept).
        load: Loads one bundle version (digest-checked).
        check: Raises when a loaded bundle cannot serve (smoke query); prepares it otherwise.
        metrics: The replica's serving metrics (the experiment counters join its registry).
        shadow_log: Where shadow rankings go (``landing/shadow``); None: shadow is not logged.
        max_queue: Shadow jobs waiting at most; more are dropped (default; the experiment's
            ``shadow_queue`` wins).
        max_age_s: A shadow job that waited longer is dropped (counted ``stale``; default,
            the experiment's ``shadow_max_age_s`` wins).
    """

    def __init__(self, read_active: Callable[[], Experiment | None],
                 load: Callable[[str], Any], check: Callable[[Any], None],
                 metrics: ServingMetrics, shadow_log: ImpressionLogger | None = None,
                 max_queue: int = 16, max_age_s: float = 0.5) -> None:
        self._read = read_active
        self._load, self._check = load, check
        self.metrics = ExperimentMetrics(metrics)
        self.shadow_log = shadow_log
        self.shadow = ShadowRunner(self.metrics, max_queue, max_age_s)
        self._live: _Live | None = None
        self._rejected: set[tuple[str, str]] = set()  # (experiment id, version)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.experiment: Experiment | None = None  # what the registry names (loaded or not)
        self.last_error: str | None = None

    def route(self, user_key: str) -> Route | None:
        """The arm of ``user_key`` in the live experiment; None when none is live."""
        live = self._live  # read once
        if live is None:
            return None
        exp = live.experiment
        in_share = assign(exp.salt, user_key, exp.share) == TREATMENT
        if exp.mode == "split":
            return Route(exp, TREATMENT if in_share else CONTROL, live.treatment)
        return Route(exp, CONTROL, live.treatment, shadowed=in_share)

    def served(self, recommender: ShadowRanker, prepared: Any, logged: bool,
               shed: bool = False) -> None:
        """After a response of an experiment was built (``prepared``: its
        :class:`~recsys_platform.serving.recommender.Prepared`): counts it, queues its shadow
        job (``shed``: the replica took its cheaper path under load; the shadow job is
        dropped and counted)."""
        route = prepared.route
        if route is None or not logged:  # warm-up requests are not part of any experiment
            return
        self.metrics.requests.labels(route.arm).inc()
        if route.shadowed and shed:
            self.shadow._count("dropped")
        elif route.shadowed and self.shadow_log is not None:
            log = self.shadow_log

            def job() -> None:
                items = recommender.shadow_items(prepared, route.treatment)
                log.log(prepared.request_id, prepared.user_key, items,
                        route.treatment.version, prepared.request.context.surface,
                        prepared.request.context.device, experiment_id=route.experiment.id,
                        arm=TREATMENT)

            exp = route.experiment
            self.shadow.submit(job, exp.shadow_queue, exp.shadow_max_age_s)

    def prepare(self, prepare: Callable[[Any], None]) -> None:
        """Runs ``prepare`` on the live treatment bundle (e.g. new items to index)."""
        live = self._live
        if live is not None:
            prepare(live.treatment.bundle)

    def refresh(self) -> bool:
        """Reads the active experiment once; True when the live state changed."""
        with self._lock:
            try:
                exp = self._read()
            except Exception as exc:  # registry down: keep the current experiment
                self.last_error = f"cannot read the active experiment: {exc}"
                logger.warning(self.last_error)
                return False
            self.experiment = exp
            live = self._live
            if exp is None:
                changed = live is not None
                self._publish(None)
                return changed
            if live is not None and live.experiment == exp:
                return False
            key = (exp.id, exp.treatment_version)
            if key in self._rejected:
                self._publish(None)
                return live is not None
            if live is not None and live.treatment.version == exp.treatment_version:
                bundle = live.treatment.bundle  # same version, new definition (e.g. share)
            else:
                try:
                    bundle = self._load(exp.treatment_version)
                    self._check(bundle)
                except Exception as exc:
                    self._rejected.add(key)
                    self.last_error = (f"experiment {exp.id}: treatment version "
                                       f"{exp.treatment_version} rejected: {exc}")
                    logger.error(self.last_error)
                    self._publish(None)
                    return live is not None
            self._publish(_Live(exp, LoadedBundle(exp.treatment_version, bundle)))
            logger.info("experiment %s live: %s, treatment version %s, share %g", exp.id,
                        exp.mode, exp.treatment_version, exp.share)
            return True

    def _publish(self, live: _Live | None) -> None:
        self._live = live  # the atomic swap
        self.metrics.active.set(1 if live is not None else 0)

    def status(self) -> dict[str, Any] | None:
        """For ``/readyz``: the experiment, whether it routes here, shadow counts."""
        exp, live = self.experiment, self._live
        if exp is None:
            return None
        return {"id": exp.id, "mode": exp.mode, "share": exp.share,
                "treatment_version": exp.treatment_version,
                "live": live is not None and live.experiment.id == exp.id,
                "shadow": dict(self.shadow.counts),
                "last_error": (self.last_error or "")[:300] or None}

    def start(self, poll_interval_s: float) -> None:
        """Polls the registry in a daemon thread until :meth:`stop`."""

        def loop() -> None:
            while not self._stop.wait(poll_interval_s):
                self.refresh()

        self._thread = threading.Thread(target=loop, name="experiment-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.shadow.stop()
        if self.shadow_log is not None:
            self.shadow_log.stop()
