"""The ``recsys`` command line: one entry point for every stage of the platform.

Settings are loaded here, once, from ``--profile``/``--config`` and the environment; logging is
configured here too. Commands only parse arguments and call plain functions.
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
import traceback
from datetime import date
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from recsys_core.errors import RecsysError
from recsys_core.logs import configure as configure_logging
from recsys_core.settings import Settings, load_settings, redacted
from recsys_pipelines.online_store import resolve_online_store
from recsys_platform.commands import deploy as deploy_commands
from recsys_platform.commands import experiment as experiment_commands
from recsys_platform.commands import features as features_commands
from recsys_platform.commands import models as models_commands
from recsys_platform.commands import monitor as monitor_commands
from recsys_platform.commands import platform_cmd as platform_commands
from recsys_platform.commands import privacy as privacy_commands
from recsys_platform.commands import serve as serve_commands
from recsys_platform.commands import stream as stream_commands
from recsys_platform.commands import ui as ui_commands
from recsys_platform.commands.context import current_settings, set_settings
from recsys_platform.serving.cluster import base_url

app = typer.Typer(help="Recommendation platform: data, features, training, serving.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Generate synthetic events and import real datasets.",
                       no_args_is_help=True)
config_app = typer.Typer(help="Inspect the resolved configuration.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")
app.add_typer(features_commands.etl_app, name="etl")
app.add_typer(features_commands.app, name="features")
models_commands.register(app)  # train, evaluate, recommend + the `models` group
app.add_typer(stream_commands.app, name="stream")
app.add_typer(serve_commands.app, name="serve")
app.add_typer(deploy_commands.app, name="deploy")
app.add_typer(monitor_commands.app, name="monitor")
app.add_typer(experiment_commands.app, name="experiment")
app.add_typer(platform_commands.app, name="platform")
app.add_typer(privacy_commands.app, name="privacy")
app.add_typer(ui_commands.app, name="ui")

console = Console()
logger = logging.getLogger(__name__)

DEFAULT_MOVIELENS = Path("../shared/datasets/ml-latest-small")


def settings() -> Settings:
    """The settings loaded by the top-level callback."""
    return current_settings()


@app.callback()
def _main(
    profile: Annotated[str | None, typer.Option(help="local | services | k8s "
                                                     "(default: $RECSYS_PROFILE or local)")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML file overriding the profile.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging, library logs, "
                                                                  "warnings and progress bars.")]
    = False,
) -> None:
    configure_logging(verbose)  # libraries' INFO, bars and deprecation notices only with -v
    set_settings(load_settings(profile, config), config)


@config_app.command("show")
def config_show(
    check_online: Annotated[bool, typer.Option(help="Probe Redis for the online store.")] = True,
) -> None:
    """Prints the resolved settings as YAML (credentials masked) and the online store in use."""
    s = settings()
    console.print(yaml.safe_dump(redacted(s), sort_keys=False), end="")
    if check_online:
        choice = resolve_online_store(s)
        console.print(f"# online store: {choice.kind} ({choice.reason})")


@data_app.command("generate")
def data_generate(
    events: Annotated[int, typer.Option(help="Approximate number of events.")] = 200_000,
    days: Annotated[int, typer.Option(help="Days of traffic.")] = 14,
    start: Annotated[str, typer.Option(help="First day, YYYY-MM-DD.")] = "2026-11-01",
    users: Annotated[int, typer.Option(help="Users at the start.")] = 2_000,
    items: Annotated[int, typer.Option(help="Items at the start.")] = 5_000,
    dirt_rate: Annotated[float, typer.Option(help="Fraction of rows per kind of dirt.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 7,
    jsonl: Annotated[bool, typer.Option(help="Also write newline-JSON for the stream.")] = False,
    out: Annotated[Path | None, typer.Option(help="Landing dir (default: <data_dir>/landing).")]
    = None,
) -> None:
    """Generates synthetic events with a known ground truth into the landing area."""
    from recsys_pipelines.generator import GeneratorConfig, generate, write_generated

    s = settings()
    cfg = GeneratorConfig(events=events, days=days, start=date.fromisoformat(start), users=users,
                          items=items, dirt_rate=dirt_rate, seed=seed)
    landing = out or s.landing_dir
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("generating", total=days + 2)
        data = generate(cfg)
        progress.advance(task)
        result = write_generated(
            data, landing, jsonl_dir=Path(s.path(s.flink.stream_dir)) if jsonl else None,
            progress=lambda _: progress.advance(task),
        )
    _print_generated(result)


def _print_generated(result: object) -> None:
    from recsys_pipelines.generator import GenerateResult

    assert isinstance(result, GenerateResult)
    table = Table(title=f"Generated into {result.landing_dir}")
    table.add_column("what")
    table.add_column("count", justify="right")
    rows = [("events (as landed)", result.events), ("clean events", result.clean_events),
            ("users", result.users), ("items", result.items),
            ("date partitions", len(result.partitions)), ("duplicates", result.dirt.duplicates),
            ("late", result.dirt.late), ("malformed", result.dirt.malformed_total)]
    for name, value in rows:
        table.add_row(name, f"{value:,}")
    console.print(table)


@data_app.command("import-movielens")
def data_import_movielens(
    path: Annotated[Path, typer.Option(help="Folder with ratings.csv and movies.csv.")]
    = DEFAULT_MOVIELENS,
    out: Annotated[Path | None, typer.Option(help="Output dir (default: <data_dir>/movielens).")]
    = None,
) -> None:
    """Imports MovieLens ratings and movies as events, items and users (Parquet)."""
    from recsys_pipelines.movielens import load_movielens, write_movielens

    s = settings()
    target = out or s.data_dir / "movielens"
    with console.status(f"importing {path}"):
        summary = write_movielens(load_movielens(path), target)
    table = Table(title=f"MovieLens imported into {target}")
    table.add_column("what")
    table.add_column("count", justify="right")
    for name, value in summary.items():
        table.add_row(name, f"{value:,}")
    console.print(table)


@app.command("demo")
def demo(
    events: Annotated[int, typer.Option(help="Synthetic events to generate.")] = 200_000,
    movielens: Annotated[Path, typer.Option(help="MovieLens folder.")] = DEFAULT_MOVIELENS,
) -> None:
    """Runs the end-to-end demo on embedded defaults and prints a summary.

    generate -> MovieLens import -> ETL, batch features, Feast apply + materialize, training
    snapshot -> train on Ray Train, evaluate, register, promote -> PyFlink stream job updates
    the online store -> Ray Serve answers a known user, a new user and the stream's user.
    """
    s = settings()
    console.rule("1. synthetic events")
    data_generate(events=events, days=14, start="2026-11-01", users=2_000, items=5_000,
                  dirt_rate=0.01, seed=7, jsonl=False, out=None)
    console.rule("2. MovieLens")
    data_import_movielens(path=movielens, out=None)
    choice = resolve_online_store(s)
    console.print(f"profile={s.profile} online store: {choice.kind} ({choice.reason})")
    features_commands.demo_step(s, console)
    models_commands.demo_step(s, console)
    # PyFlink's gRPC stack breaks an in-process Ray connection afterwards, so the stream
    # step runs in a child process of its own.
    verbose = logging.getLogger().isEnabledFor(logging.DEBUG)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        stream_user = pool.apply(_stream_demo, (s, verbose))
    users = {"known user": _most_active_user(s), "new user": "demo-new-user"}
    if stream_user:
        users["user updated by the stream"] = stream_user
    serve_commands.demo_step(s, console, users)
    console.rule("done")
    _print_next_steps(s)


def _stream_demo(s: Settings, verbose: bool) -> str | None:
    configure_logging(verbose)  # a spawned process: its own logging, the same quiet libraries
    return stream_commands.demo_step(s, Console())


def _print_next_steps(s: Settings) -> None:
    from recsys_models.errors import AliasNotFoundError
    from recsys_models.registry import alias_version
    from recsys_platform.ui import mlflow_ui, prefect_ui

    try:
        champion = f"version {alias_version(s, 'champion')} is @champion"
    except AliasNotFoundError:
        champion = "no @champion yet"
    rows = [
        ("MLflow UI", "recsys ui mlflow",
         f"open {mlflow_ui(s).url}/#/models/{s.mlflow.model_name}",
         f"registry ({champion}), model cards, gate tags, runs"),
        ("Prefect UI", "recsys ui prefect", f"open {prefect_ui(s).url}/runs",
         "the ETL and features flow runs, their tasks and logs"),
        ("serving", "recsys serve up", f"POST {base_url(s)}/recommend",
         "the demo stopped its app; this one keeps running"),
    ]
    console.rule("where to look next")
    for name, command, url, what in rows:  # soft wrap: URLs stay whole, to click or copy
        console.print(f"[bold]{name:<11}[/bold] {command:<18} then {url}", soft_wrap=True)
        console.print(f"{'':<11} {what}", style="dim", soft_wrap=True)
    console.print(f"{'more':<11} recsys stream status, recsys models list; everything the "
                  f"demo wrote is under {s.data_dir.resolve()}; README.md", soft_wrap=True)


def _most_active_user(s: Settings) -> str:
    import pyarrow.parquet as pq

    files = sorted((s.lake_dir / "events").rglob("*.parquet"))[-2:]
    users = pq.read_table(files, columns=["user_id"]).column(0).to_pandas()
    return str(users.value_counts().index[0])


def main() -> None:
    """Console-script entry point: domain errors become one line on stderr and exit code 2."""
    try:
        app()
    except RecsysError as exc:
        sys.stderr.write(f"error: {exc}\n")  # one line, never wrapped
        raise SystemExit(2) from None
    except Exception:
        # Printed here and turned into an exit code: Ray's process-wide excepthook can hang
        # on an uncaught exception once a local cluster was started in this process.
        traceback.print_exc()
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
