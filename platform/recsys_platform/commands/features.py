"""``recsys etl run`` and ``recsys features apply | materialize | training-set``.

Commands parse arguments and call the Prefect flows or plain functions of
``recsys_pipelines``; nothing else. Wire with ``app.add_typer(features.app, name="features")``
and ``app.add_typer(features.etl_app, name="etl")``. The demo's batch stage
(:mod:`recsys_platform.demo`) calls the same flows and printers.
"""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from recsys_core.settings import Settings
from recsys_platform.commands.context import current_settings

app = typer.Typer(help="Feast feature store: apply definitions, materialize, training sets.",
                  no_args_is_help=True)
etl_app = typer.Typer(help="Batch ETL: landing area -> validated, date-partitioned lake.",
                      no_args_is_help=True)
console = Console()
logger = logging.getLogger(__name__)
# `recsys etl run` processed the range but moved unreadable landing files to the quarantine.
EXIT_QUARANTINED_FILES = 3

StartOpt = Annotated[str | None, typer.Option(help="First day, YYYY-MM-DD (default: the day "
                                                   "before --end).")]
EndOpt = Annotated[str | None, typer.Option(help="Last day, YYYY-MM-DD (default: yesterday).")]


def _day(text: str | None) -> date | None:
    return date.fromisoformat(text) if text else None


def table(title: str, rows: dict[str, Any]) -> Table:
    table = Table(title=title)
    table.add_column("what")
    table.add_column("value", justify="right")
    for key, value in rows.items():
        table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    return table


def print_etl(result: dict[str, Any]) -> None:
    console.print(table(f"ETL {result['start']}..{result['end']}", {
        "raw rows read": result["input_rows"], "clean rows written": result["clean_rows"],
        "quarantined": result["quarantined_rows"], "outside the range": result["out_of_range_rows"],
        "duplicates": result["duplicates"], "partitions": len(result["partitions"]),
        **{f"  {reason}": n for reason, n in result["reasons"].items()},
        **{f"{s['name']} changed / in lake": f"{s['read']:,} / {s['total']:,}"
           for s in result["snapshots"]},
        **({"unreadable files quarantined": len(result["quarantined_files"])}
           if result.get("quarantined_files") else {}),
    }))
    for moved in result.get("quarantined_files", []):
        console.print(f"[red]quarantined {moved['source']} -> {moved['path']}: "
                      f"{moved['reason']}[/red]")


@etl_app.command("run")
def etl_run(
    start: StartOpt = None,
    end: EndOpt = None,
    landing: Annotated[Path | None, typer.Option(help="Landing dir (default: "
                                                      "<data_dir>/landing).")] = None,
    lookahead_days: Annotated[int, typer.Option(help="Landing days read past --end for late "
                                                     "events.")] = 1,
    catalog_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL of the catalog "
                                                         "database (default: Parquet "
                                                         "snapshots).")] = None,
) -> None:
    """Runs the ETL flow (Prefect) for a date range; re-running a range is idempotent.

    Exits 3 when landing files could not be read and were moved to the quarantine (the rest
    of the range was processed).
    """
    from recsys_platform.flows.data import etl_flow, prefect_api

    s = current_settings()
    with prefect_api(s):
        result = etl_flow(start=_day(start), end=_day(end),
                          landing_dir=str(landing) if landing else None,
                          lookahead_days=lookahead_days, catalog_url=catalog_url, settings=s)
    print_etl(result)
    if result.get("quarantined_files"):
        raise typer.Exit(EXIT_QUARANTINED_FILES)


@app.command("apply")
def features_apply() -> None:
    """Generates feature_store.yaml from the profile and applies the Feast definitions."""
    from recsys_pipelines.feature_store import apply_definitions, repo_path

    s = current_settings()
    store = apply_definitions(s)
    views = sorted(v.name for v in store.list_feature_views())
    services = sorted(f.name for f in store.list_feature_services())
    console.print(f"applied {repo_path(s)} to project {store.project}: views {views}, "
                  f"services {services}")


@app.command("compute")
def features_compute(start: StartOpt = None, end: EndOpt = None) -> None:
    """Runs the features flow: batch features (Ray Data) -> apply -> materialize the range."""
    from recsys_platform.flows.data import features_flow, prefect_api

    s = current_settings()
    with prefect_api(s):
        result = features_flow(start=_day(start), end=_day(end), settings=s)
    console.print(table("batch features", {**{f"{k} rows": v for k, v in result["rows"].items()},
                                            "online rows": result["online"]["rows"]}))


@app.command("materialize")
def features_materialize(
    start: Annotated[str | None, typer.Option(help="From this day end (YYYY-MM-DD); with "
                                                   "--end. Omit both for incremental.")] = None,
    end: Annotated[str | None, typer.Option(help="Up to this day's end (YYYY-MM-DD).")] = None,
) -> None:
    """Loads the latest batch features online: a day range, or incrementally up to now."""
    from recsys_pipelines.batch_features import day_end
    from recsys_pipelines.feature_store import materialize, materialize_incremental

    s = current_settings()
    if start and end:
        first, last = date.fromisoformat(start), date.fromisoformat(end)
        result = materialize(s, day_end(first - timedelta(days=1)).to_pydatetime(),
                             day_end(last).to_pydatetime())
    elif start or end:
        raise typer.BadParameter("give both --start and --end, or neither (incremental)")
    else:
        result = materialize_incremental(s, datetime.now(UTC))
    console.print(f"materialized {result.views} ({result.start} .. {result.end}) "
                  f"in {result.seconds:.1f} s")


@app.command("training-set")
def features_training_set(
    start: StartOpt = None, end: EndOpt = None,
    movielens: Annotated[Path | None, typer.Option(
        help="Build it from a MovieLens import (`recsys data import-movielens`'s folder, e.g. "
             "data/movielens) instead of the lake: one row per rating, point-in-time "
             "histories of the ratings >= 4.")] = None,
) -> None:
    """Labels the lake's impressions, joins features point in time, writes a snapshot."""
    s = current_settings()
    if movielens is not None:
        from recsys_pipelines.movielens import training_rows
        from recsys_pipelines.training_set import write_training_snapshot

        frame = training_rows(movielens)
        snapshot, rows = write_training_snapshot(frame, s), len(frame)
    else:
        from recsys_pipelines.feature_store import load_store
        from recsys_pipelines.training_set import build_snapshot

        snapshot, rows = build_snapshot(s, load_store(s), _day(start), _day(end))
    console.print(f"training snapshot {snapshot}: {rows:,} rows under "
                  f"{s.data_dir / 'training' / snapshot}")


def landing_range(settings: Settings) -> tuple[date, date]:
    days = sorted(date.fromisoformat(p.name.removeprefix("date="))
                  for p in (settings.landing_dir / "events").glob("date=*"))
    if not days:
        raise typer.BadParameter(f"no landing partitions under {settings.landing_dir}/events; "
                                 "run `recsys data generate` first")
    return days[0], days[-1]
