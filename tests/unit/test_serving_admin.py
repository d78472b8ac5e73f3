"""The admin port serves a replica's metrics apart from the public port (serving.admin_port)."""

from __future__ import annotations

import urllib.request
from types import SimpleNamespace

from recsys_platform.serving.app import start_admin_server
from recsys_platform.serving.metrics import ServingMetrics
from tests.fixtures.net import free_port


def test_admin_port_serves_the_replicas_metrics() -> None:
    metrics = ServingMetrics()
    metrics.bundle_fallback.set(1)
    port = free_port()
    start_admin_server(port, SimpleNamespace(metrics=metrics))
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    assert "recsys_bundle_fallback 1.0" in text
    start_admin_server(port, SimpleNamespace(metrics=metrics))  # taken: logged, no crash


def test_post_recommend_skips_fastapis_routing_and_the_rest_reaches_it() -> None:
    """The replica's fast path (RecommendFastPath) answers POST /recommend with the replica's
    own handler; other methods and paths, and any request before a replica installed its
    handler, go to the app it wraps (FastAPI)."""
    import asyncio
    from typing import Any

    from starlette.requests import Request
    from starlette.responses import Response

    from recsys_platform.serving.app import RecommendFastPath, api

    assert any(m.cls is RecommendFastPath for m in api.user_middleware)
    assert api.routes[0].path == "/recommend"  # Serve names routes by matching them in order
    reached: list[str] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        reached.append(f"{scope['method']} {scope['path']}")
        await Response("fastapi", status_code=404)(scope, receive, send)

    async def handler(request: Request) -> Response:
        body = await request.body()
        return Response(b"handled " + body, media_type="application/json")

    async def call(method: str, path: str) -> tuple[int, bytes]:
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b'{"user_id":"u"}', "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": method, "path": path, "headers": [],
                 "query_string": b""}
        await RecommendFastPath(inner)(scope, receive, send)
        return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])

    async def scenario() -> None:
        assert await call("POST", "/recommend") == (404, b"fastapi")  # no replica yet
        RecommendFastPath.handler = handler
        try:
            assert await call("POST", "/recommend") == (200, b'handled {"user_id":"u"}')
            assert await call("GET", "/recommend") == (404, b"fastapi")
            assert await call("POST", "/readyz") == (404, b"fastapi")
        finally:
            RecommendFastPath.handler = None

    asyncio.run(scenario())
    assert reached == ["POST /recommend", "GET /recommend", "POST /readyz"]
