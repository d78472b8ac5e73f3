"""``recsys privacy``: forget a user everywhere the platform keeps their data."""

from __future__ import annotations

import getpass
import logging
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from recsys_platform.commands.context import current_settings

logger = logging.getLogger(__name__)
app = typer.Typer(help="Privacy: pseudonyms and forgetting users.", no_args_is_help=True)


@app.command("forget")
def forget(
    user_id: Annotated[str, typer.Argument(help="The user's raw id or pseudonym (p_...).")],
    who: Annotated[str | None, typer.Option(
        help="Operator recorded in the audit log (default: the login name).")] = None,
) -> None:
    """Removes a user's events, features and online keys; later training sets exclude them."""
    from recsys_pipelines.forget import forget_user

    settings = current_settings()
    report = forget_user(settings, user_id, who=who or getpass.getuser())
    table = Table(title=f"forgot user (tombstone {report.tombstone})")
    table.add_column("place")
    table.add_column("removed", justify="right")
    for place, count in report.removed.items():
        table.add_row(place, f"{count:,}")
    table.add_row("forget list", "recorded")
    console = Console()
    console.print(table)
    console.print(f"{report.files_rewritten} files rewritten; audit record in "
                  f"{settings.data_dir / 'privacy' / 'audit.jsonl'}")
