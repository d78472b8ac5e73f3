"""The Ray Serve application on this machine's cluster: start, connect, deploy, wait, stop.

:func:`connect` starts a local Ray head (``ray start --head`` on ``ray.head_port``, listening
on ``ray.node_ip``: loopback by default) unless ``ray.address`` names a cluster; :func:`deploy`
deploys the app (options: :mod:`recsys_platform.serving.deployment`); :func:`wait_ready` polls
``/readyz``; :func:`stop_local_head` stops the local head's processes, the Ray client server
included, and only them. ``recsys serve ...`` (:mod:`recsys_platform.commands.serve`), the
platform command and the demo call these.

Clients use the proxy's URL (``serving.host:serving.port``): it is stable, routes to every
replica and keeps answering while a replica restarts. A replica's own URL (direct ingress)
is faster but changes, and refuses connections, when that replica dies. Direct ingress is on
by default (:mod:`recsys_platform.serving.ingress`): a local head started here gets
``RAY_SERVE_ENABLE_DIRECT_INGRESS`` per the caller's choice; a running head keeps the mode it
started with; a cluster named by ``ray.address`` has its own.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recsys_core.errors import RecsysError
from recsys_core.settings import Settings
from recsys_platform.serving.ingress import direct_ingress_env

APP_NAME = "recsys"
LOCAL_DRAINING_S = 2.0  # a local head has no load balancer to wait for (Ray's default: 30 s)


class ServingCheckError(RecsysError):
    """The service answered, but not what the caller waited for."""


class ServiceNotReadyError(RecsysError):
    """The service did not answer ``/readyz`` with 200 in time."""

    def __init__(self, url: str, timeout_s: float, last: Any) -> None:
        super().__init__(f"service at {url} not ready after {timeout_s:.0f}s: {last}; "
                         "see `recsys serve status` and the replica logs under /tmp/ray")
        self.url = url


def _ray_bin() -> str:
    return shutil.which("ray") or str(Path(sys.executable).with_name("ray"))


def cluster_address(settings: Settings) -> str:
    return settings.ray.address or f"127.0.0.1:{settings.ray.head_port}"


# Ray turns --node-ip-address=127.0.0.1 into the machine's reachable address unless it runs
# as a single-node cluster (what this variable says; Ray's own default on macOS/Windows).


# Ray turns --node-ip-address=127.0.0.1 into the machine's reachable address unless it runs
# as a single-node cluster (what this variable says; Ray's own default on macOS/Windows).
_SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def head_command(settings: Settings) -> list[str]:
    """``ray start --head`` for the local head, on ``ray.node_ip`` (loopback by default)."""
    return [_ray_bin(), "start", "--head", "--port", str(settings.ray.head_port),
            f"--node-ip-address={settings.ray.node_ip}", "--include-dashboard=false",
            "--disable-usage-stats"]


def head_env(settings: Settings) -> dict[str, str]:
    """Environment of ``ray start`` that keeps a loopback ``ray.node_ip`` on loopback.

    With it the head's GCS, raylet, Ray client server and agents bind 127.0.0.1 (without it
    Ray turns 127.0.0.1 into the machine's address, and the GCS listens on every interface).
    """
    loopback = ipaddress.ip_address(settings.ray.node_ip).is_loopback \
        if settings.ray.node_ip[0].isdigit() else settings.ray.node_ip == "localhost"
    return {_SINGLE_NODE_ENV: "0"} if loopback else {}


def single_node(settings: Settings) -> None:
    """Makes this process see the local head's loopback node address (:func:`head_env`)."""
    env = head_env(settings)
    os.environ.update(env)
    constants = sys.modules.get("ray._private.ray_constants")
    if env and constants is not None:  # read at import: Ray was imported before this call
        setattr(constants, "ENABLE_RAY_CLUSTER", False)  # noqa: B010 - a private constant


def connect(settings: Settings, start_head: bool, direct_ingress: bool = True) -> None:
    """Connects to the configured cluster, starting a local head first when asked to.

    A head started here gets ``RAY_SERVE_ENABLE_DIRECT_INGRESS`` per ``direct_ingress``.
    """
    if settings.ray.address is None:
        single_node(settings)  # this driver must agree with the head on its node address
    import ray

    if ray.is_initialized():
        return
    address = cluster_address(settings)
    if settings.ray.address is None and start_head:
        probe = subprocess.run([_ray_bin(), "status", "--address", address],
                               capture_output=True, text=True)
        if probe.returncode != 0:
            cpus = ["--num-cpus", str(settings.ray.num_cpus)] if settings.ray.num_cpus else []
            env = {**os.environ, **direct_ingress_env(direct_ingress, LOCAL_DRAINING_S),
                   **head_env(settings)}
            subprocess.run(head_command(settings) + cpus, check=True, capture_output=True,
                           env=env)
    ray.init(address=address, include_dashboard=False, log_to_driver=False,
             configure_logging=False,  # Ray's records go through the CLI's console filter
             runtime_env={"env_vars": {"RECSYS_PROFILE": settings.profile,
                                       "RECSYS_DATA_DIR": str(settings.data_dir.resolve())}})


