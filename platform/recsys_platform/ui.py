"""The MLflow and Prefect web UIs on the profile's stores, on loopback.

:func:`mlflow_ui` and :func:`prefect_ui` say what to run (or that the profile already names a
server), :func:`start` runs it and waits until it answers. On the ``local`` profile the MLflow
UI reads the demo's SQLite store and artifacts under ``data_dir``; the Prefect UI reads the
database of Prefect's ephemeral API (``$PREFECT_HOME``, by default ``~/.prefect``), where the
demo's flow runs are. On ``services``/``k8s`` the profile's servers are the UIs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from recsys_core.errors import RecsysError
from recsys_core.settings import Settings

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


class UiError(RecsysError):
    """A UI server could not start."""


@dataclass(frozen=True)
class UiServer:
    """How to serve one UI: ``argv`` is None when the profile already names a running server."""

    name: str
    url: str
    health_url: str
    store: str
    argv: list[str] | None = None
    env: dict[str, str] = field(default_factory=dict)


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def mlflow_ui(settings: Settings, host: str = LOOPBACK, port: int = 5000) -> UiServer:
    """The MLflow server on ``settings.mlflow.tracking_uri`` (a server URI is used as is)."""
    uri = settings.mlflow_tracking_uri
    if uri.startswith(("http://", "https://")):
        return UiServer("mlflow", uri.rstrip("/"), f"{uri.rstrip('/')}/health", uri)
    url = f"http://{host}:{port}"
    argv = [_bin("mlflow"), "server", "--backend-store-uri", uri,
            "--artifacts-destination", settings.path(settings.mlflow.artifact_location),
            "--host", host, "--port", str(port), "--workers", "1",
            "--allowed-hosts", f"{host}:{port},localhost:{port}"]
    # MLflow's GenAI job runner (huey consumers) is of no use here.
    return UiServer("mlflow", url, f"{url}/health", uri, argv,
                    {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})


def prefect_ui(settings: Settings, host: str = LOOPBACK, port: int = 4200) -> UiServer:
    """A Prefect server on the ephemeral API's database (``settings.prefect.api_url`` as is)."""
    api = settings.prefect.api_url
    if api:
        root = api.rstrip("/").removesuffix("/api")
        return UiServer("prefect", root, f"{root}/api/health", api)
    home = Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect"))
    url = f"http://{host}:{port}"
    argv = [_bin("prefect"), "server", "start", "--host", host, "--port", str(port)]
    return UiServer("prefect", url, f"{url}/api/health", str(home / "prefect.db"), argv,
                    {"PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                     "PREFECT_UI_API_URL": f"{url}/api"})


def answers(url: str, timeout_s: float = 2.0) -> bool:
    """True when ``url`` answers HTTP 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (loopback)
            return int(response.status) == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def start(server: UiServer, log: IO[str] | None, timeout_s: float = 120.0) -> subprocess.Popen[str]:
    """Starts ``server.argv`` and waits until its health URL answers.

    Args:
        server: From :func:`mlflow_ui` or :func:`prefect_ui`, with ``argv``.
        log: Where the server's output goes (None: this terminal).
        timeout_s: How long to wait for the first answer.

    Raises:
        UiError: The port is taken, the server exited, or it did not answer in time.
    """
    assert server.argv is not None
    if answers(server.health_url):
        raise UiError(f"{server.url} already answers: another {server.name} server (or "
                      "something else) holds the port; pick another with --port")
    # A session of its own: stop() ends the server and the workers it forks, together.
    process = subprocess.Popen(server.argv, env={**os.environ, **server.env}, text=True,
                               stdout=log, stderr=subprocess.STDOUT if log else None,
                               start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while not answers(server.health_url):
        if process.poll() is not None:
            raise UiError(f"{server.name} server exited with code {process.returncode} during "
                          "start-up" + (f"; see {log.name}" if log else ""))
        if time.monotonic() > deadline:
            stop(process)
            raise UiError(f"{server.name} server did not answer at {server.health_url} "
                          f"within {timeout_s:.0f}s")
        time.sleep(0.5)
    return process


def stop(process: subprocess.Popen[str], timeout_s: float = 20.0) -> None:
    """SIGTERM to the server's process group, SIGKILL after ``timeout_s``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
