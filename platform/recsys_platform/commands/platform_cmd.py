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
from datetime import date
from typing import Annotated, Any

import typer
from rich.console import Console

from recsys_core.settings import Settings
from recsys_platform.commands.context import current_settings
from recsys_platform.commands.serve import print_recommendations
from recsys_platform.runtime import ensure_ray
from recsys_platform.serving import cluster

app = typer.Typer(help="The whole platform loop as one Prefect flow run.", no_args_is_help=True)
console = Console()
logger = logging.getLogger(__name__)


@app.callback()
def _platform() -> None:
    """Keeps ``platform`` a command group even with one command."""


def landing_range(settings: Settings) -> tuple[date, date] | None:
    """First and last ``date=`` partition of the landing area's events (None when empty)."""
    folder = settings.landing_dir / "events"
    days = sorted(date.fromisoformat(p.name.removeprefix("date="))
                  for p in folder.glob("date=*") if p.is_dir()) if folder.is_dir() else []
    return (days[0], days[-1]) if days else None


def a_known_user(settings: Settings) -> str:
    """The most active user of the lake's newest partition (someone the model knows)."""
    import pyarrow.parquet as pq

    files = sorted((settings.lake_dir / "events").rglob("*.parquet"))[-1:]
    users = pq.read_table(files, columns=["user_id"]).column(0).to_pandas()
    return str(users.value_counts().index[0])


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
    ensure_ray(settings)  # a fresh local cluster, never the Serve head's (ensure_ray)
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
        served = cluster.serve_version(settings, run.version, a_known_user(settings))
        how = "started" if served.started else "picked up by the running app"
        console.print(f"serving at {served.url}: version {served.version} ({how})")
        print_recommendations(served.response, f"user {served.user_id}")
        if served.version != run.version:
            raise typer.Exit(1)
    console.print(f"loop done in {time.monotonic() - began:.0f}s")
