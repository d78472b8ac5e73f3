"""``recsys serve up|down|status|recommend|run``: the Ray Serve application on this machine.

``up`` starts a local Ray head unless ``ray.address`` names a cluster, deploys the app and
returns; the service keeps running in the Ray cluster until ``down``, which stops the head's
processes. ``run`` does the same in the foreground until Ctrl-C. The cluster work is
:mod:`recsys_platform.serving.cluster`; these commands parse and print.

Direct ingress is on by default: every replica serves HTTP on its own port (printed by ``up``),
next to the proxy on ``serving.port``. ``--no-direct-ingress`` or
``RAY_SERVE_ENABLE_DIRECT_INGRESS=0`` in the environment turns it off (proxy only).
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from recsys_core.settings import Settings
from recsys_platform.commands.context import current_settings, settings_with
from recsys_platform.serving import cluster
from recsys_platform.serving.cluster import APP_NAME, base_url, http
from recsys_platform.serving.ingress import direct_ingress_requested, replica_urls

logger = logging.getLogger(__name__)

app = typer.Typer(help="Real-time serving on Ray Serve.", no_args_is_help=True)
console = Console()

DirectIngress = Annotated[bool | None, typer.Option(
    "--direct-ingress/--no-direct-ingress",
    help="Replicas serve HTTP on their own ports, skipping the proxy (default: on, unless "
         "RAY_SERVE_ENABLE_DIRECT_INGRESS=0). Applies when this command starts the Ray head.")]


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
    cluster.connect(settings, start_head=True, direct_ingress=direct)
    url = cluster.deploy(settings, config)
    ready = cluster.wait_ready(url)
    console.print(f"serving on {url}: bundle {ready['bundle_version']} "
                  "(POST /recommend, GET /readyz, GET /metrics); stop with `recsys serve down`")
    print_replica_urls(settings, direct)


@app.command("down")
def down_command() -> None:
    """Stops the service and, for a local head started by `up`, the Ray cluster."""
    settings = current_settings()
    try:
        cluster.connect(settings, start_head=False)
        cluster.shutdown()
    except ConnectionError as exc:
        console.print(f"no Ray cluster at {cluster.cluster_address(settings)}: {exc}")
    if settings.ray.address is None:
        stopped = cluster.stop_local_head(settings.ray.head_port)
        console.print(f"local Ray head on port {settings.ray.head_port}: "
                      f"{stopped} processes stopped")
    console.print("stopped")


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
    settings, config = settings_with(config)
    direct = direct_mode(direct_ingress)
    if settings.ray.address:
        cluster.connect(settings, start_head=False)
    else:
        cluster.start_in_process(settings, direct)
    url = cluster.deploy(settings, config)
    console.print(f"serving on {url}; bundle {cluster.wait_ready(url)['bundle_version']}")
    print_replica_urls(settings, direct)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        cluster.shutdown()
