"""Where HTTP clients reach the recommender: each replica's own port (direct ingress) or the proxy.

With ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1`` in the environment of every Ray process (set before
the cluster starts: ``recsys serve up`` does it for a local head, the Helm chart for KubeRay),
each ingress replica serves HTTP itself on a port the Serve controller allocates from
``RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT`` (30000) up, and a request skips Serve's proxy and
the proxy -> replica call. Measured on 2 cores (``benchmarks/bench_serving.py``): ~22 -> ~3-4 ms
of Serve CPU per request and the only way the open loop holds p99 <= 50 ms at 100 req/s. The
proxy keeps running on ``serving.port`` and still routes to every replica (one address for all
replicas; the CLI's ``status``/``recommend`` use it).

The replicas' addresses come from the controller's target groups (the list an external load
balancer is fed); without direct ingress the same call names the proxy.
"""

from __future__ import annotations

import os
import time
from typing import Any

DIRECT_INGRESS_ENV = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
# Replicas wait this long before they stop under direct ingress (for a load balancer to drop
# them); Ray's default of 30 s only makes sense with one in front.
DRAINING_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"


# Serve's HTTP servers (the proxy and, under direct ingress, each replica's own) wrap their ASGI
# app with the middlewares this import path returns: how Ray's own 503s get a Retry-After.
MIDDLEWARES_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
MIDDLEWARES = "recsys_platform.serving.ingress:http_middlewares"
# The replica runs the app on Serve's own event loop, not a second loop in another thread:
# no hand-over between the two loops per request (the hot path has its own worker thread).
SAME_LOOP_ENV = "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"
# Each replica hands its cached request metrics to Ray's metrics agent every this many ms
# (Ray's default 100: ten wake-ups a second, most of an idle replica's Python CPU); the
# Ray dashboard's request metrics then lag by up to a second. Autoscaling is not affected.
METRICS_EXPORT_ENV = "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS"
METRICS_EXPORT_MS = "1000"
RETRY_AFTER_S = "1"


