"""One Rich progress bar per long stage of the demo: a header, then the stage's steps."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)


@contextmanager
def stage(console: Console, title: str, steps: int) -> Iterator[Callable[[str], None]]:
    """Prints ``title`` as a rule and shows a transient bar of ``steps`` steps under it.

    Yields ``step(description)``: the first call names the first step, each later call marks
    the previous step done and names the next one. Tables printed meanwhile appear above the
    bar; the bar disappears when the block ends.

    Example:
        >>> with stage(console, "batch", 2) as step:
        ...     step("ETL"); run_etl()
        ...     step("features"); run_features()
    """
    console.rule(title)
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                        MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                        transient=True)
    task = progress.add_task("", total=steps)
    started = [False]

    def step(description: str) -> None:
        progress.update(task, description=description, advance=1 if started[0] else 0)
        started[0] = True

    with progress:
        yield step
        progress.update(task, completed=steps)