def start_in_process(settings: Settings, direct_ingress: bool) -> None:
    """Starts an in-process local cluster for a foreground app (``recsys serve run``)."""
    import ray

    os.environ.update(direct_ingress_env(direct_ingress, LOCAL_DRAINING_S))  # inherited by Ray
    single_node(settings)
    ray.init(address="local", include_dashboard=False, log_to_driver=False)


def deploy(settings: Settings, config_file: Path | None = None) -> str:
    """Deploys (or updates) the app on the connected cluster; returns its base URL."""
    from ray import serve

    from recsys_core.logs import quiet_after_import
    from recsys_platform.serving.app import RecommenderDeployment
    from recsys_platform.serving.deployment import deployment_options

    quiet_after_import("ray.serve")  # Serve sets its driver logger to INFO on import
    s = settings.serving
    serve.start(http_options={"host": s.host, "port": s.port})
    deployment = RecommenderDeployment.options(  # type: ignore[attr-defined]
        **deployment_options(s))
    serve.run(deployment.bind(profile=settings.profile,
                              config_file=str(config_file.resolve()) if config_file else None),
              name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{s.host}:{s.port}"


def shutdown() -> None:
    """Stops Serve (its apps, proxies and controller) on the connected cluster."""
    from ray import serve

    serve.shutdown()


def delete_app() -> None:
    """Deletes this platform's app from the connected cluster (Serve itself keeps running)."""
    from ray import serve

    serve.delete(APP_NAME)


def http(method: str, url: str, body: Any = None, timeout: float = 10) -> tuple[int, Any]:
    """A small JSON HTTP call; returns (status, parsed body)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def wait_ready(url: str, timeout_s: float = 180) -> dict[str, Any]:
    """Waits for ``/readyz`` to answer 200; returns its body."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            status, last = http("GET", f"{url}/readyz", timeout=5)
            if status == 200:
                return dict(last)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    raise ServiceNotReadyError(url, timeout_s, last)


def base_url(settings: Settings) -> str:
    return f"http://{settings.serving.host}:{settings.serving.port}"


def stop_local_head(port: int, grace_s: float = 10.0) -> int:
    """Stops the local Ray head on ``port`` and only it (``ray stop`` kills every cluster).

    The head's GCS names its session directory; every process of that session (raylet,
    monitors, dashboard) names it too, and workers are the raylet's children.
    """
    import psutil

    session = None
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if f"--gcs_server_port={port}" in cmdline:
            session = next((a.split("=", 1)[1] for a in cmdline
                            if a.startswith("--session-dir=")), None)
            break
    if session is None:
        return 0
    targets: dict[int, Any] = {}
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if any(session in arg for arg in cmdline) or is_client_server(cmdline, port):
            targets[proc.pid] = proc
            with contextlib.suppress(psutil.Error):
                targets.update({c.pid: c for c in proc.children(recursive=True)})
    for proc in targets.values():
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(list(targets.values()), timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    # What a bare ray.init() would join next: forget it when it names this head.
    current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    with contextlib.suppress(OSError):
        if current.read_text().strip().endswith(f":{port}"):
            current.unlink()
    return len(targets)


def is_client_server(cmdline: list[str], port: int) -> bool:
    """The head's Ray client server (its command line names the GCS address, not the
    session), which ``serve down`` used to leave running."""
    return "ray.util.client.server" in cmdline and any(
        a.startswith("--address=") and a.endswith(f":{port}") for a in cmdline)


@dataclass(frozen=True)
class Served:
    """What serving answered after the loop: the version and one response."""

    url: str
    version: str
    started: bool  # True when this command started the app
    user_id: str
    response: dict[str, Any]


def ready_version(url: str) -> str | None:
    """The bundle version ``/readyz`` reports, None when the service does not answer 200."""
    try:
        status, body = http("GET", f"{url}/readyz", timeout=5)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None
    return str(body.get("bundle_version")) if status == 200 and isinstance(body, dict) else None


def wait_for_version(url: str, version: str, timeout_s: float) -> None:
    """Waits until ``/readyz`` reports ``version`` (replicas poll the alias)."""
    deadline = time.monotonic() + timeout_s
    seen = None
    while time.monotonic() < deadline:
        seen = ready_version(url)
        if seen == version:
            return
        time.sleep(1)
    raise ServingCheckError(f"serving at {url} still answers version {seen} after "
                            f"{timeout_s:.0f}s, not the new champion {version}")


def serve_version(settings: Settings, version: str, user: str) -> Served:
    """Makes serving answer with ``version``: waits for a running app, else starts one; then
    asks it for ``user``'s recommendations."""
    import ray

    url = base_url(settings)
    started = ready_version(url) is None
    if started:  # training ran on an in-process cluster; the app lives on the local head
        if ray.is_initialized() and settings.ray.address is None:
            ray.shutdown()
        connect(settings, start_head=True)
        deploy(settings)
        wait_ready(url)
    wait_for_version(url, version, timeout_s=settings.serving.poll_interval_s * 3 + 120)
    status, body = http("POST", f"{url}/recommend", {"user_id": user, "k": 5})
    if status != 200:
        raise ServingCheckError(f"POST {url}/recommend answered HTTP {status}: {body}")
    return Served(url, str(body["bundle_version"]), started, user, body)
