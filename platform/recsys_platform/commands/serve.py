"""``recsys serve up|down|status|recommend|run``: the Ray Serve application on this machine.

``up`` starts a local Ray head (``ray start --head`` on ``ray.head_port``, listening on
``ray.node_ip``: loopback by default) unless ``ray.address`` names a cluster, deploys the app
and returns; the service keeps running in the Ray cluster until ``down``, which stops the
head's processes, the Ray client server included. ``run`` does the same in the foreground
until Ctrl-C.

Clients use the proxy's URL (``serving.host:serving.port``): it is stable, routes to every
replica and keeps answering while a replica restarts. A replica's own URL (direct ingress)
is faster but changes, and refuses connections, when that replica dies.

Direct ingress is on by default (:mod:`recsys_platform.serving.ingress`): the local head starts
with ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1`` and every replica serves HTTP on its own port
(printed by ``up``), next to the proxy on ``serving.port``. ``--no-direct-ingress`` or
``RAY_SERVE_ENABLE_DIRECT_INGRESS=0`` in the environment turns it off (proxy only). A running
head keeps the mode it started with; a cluster named by ``ray.address`` has its own.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from recsys_core.settings import Settings
from recsys_platform.commands.context import current_settings, settings_with
from recsys_platform.commands.progress import stage
from recsys_platform.serving.ingress import (
    direct_ingress_env,
    direct_ingress_requested,
    replica_urls,
)

logger = logging.getLogger(__name__)

app = typer.Typer(help="Real-time serving on Ray Serve.", no_args_is_help=True)
console = Console()
APP_NAME = "recsys"
LOCAL_DRAINING_S = 2.0  # a local head has no load balancer to wait for (Ray's default: 30 s)

DirectIngress = Annotated[bool | None, typer.Option(
    "--direct-ingress/--no-direct-ingress",
    help="Replicas serve HTTP on their own ports, skipping the proxy (default: on, unless "
         "RAY_SERVE_ENABLE_DIRECT_INGRESS=0). Applies when this command starts the Ray head.")]


def _ray_bin() -> str:
    return shutil.which("ray") or str(Path(sys.executable).with_name("ray"))


def cluster_address(settings: Settings) -> str:
    return settings.ray.address or f"127.0.0.1:{settings.ray.head_port}"


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


def direct_mode(flag: bool | None) -> bool:
    """``--direct-ingress/--no-direct-ingress`` when given, else the environment (default on)."""
    return flag if flag is not None else direct_ingress_requested()


def print_replica_urls(settings: Settings, direct_ingress: bool) -> None:
    """Prints the replicas' own base URLs when the cluster runs direct ingress.

    Warns when direct ingress was asked for but the cluster serves through the proxy only
    (a head started earlier without it).
    """
    if not direct_ingress:
        return
    host = settings.serving.host if settings.ray.address is None else None
    try:
        urls = replica_urls(APP_NAME, host=host, timeout_s=60)
    except TimeoutError as exc:
        console.print(f"[yellow]direct ingress not available, serving through the proxy only:"
                      f" {exc}[/yellow]")
        return
    for url in urls:
        console.print(f"replica serving directly (no proxy hop) on {url}")
    console.print(f"clients: use {base_url(settings)} (the proxy: one stable address for every "
                  "replica, answering while a replica restarts); a replica's own URL changes "
                  "when it restarts")


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
    raise typer.BadParameter(f"service at {url} not ready after {timeout_s:.0f}s: {last}")


def base_url(settings: Settings) -> str:
    return f"http://{settings.serving.host}:{settings.serving.port}"


def print_recommendations(body: dict[str, Any], title: str) -> None:
    table = Table(title=f"{title}: bundle {body['bundle_version']}, ordered by {body['source']}"
                        + (f", degraded: {', '.join(body['degraded'])}" if body["degraded"]
                           else ""))
    for column in ("#", "item", "score", "source"):
        table.add_column(column)
    for item in body["items"]:
        table.add_row(str(item["position"]), item["item_id"], f"{item['score']:.4f}",
                      item["source"])
    console.print(table)


ConfigOption = Annotated[Path | None, typer.Option(
    help="Settings YAML for this command and the replicas (default: the top-level --config).")]


@app.command("up")
def up_command(
    config: ConfigOption = None,
    direct_ingress: DirectIngress = None,
) -> None:
    """Starts the service in the background (local Ray head if needed) and waits until ready."""
    settings, config = settings_with(config)
    direct = direct_mode(direct_ingress)
    connect(settings, start_head=True, direct_ingress=direct)
    url = deploy(settings, config)
    ready = wait_ready(url)
    console.print(f"serving on {url}: bundle {ready['bundle_version']} "
                  "(POST /recommend, GET /readyz, GET /metrics); stop with `recsys serve down`")
    print_replica_urls(settings, direct)


@app.command("down")
def down_command() -> None:
    """Stops the service and, for a local head started by `up`, the Ray cluster."""
    settings = current_settings()
    try:
        connect(settings, start_head=False)
        from ray import serve

        serve.shutdown()
    except ConnectionError as exc:
        console.print(f"no Ray cluster at {cluster_address(settings)}: {exc}")
    if settings.ray.address is None:
        stopped = stop_local_head(settings.ray.head_port)
        console.print(f"local Ray head on port {settings.ray.head_port}: "
                      f"{stopped} processes stopped")
    console.print("stopped")


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


@app.command("status")
def status_command() -> None:
    """Shows the deployments' status and what the service is serving."""
    settings = current_settings()
    url = base_url(settings)
    try:
        status, body = http("GET", f"{url}/readyz", timeout=5)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        console.print(f"not serving at {url}: {exc}")
        raise typer.Exit(3) from None
    console.print(f"{url}/readyz -> {status}: {json.dumps(body)}")
    if status != 200:
        raise typer.Exit(1)


