"""Ray Serve application: one ingress deployment runs the whole hot path in-process.

Measured on 2 cores, chaining deployments by handles cost ~25 ms of CPU per request against
~1.5 ms for the model work, so retrieval, feature reads and ranking stay in one replica and
scale together (autoscaling on ongoing requests). Each request runs the whole in-process path
(:meth:`Recommender.recommend`, ~3 ms of CPU) in one worker thread; ``batch_ranker=True``
instead batches the ranker across concurrent requests with ``@serve.batch`` (measured in
``benchmarks/bench_serving.py``: with a ~1 ms ranker the extra hops cost more than batching
saves). Responses are serialized once by pydantic-core (no second validation), and Serve's
per-request access log is off.

``serve run platform/recsys_platform/serving/serve_config.yaml`` or the import path
``recsys_platform.serving.app:app`` starts it; settings come from the deployment's
``profile``/``config_file`` arguments (``recsys serve up --config FILE`` passes its file), else
``RECSYS_PROFILE``, plus ``RECSYS_*`` variables in the replica's environment.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import generate_latest, start_http_server
from ray import serve
from starlette.types import ASGIApp, Receive, Scope, Send

from recsys_core.errors import InvalidRequestError
from recsys_core.settings import ServingSettings, load_settings
from recsys_platform.serving.admission import Admission, AdmissionPolicy, Mode
from recsys_platform.serving.admission import install as install_admission
from recsys_platform.serving.deployment import DEPLOYMENT_NAME, deployment_options
from recsys_platform.serving.factory import build_recommender, warm_up
from recsys_platform.serving.ingress import RECOMMEND_PATH, RETRY_AFTER_S, TICKET
from recsys_platform.serving.recommender import Prepared, rank_many
from recsys_platform.serving.schemas import (
    MAX_BODY_BYTES,
    RecommendRequest,
    RecommendResponse,
    parse_request,
    request_json_schema,
    validation_reasons,
)
from recsys_platform.serving.startup import import_feast_unchecked

logger = logging.getLogger(__name__)

api = FastAPI(
    title="recsys serving",
    description="Two-stage recommendations: two-tower retrieval + HNSW, multi-task ranking.",
    version="1",
    docs_url=None, redoc_url=None, openapi_url=None,  # served below, unless admin-only
)
NOT_HERE = {"error": "not found"}
# user_config keys (RecommenderDeployment.reconfigure) -> AdmissionPolicy fields
LIVE_KNOBS = {"queue_budget_ms": "queue_budget_s", "degrade_share": "degrade_share",
              "cheap_path": "cheap_path"}


def refusal(status: int, reasons: list[str]) -> JSONResponse:
    """The documented error shape: ``{"error": "invalid request", "reasons": [...]}``."""
    error = "request too large" if status == 413 else "invalid request"
    return JSONResponse(status_code=status, content={"error": error, "reasons": reasons})


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    return refusal(422, validation_reasons(list(exc.errors())))


MAX_DRAIN_BYTES = 32 * 1024 * 1024  # an oversized body is read (and dropped) up to this


async def read_body(request: Request, limit: int = MAX_BODY_BYTES,
                    drain_limit: int = MAX_DRAIN_BYTES) -> bytes:
    """The request body; over ``limit`` bytes it is refused with 413.

    Nothing past the limit is kept. An oversized body is still read to its end (dropped
    chunk by chunk) up to ``drain_limit`` so that the client, still sending, receives the 413
    instead of a reset connection; a ``Content-Length`` past ``drain_limit`` is refused
    before reading.
    """
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > drain_limit:
        raise InvalidRequestError([f"body: larger than {limit} bytes"], status=413)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            chunks.clear()
            if size > drain_limit:
                break
            continue
        chunks.append(chunk)
    if size > limit:
        raise InvalidRequestError([f"body: larger than {limit} bytes"], status=413)
    return b"".join(chunks)


def start_admin_server(port: int, recommender: Any) -> None:
    """Serves the replica's ``/metrics`` on ``port`` (all interfaces: the chart's
    NetworkPolicy lets only ``networkPolicy.adminFrom`` reach it)."""
    try:
        start_http_server(port, addr="0.0.0.0", registry=recommender.metrics.registry)
    except OSError as exc:  # another replica in this pod holds it: metrics stay unexposed
        logger.error("admin port %d not available (%s): one replica per pod needs it", port,
                     exc)
        return
    logger.info("replica metrics on :%d/metrics (admin port)", port)


def overloaded() -> JSONResponse:
    """The refusal of a request beyond admission: at once, with ``Retry-After``."""
    return JSONResponse(status_code=503, headers={"Retry-After": RETRY_AFTER_S},
                        content={"error": "overloaded, retry later"})


class RecommendFastPath:
    """ASGI middleware inside the FastAPI app: ``POST /recommend`` goes straight to the replica's
    handler (:meth:`RecommenderDeployment.recommend`, the same code), skipping FastAPI's
    exception middleware, route matching over every route, dependency solving and response
    wrapping: ~7% of a replica's Python CPU per request (py-spy, ``bench_serving.py
    --profile-replica``). Ray Serve's per-request work (its metrics, the ongoing-request count
    that autoscaling reads) is untouched: this runs inside it. Every other path, and every
    request before the replica's ``__init__`` installed it, goes to FastAPI as before."""

    handler: Any = None  # the bound ``recommend`` of this process's replica

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = RecommendFastPath.handler
        if (handler is None or scope["type"] != "http" or scope.get("method") != "POST"
                or scope.get("path") != RECOMMEND_PATH):
            await self.app(scope, receive, send)
            return
        response = await handler(Request(scope, receive))
        await response(scope, receive, send)


