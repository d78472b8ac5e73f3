"""``recsys monitor run``: one run of the monitoring flow (Prefect), its checks as a table.

Wire with ``app.add_typer(monitor.app, name="monitor")``. Exit code 1 when a threshold is
breached (the flow run is then Failed, with a message naming what drifted).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from recsys_platform.commands.context import current_settings

app = typer.Typer(help="Monitoring: drift, coverage, freshness, serving rates.",
                  no_args_is_help=True)
console = Console()
logger = logging.getLogger(__name__)


@app.callback()
def _monitor() -> None:
    """Keeps ``monitor`` a command group even with one command."""


def print_report(report: dict[str, Any]) -> None:
    table = Table(title=f"monitoring of champion {report['champion']} "
                        f"(snapshot {report['snapshot_id']})")
    for column in ("check", "value", "threshold", ""):
        table.add_column(column)
    for check in report["checks"]:
        table.add_row(check["name"], f"{check['value']:.4g}", f"{check['threshold']:g}",
                      "[red]BREACHED[/]" if check["breached"] else "ok")
    console.print(table)
    for note in report["notes"]:
        console.print(f"- {note}")
    console.print(f"MLflow run {report['mlflow_run_id']}; Prometheus textfile "
                  f"{report['textfile']}")


@app.command("run")
def run_command(
    metrics_url: Annotated[str | None, typer.Option(
        help="Serving /metrics URL to scrape (default: monitoring.serving_metrics_url).")]
    = None,
) -> None:
    """Runs the monitoring flow once; exit code 1 when a threshold is breached."""
    from recsys_pipelines.monitoring import MonitoringBreach
    from recsys_platform.flows.data import prefect_api
    from recsys_platform.flows.monitoring import monitoring_flow

    settings = current_settings()
    if metrics_url:
        monitoring = settings.monitoring.model_copy(update={"serving_metrics_url": metrics_url})
        settings = settings.model_copy(update={"monitoring": monitoring})
    with prefect_api(settings):
        try:
            report = monitoring_flow(settings=settings)
        except MonitoringBreach as exc:
            console.print(f"[red]{exc}[/]")
            raise typer.Exit(1) from None
    print_report(report)