class RetryAfterOn503:
    """ASGI middleware: every 503 leaving the server carries ``Retry-After``.

    The app's own refusals set it; Ray Serve's backpressure answers (``max_queued_requests``
    reached, no replica available) have none, and a client (or a load balancer) should back
    off from them as from any other 503.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_retry_after(message: Any) -> None:
            if message["type"] == "http.response.start" and message["status"] == 503:
                headers = list(message.get("headers") or [])
                if not any(name.lower() == b"retry-after" for name, _ in headers):
                    headers.append((b"retry-after", RETRY_AFTER_S.encode()))
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_retry_after)


RECOMMEND_PATH = "/recommend"
# ray.serve._private.constants.SERVE_HTTP_REQUEST_DISCONNECT_DISABLED_HEADER, value "?1"
DISCONNECT_WATCH_OFF = (b"x-request-disconnect-disabled", b"?1")
TICKET = "recsys.admission_ticket"  # the scope key the gate leaves for the handler
OVERLOADED_BODY = b'{"error":"overloaded, retry later"}'


async def send_overloaded(send: Any) -> None:
    """The refusal beyond admission: 503, ``Retry-After``, the documented JSON body."""
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(OVERLOADED_BODY)).encode()),
                            (b"retry-after", RETRY_AFTER_S.encode())]})
    await send({"type": "http.response.body", "body": OVERLOADED_BODY})


class AdmissionGate:
    """ASGI middleware: ``POST /recommend`` asks the replica's admission before Ray Serve's
    per-request machinery runs, so a refusal costs the replica (and the requests it admitted)
    little CPU. The ticket travels in the ASGI scope to the handler, which releases it; it is
    released here too if the request never reached the hot path. Where no admission is
    installed (Serve's proxy process) requests pass through."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        from recsys_platform.serving.admission import installed

        admission = installed()
        if (admission is None or scope["type"] != "http" or scope.get("method") != "POST"
                or scope.get("path") != RECOMMEND_PATH):
            await self.app(scope, receive, send)
            return
        ticket = admission.admit()
        if ticket is None:
            await send_overloaded(send)
            return
        scope[TICKET] = ticket
        # Serve then skips its per-request disconnect watcher (a task and a wait per request);
        # an admitted request is done in milliseconds anyway.
        scope["headers"] = [*scope.get("headers", ()), DISCONNECT_WATCH_OFF]
        admitted = time.perf_counter()

        async def send_timed(message: Any) -> None:
            # Server-Timing: the milliseconds from admission to the response, so a client can
            # tell time spent in the replica from time spent before it (its own send, the
            # network, the socket backlog of a busy replica).
            if message["type"] == "http.response.start":
                ms = 1000 * (time.perf_counter() - admitted)
                message = {**message, "headers": [*message.get("headers", ()),
                                                  (b"server-timing", b"app;dur=%.1f" % ms)]}
            await send(message)

        try:
            await self.app(scope, receive, send_timed)
        finally:
            admission.done(ticket, None)  # no-op when the handler released it


def http_middlewares() -> list[Any]:
    """The middlewares of Serve's HTTP servers (named by :data:`MIDDLEWARES_ENV`; Serve wraps
    them in this order, the last outermost): every 503 gets ``Retry-After``, and
    ``/recommend`` is admitted before any of Serve's per-request work."""
    from starlette.middleware import Middleware

    return [Middleware(RetryAfterOn503), Middleware(AdmissionGate)]


def direct_ingress_env(enabled: bool, draining_s: float | None = None) -> dict[str, str]:
    """The variables a Ray cluster must start with for ``enabled`` (``draining_s``: local),
    plus, in both modes, the HTTP middlewares of Serve's servers, the app on Serve's own
    event loop and Serve's request metrics exported once a second."""
    env = {DIRECT_INGRESS_ENV: "1" if enabled else "0", MIDDLEWARES_ENV: MIDDLEWARES,
           SAME_LOOP_ENV: "0", METRICS_EXPORT_ENV: METRICS_EXPORT_MS}
    if enabled and draining_s is not None:
        env[DRAINING_ENV] = f"{draining_s:g}"
    return env


def direct_ingress_requested(default: bool = True) -> bool:
    """Whether this process's environment asks for direct ingress (unset: ``default``)."""
    value = os.environ.get(DIRECT_INGRESS_ENV)
    return default if value is None else value == "1"


def replica_urls(app_name: str, host: str | None = None, timeout_s: float = 120.0
                 ) -> list[str]:
    """Base URLs (``http://ip:port`` + route prefix) of the app's replicas' own HTTP servers.

    Waits until at least one running replica has its port. ``host`` replaces the node IP the
    controller reports (a local head binds ``serving.host``, e.g. 127.0.0.1). Needs a
    connected Ray driver and a running Serve instance.

    Raises:
        TimeoutError: no replica of ``app_name`` serves HTTP itself after ``timeout_s``
            (the cluster was started without direct ingress, or no replica runs).
    """
    import ray
    from ray.serve._private.common import RequestProtocol
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    if client is None:
        raise RuntimeError("no Serve instance: connect to the cluster and start Serve first")
    controller: Any = client._controller  # the public API has no target groups yet
    deadline = time.monotonic() + timeout_s
    while True:
        urls: list[str] = []
        for group in ray.get(controller.get_target_groups.remote(app_name)):
            if group.protocol != RequestProtocol.HTTP or group.app_name != app_name:
                continue  # the proxies' groups carry no app name
            prefix = "" if group.route_prefix == "/" else group.route_prefix.rstrip("/")
            urls.extend(f"http://{host or t.ip}:{t.port}{prefix}" for t in group.targets)
        if urls:
            return urls
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"no replica of {app_name!r} serves HTTP on its own port after {timeout_s:.0f}s:"
                f" was the Ray cluster started with {DIRECT_INGRESS_ENV}=1?")
        time.sleep(0.5)