api.add_middleware(RecommendFastPath)


# Defaults from the default settings; `serve up`, the Serve config and the chart pass the
# profile's values (serving/deployment.py).
@serve.deployment(name=DEPLOYMENT_NAME, **deployment_options(ServingSettings()))
@serve.ingress(api)
class RecommenderDeployment:
    """HTTP ingress + the in-process hot path of one replica."""

    def __init__(self, profile: str | None = None, config_file: str | None = None,
                 batch_ranker: bool = False, hot_path_threads: int = 1,
                 queue_budget_ms: float | None = None, cheap_path: bool | None = None) -> None:
        import torch

        torch.set_num_threads(1)  # one replica, one thread: no OpenMP oversubscription
        import_feast_unchecked()  # a start ~3 s of CPU sooner (serving/startup.py)
        settings = load_settings(profile or os.environ.get("RECSYS_PROFILE"),
                                 Path(config_file) if config_file else None)
        self.recommender, self.cache = build_recommender(settings)
        warm_up(self.recommender)
        gc.collect()
        gc.freeze()  # long-lived model objects out of the GC's way: fewer p99 spikes
        self.settings = settings
        serving = settings.serving
        self.admission = Admission(AdmissionPolicy(
            queue_budget_s=(queue_budget_ms or serving.queue_budget_ms) / 1000,
            degrade_share=serving.degrade_share,
            cheap_path=serving.cheap_path if cheap_path is None else cheap_path,
            workers=max(1, hot_path_threads)), on_refuse=self._count_refusal,
            # loading the next bundle version is the replica's own work, not overload
            background_busy=lambda: self.recommender.manager.loading)
        install_admission(self.admission)  # the HTTP gate of this replica asks it first
        RecommendFastPath.handler = self.recommend  # POST /recommend past FastAPI's routing
        self.batch_ranker = batch_ranker
        # Threads running the hot path (0: in the event loop itself). Few threads: requests
        # queue for them instead of 8-32 threads fighting over the GIL.
        self._worker = (ThreadPoolExecutor(max_workers=hot_path_threads,
                                           thread_name_prefix="recommend")
                        if hot_path_threads > 0 else None)
        self.admin_only = settings.serving.admin_port is not None
        if settings.serving.admin_port is not None:
            start_admin_server(settings.serving.admin_port, self.recommender)

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve's ``user_config``: admission knobs changed on the running replica, without a
        restart (``queue_budget_ms``, ``degrade_share``, ``cheap_path``).

        Raises:
            ValueError: an unknown key (the update is refused, nothing changes).
        """
        unknown = set(config) - set(LIVE_KNOBS)
        if unknown:
            raise ValueError(f"unknown user_config keys {sorted(unknown)}; known: "
                             f"{', '.join(LIVE_KNOBS)}")
        policy = self.admission.policy
        changes = {LIVE_KNOBS[k]: (v / 1000 if k == "queue_budget_ms" else v)
                   for k, v in config.items()}
        self.admission.policy = replace(policy, **changes)
        logger.info("admission now %s", self.admission.state())

    def _count_refusal(self) -> None:
        metrics = self.recommender.metrics
        metrics.rejections.labels("overload").inc()
        metrics.requests.labels("503").inc()

    def check_health(self) -> None:
        """Ray Serve's replica health check: a replica without a bundle is still healthy."""

    # First of the routes: Ray Serve names each request's route (its metrics) by matching the
    # app's routes in order, so the hot route matches at the first try.
    @api.post("/recommend", response_model=RecommendResponse, openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": request_json_schema()}}}})
    async def recommend(self, request: Request) -> Any:
        metrics = self.recommender.metrics
        try:
            body = parse_request(await read_body(request))
        except InvalidRequestError as exc:  # one bounded line; nothing else is written
            metrics.rejections.labels("too_large" if exc.status == 413 else "invalid").inc()
            metrics.requests.labels(str(exc.status)).inc()
            logger.info("refused a request (%d): %s", exc.status, "; ".join(exc.reasons)[:300])
            return refusal(exc.status, exc.reasons)
        ticket = request.scope.get(TICKET) or self.admission.admit()  # the gate's, if any
        if ticket is None:
            return overloaded()
        service_s: float | None = None
        try:
            if self.batch_ranker and ticket.mode is Mode.FULL:
                start = time.perf_counter()
                prepared = await asyncio.to_thread(self.recommender.prepare, body)
                scores, error = await self._rank(prepared)
                response = self.recommender.finish(prepared, scores, error)
                service_s = time.perf_counter() - start
            else:
                response, service_s = await self._recommend(body, ticket.mode is Mode.CHEAP)
            metrics.requests.labels("200").inc()
            return Response(response.model_dump_json(), media_type="application/json")
        finally:
            self.admission.done(ticket, service_s)

    @api.get("/healthz")
    def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz")
    def readyz(self) -> JSONResponse:
        manager = self.recommender.manager
        current = manager.current
        body: dict[str, Any] = {"bundle_version": current.version if current else None,
                                "champion_version": manager.champion_version,
                                "fallback": manager.fallback,  # serving the last good version
                                "rejected_versions": sorted(manager.rejected_versions),
                                "last_error": (manager.last_error or "")[:300] or None,
                                "item_cache_age_s": self.cache.age_s(),
                                "admission": self.admission.state()}
        arms = self.recommender.experiments
        body["experiment"] = arms.status() if arms is not None else None  # online experiment
        ready = current is not None
        return JSONResponse(status_code=200 if ready else 503,
                            content={"ready": ready, **body})

    @api.get("/metrics")
    def metrics(self) -> Response:
        if self.admin_only:  # on serving.admin_port instead
            return JSONResponse(status_code=404, content=NOT_HERE)
        return PlainTextResponse(generate_latest(self.recommender.metrics.registry).decode())

    @api.get("/openapi.json", include_in_schema=False)
    def openapi(self) -> Response:
        if self.admin_only:
            return JSONResponse(status_code=404, content=NOT_HERE)
        return JSONResponse(api.openapi())

    @api.get("/docs", include_in_schema=False)
    def docs(self) -> Response:
        if self.admin_only:
            return JSONResponse(status_code=404, content=NOT_HERE)
        html: HTMLResponse = get_swagger_ui_html(openapi_url="openapi.json", title=api.title)
        return html

    def _timed_recommend(self, body: RecommendRequest, cheap: bool
                         ) -> tuple[RecommendResponse, float]:
        start = time.perf_counter()
        response = self.recommender.recommend(body, cheap=cheap)
        return response, time.perf_counter() - start

    async def _recommend(self, body: RecommendRequest, cheap: bool
                         ) -> tuple[RecommendResponse, float]:
        """The response and the seconds it held a worker (the admission's service time)."""
        if self._worker is None:
            return self._timed_recommend(body, cheap)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, self._timed_recommend, body, cheap)

    async def _rank(self, prepared: Prepared) -> tuple[np.ndarray | None, Exception | None]:
        if prepared.loaded is None or not prepared.candidates:
            return None, None
        result = await self._rank_batch(prepared)
        if isinstance(result, Exception):
            return None, result
        return result, None

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _rank_batch(self, batch: list[Prepared]) -> list[np.ndarray | Exception]:
        return await asyncio.to_thread(rank_many, batch)


app = RecommenderDeployment.bind()  # type: ignore[attr-defined]
