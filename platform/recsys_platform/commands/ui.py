"""``recsys ui mlflow | prefect``: the web UIs on the profile's stores, on loopback.

Each command starts the server in the foreground, prints its URL once it answers and runs
until Ctrl-C; on a profile whose settings name a server already, it prints that URL.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from pathlib import Path
from typing import IO, Annotated

import typer
from rich.console import Console

from recsys_platform.commands.context import current_settings
from recsys_platform.ui import LOOPBACK, UiServer, mlflow_ui, prefect_ui, start, stop

logger = logging.getLogger(__name__)
app = typer.Typer(help="Web UIs: MLflow (runs, registry, aliases) and Prefect (flow runs).",
                  no_args_is_help=True)
console = Console()

HostOpt = Annotated[str, typer.Option(help="Address to listen on (loopback by default).")]


def _serve(server: UiServer, hint: str) -> None:
    if server.argv is None:
        console.print(f"{server.name} UI: {server.url} (the profile's server; {hint})")
        return
    log_path = current_settings().data_dir / "ui" / f"{server.name}.log"
    verbose = logging.getLogger().isEnabledFor(logging.DEBUG)
    with contextlib.ExitStack() as stack:
        log: IO[str] | None = None
        if not verbose:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log = stack.enter_context(Path(log_path).open("a"))
        with console.status(f"starting the {server.name} server on {server.store}"):
            process = start(server, log)
        console.print(f"{server.name} UI: [bold]{server.url}[/bold]  ({hint})")
        console.print(f"store {server.store}" + ("" if verbose else f"; log {log_path}")
                      + "; Ctrl-C stops")
        signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the server too, as Ctrl-C does
        try:
            process.wait()
        except KeyboardInterrupt:
            stop(process)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@app.command("mlflow")
def mlflow(host: HostOpt = LOOPBACK,
           port: Annotated[int, typer.Option(help="Port.")] = 5000) -> None:
    """MLflow: runs, the registered bundle's versions, aliases, model cards and gate tags."""
    s = current_settings()
    _serve(mlflow_ui(s, host, port), f"Models -> {s.mlflow.model_name}")


@app.command("prefect")
def prefect(host: HostOpt = LOOPBACK,
            port: Annotated[int, typer.Option(help="Port.")] = 4200) -> None:
    """Prefect: flow runs of the ETL, features and platform flows, their tasks and logs."""
    _serve(prefect_ui(current_settings(), host, port), "Runs")
