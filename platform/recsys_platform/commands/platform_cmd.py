"""``recsys platform run``: the whole loop in one command, ending with the new bundle served.

Runs the platform flow (a real Prefect flow run: ETL -> features -> snapshot -> Ray Train ->
gate -> promotion) on the landing area's dates, then makes sure serving answers with the new
champion: a running Serve app picks it up by polling the alias; otherwise the app is started
in the background (as ``recsys serve up``; stop it with ``recsys serve down``). Ends with one
request whose response names the new version. Wire with ``app.add_typer(platform_cmd.app,
name="platform")``.
"""

from __future__ import annotations

import logging
import time
import urllib.error
from dataclasses import dataclass
from datetime import date
from typing import Annotated, Any

import typer
from rich.console import Console

from recsys_core.settings import Settings
from recsys_platform.commands.context import current_settings
from recsys_platform.commands.serve import print_recommendations
from recsys_platform.serving import cluster

app = typer.Typer(help="The whole platform loop as one Prefect flow run.", no_args_is_help=True)
console = Console()
logger = logging.getLogger(__name__)


@app.callback()
def _platform() -> None:
    """Keeps ``platform`` a command group even with one command."""


@dataclass(frozen=True)
class Served:
    """What serving answered after the loop: the version and one response."""

    url: str
    version: str
    started: bool  # True when this command started the app
    user_id: str
    response: dict[str, Any]


def landing_range(settings: Settings) -> tuple[date, date] | None:
    """First and last ``date=`` partition of the landing area's events (None when empty)."""
    folder = settings.landing_dir / "events"
    days = sorted(date.fromisoformat(p.name.removeprefix("date="))
                  for p in folder.glob("date=*") if p.is_dir()) if folder.is_dir() else []
    return (days[0], days[-1]) if days else None


def _ready_version(url: str) -> str | None:
    try:
        status, body = cluster.http("GET", f"{url}/readyz", timeout=5)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None
    return str(body.get("bundle_version")) if status == 200 and isinstance(body, dict) else None


def wait_for_version(url: str, version: str, timeout_s: float) -> None:
    """Waits until ``/readyz`` reports ``version`` (replicas poll the alias)."""
    deadline = time.monotonic() + timeout_s
    seen = None
    while time.monotonic() < deadline:
        seen = _ready_version(url)
        if seen == version:
            return
        time.sleep(1)
    raise typer.BadParameter(f"serving at {url} still answers version {seen} after "
                             f"{timeout_s:.0f}s, not the new champion {version}")


def a_known_user(settings: Settings) -> str:
    """The most active user of the lake's newest partition (someone the model knows)."""
    import pyarrow.parquet as pq

    files = sorted((settings.lake_dir / "events").rglob("*.parquet"))[-1:]
    users = pq.read_table(files, columns=["user_id"]).column(0).to_pandas()
    return str(users.value_counts().index[0])


def serve_version(settings: Settings, version: str) -> Served:
    """Makes serving answer with ``version``: waits for a running app, else starts one."""
    import ray

    url = cluster.base_url(settings)
    started = _ready_version(url) is None
    if started:  # training ran on an in-process cluster; the app lives on the local head
        if ray.is_initialized() and settings.ray.address is None:
            ray.shutdown()
        cluster.connect(settings, start_head=True)
        cluster.deploy(settings)
        cluster.wait_ready(url)
    wait_for_version(url, version, timeout_s=settings.serving.poll_interval_s * 3 + 120)
    user = a_known_user(settings)
    status, body = cluster.http("POST", f"{url}/recommend", {"user_id": user, "k": 5})
    if status != 200:
        raise typer.BadParameter(f"POST {url}/recommend answered HTTP {status}: {body}")
    return Served(url, str(body["bundle_version"]), started, user, body)


def start_training_cluster(settings: Settings) -> None:
    """Starts an in-process Ray cluster for the flow (unless ``ray.address`` names one).

    ``ray.init()`` without an address joins the newest cluster on this machine, which is the
    Serve head when the app runs: its CPUs are held by the replicas and the Ray Train workers
    would wait for them forever. ``address="local"`` always starts a fresh one.
    """
    import ray

    if settings.ray.address is None and not ray.is_initialized():
        ray.init(address="local", num_cpus=settings.ray.num_cpus, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)


def run_loop(settings: Settings, start: date | None, end: date | None, epochs: int,
             workers: int, why: str, events: int) -> Any:
    """Generates data when the landing area is empty, then runs the platform flow."""
    from recsys_platform.flows.data import prefect_api
    from recsys_platform.flows.platform_flow import platform_flow

    found = landing_range(settings)
    if found is None:
        from recsys_pipelines.generator import GeneratorConfig, generate, write_generated

        console.print(f"landing area {settings.landing_dir} is empty: generating {events:,} "
                      "synthetic events over 7 days")
        write_generated(generate(GeneratorConfig(events=events, days=7)), settings.landing_dir)
        found = landing_range(settings)
        assert found is not None
    first, last = start or found[0], end or found[1]
    console.print(f"platform flow over {first} .. {last} (epochs={epochs}, workers={workers})")
    start_training_cluster(settings)
    with prefect_api(settings):
        return platform_flow(start=first, end=last, epochs=epochs, workers=workers, why=why,
                             settings=settings)


@app.command("run")
def run_command(
    start: Annotated[str | None, typer.Option(help="First event day, YYYY-MM-DD (default: the "
                                                   "landing area's first).")] = None,
    end: Annotated[str | None, typer.Option(help="Last event day (default: the landing "
                                                 "area's last).")] = None,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 2,
    workers: Annotated[int | None, typer.Option(help="Ray Train workers (default: "
                                                     "settings.ray.train_workers).")] = None,
    why: Annotated[str, typer.Option(help="Reason recorded on the promotion.")]
    = "recsys platform run",
    events: Annotated[int, typer.Option(help="Events to generate when the landing area is "
                                             "empty.")] = 50_000,
    serve: Annotated[bool, typer.Option(help="Serve the new champion and query it.")] = True,
) -> None:
    """Runs the whole loop as one Prefect flow run and serves the newly promoted bundle."""
    settings = current_settings()
    began = time.monotonic()
    run = run_loop(settings, date.fromisoformat(start) if start else None,
                   date.fromisoformat(end) if end else None, epochs,
                   workers or settings.ray.train_workers, why, events)
    console.print(f"snapshot {run.snapshot_id} ({run.training_rows:,} rows) -> version "
                  f"{run.version}: " + ("promoted to champion" if run.promoted else
                                        "refused: " + "; ".join(run.reasons)))
    if not run.promoted or run.version is None:
        console.print("[red]no new champion[/]: serving keeps the previous one")
        raise typer.Exit(1)
    if serve:
        served = serve_version(settings, run.version)
        how = "started" if served.started else "picked up by the running app"
        console.print(f"serving at {served.url}: version {served.version} ({how})")
        print_recommendations(served.response, f"user {served.user_id}")
        if served.version != run.version:
            raise typer.Exit(1)
    console.print(f"loop done in {time.monotonic() - began:.0f}s")
