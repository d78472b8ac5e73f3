"""``recsys data generate | import-movielens``: synthetic events and real datasets in.

Commands parse arguments, call :mod:`recsys_pipelines.generator` / ``.movielens`` and print.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from recsys_platform.commands.context import current_settings

app = typer.Typer(help="Generate synthetic events and import real datasets.",
                  no_args_is_help=True)
console = Console()
DEFAULT_MOVIELENS = Path("../shared/datasets/ml-latest-small")


@app.command("generate")
def generate(
    events: Annotated[int, typer.Option(help="Approximate number of events.")] = 200_000,
    days: Annotated[int, typer.Option(help="Days of traffic.")] = 14,
    start: Annotated[str, typer.Option(help="First day, YYYY-MM-DD.")] = "2026-11-01",
    users: Annotated[int, typer.Option(help="Users at the start.")] = 2_000,
    items: Annotated[int, typer.Option(help="Items at the start.")] = 5_000,
    dirt_rate: Annotated[float, typer.Option(help="Fraction of rows per kind of dirt.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 7,
    categories: Annotated[int | None, typer.Option(
        help="Item categories (default: the demo's world, 50).")] = None,
    category_share: Annotated[float | None, typer.Option(
        help="Share of impressions from the user's two favourite categories, the rest follow "
             "popularity (default: the demo's world, 0.8).")] = None,
    jsonl: Annotated[bool, typer.Option(help="Also write newline-JSON for the stream.")] = False,
    out: Annotated[Path | None, typer.Option(help="Landing dir (default: <data_dir>/landing).")]
    = None,
) -> None:
    """Generates synthetic events with a known ground truth into the landing area."""
    from recsys_pipelines.generator import (
        DEMO_CATEGORIES,
        DEMO_CATEGORY_SHARE,
        GeneratorConfig,
        generate,
        write_generated,
    )

    s = current_settings()
    cfg = GeneratorConfig(events=events, days=days, start=date.fromisoformat(start), users=users,
                          items=items, dirt_rate=dirt_rate, seed=seed,
                          categories=DEMO_CATEGORIES if categories is None else categories,
                          category_share=(DEMO_CATEGORY_SHARE if category_share is None
                                          else category_share))
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


@app.command("import-movielens")
def import_movielens(
    path: Annotated[Path, typer.Option(help="Folder with ratings.csv and movies.csv.")]
    = DEFAULT_MOVIELENS,
    out: Annotated[Path | None, typer.Option(help="Output dir (default: <data_dir>/movielens).")]
    = None,
) -> None:
    """Imports MovieLens ratings and movies as events, items and users (Parquet)."""
    from recsys_pipelines.movielens import load_movielens, write_movielens

    s = current_settings()
    target = out or s.data_dir / "movielens"
    with console.status(f"importing {path}"):
        summary = write_movielens(load_movielens(path), target)
    table = Table(title=f"MovieLens imported into {target}")
    table.add_column("what")
    table.add_column("count", justify="right")
    for name, value in summary.items():
        table.add_row(name, f"{value:,}")
    console.print(table)
