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
