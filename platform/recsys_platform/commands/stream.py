"""``recsys stream``: run the PyFlink feature job, replay a range, show its status."""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from recsys_core.settings import Settings
from recsys_platform.commands.context import current_settings

logger = logging.getLogger(__name__)
app = typer.Typer(help="Streaming features: the PyFlink job that keeps Redis fresh.")


@app.command("run")
def run(
    restore: Annotated[str | None, typer.Option(
        help="A retained chk-N directory, or 'latest', to restart from.")] = None,
) -> None:
    """Runs the stream job until interrupted (source, windows and sink from settings)."""
    from recsys_pipelines.stream.checkpoints import latest_checkpoint
    from recsys_pipelines.stream.job import options_from_settings, start

    options = options_from_settings(current_settings())
    if restore:
        path = latest_checkpoint(Path(options.checkpoint_dir)) if restore == "latest" \
            else Path(restore)
        options = replace(options, restore_from=str(path))
    Console().print(f"stream job reading {options.source} ({options.stream_dir}); Ctrl-C stops")
    start(options).wait()


@app.command("replay")
def replay(
    from_: Annotated[str, typer.Option("--from", help="First event date, YYYY-MM-DD.")],
) -> None:
    """Bounded backfill through the same job: the files present, events on/after a date."""
    from recsys_pipelines.stream.job import options_from_settings, start

    options = options_from_settings(current_settings(), bounded=True,
                                    from_date=date.fromisoformat(from_),
                                    job_name="recsys-stream-replay")
    start(options).wait()
    print_status(Console(), current_settings())


@app.command("status")
def status() -> None:
    """Checkpoints, written rows, lag, dead-letter and late counts."""
    print_status(Console(), current_settings())


def print_status(console: Console, settings: Settings) -> None:
    from recsys_pipelines.stream.job import options_from_settings
    from recsys_pipelines.stream.status import stream_status
    from recsys_platform.display import stream_metric

    s = stream_status(options_from_settings(settings))
    table = Table(title="stream job")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("completed checkpoints", str(s.checkpoints))
    table.add_row("latest checkpoint", s.latest_checkpoint or "-")
    for key, value in s.metrics.items():
        table.add_row(*stream_metric(key, value))
    table.add_row("dead letters", f"{s.dead_letters:,}")
    for reason, count in sorted(s.dead_letter_reasons.items()):
        table.add_row(f"  {reason}", f"{count:,}")
    table.add_row("late rows", f"{s.late:,}")
    console.print(table)


def short(value: object) -> str:
    if isinstance(value, list | tuple) or getattr(value, "ndim", 0) > 0:  # lists and arrays
        items = list(value)  # type: ignore[call-overload]
        return "[" + ", ".join(map(str, items[:5])) + (", ..." if len(items) > 5 else "") + "]"
    if hasattr(value, "item"):  # numpy scalars
        value = value.item()  # type: ignore[union-attr]
    return f"{value:.3f}" if isinstance(value, float) else str(value)