@app.command("recommend")
def recommend_command(
    user_id: Annotated[str, typer.Argument(help="The user to recommend for.")],
    k: Annotated[int, typer.Option(help="How many items (1..200).")] = 10,
    exclude: Annotated[list[str] | None, typer.Option(help="Item ids to leave out.")] = None,
) -> None:
    """Asks the running service for one user's recommendations."""
    status, body = http("POST", f"{base_url(current_settings())}/recommend",
                        {"user_id": user_id, "k": k, "exclude": exclude or []})
    if status != 200:
        console.print(f"HTTP {status}: {body}")
        raise typer.Exit(1)
    print_recommendations(body, f"user {user_id}")


@app.command("run")
def run_command(
    config: ConfigOption = None,
    direct_ingress: DirectIngress = None,
) -> None:
    """Serves in the foreground until interrupted (Ctrl-C), then shuts down."""
    import ray

    settings, config = settings_with(config)
    direct = direct_mode(direct_ingress)
    if settings.ray.address:
        connect(settings, start_head=False)
    else:
        os.environ.update(direct_ingress_env(direct, LOCAL_DRAINING_S))  # inherited by Ray
        single_node(settings)
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    url = deploy(settings, config)
    console.print(f"serving on {url}; bundle {wait_ready(url)['bundle_version']}")
    print_replica_urls(settings, direct)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        serve.shutdown()


def demo_step(settings: Settings, console: Console, users: dict[str, str]) -> None:
    """Demo: start the service, query each ``label -> user id``, print the results, stop."""
    from ray import serve

    with stage(console, "serving: Ray Serve app, bundle from the MLflow registry @champion",
               1 + len(users)) as step:
        step("starting Ray Serve, loading the @champion bundle")
        connect(settings, start_head=True)
        url = deploy(settings)
        try:
            ready = wait_ready(url)
            console.print(f"serving on {url}, bundle version {ready['bundle_version']}")
            for label, user in users.items():
                step(f"POST /recommend for the {label}")
                status, body = http("POST", f"{url}/recommend", {"user_id": user, "k": 8})
                if status != 200:
                    console.print(f"{label}: HTTP {status} {body}")
                    continue
                print_recommendations(body, f"{label} ({user})")
        finally:
            serve.delete(APP_NAME)
