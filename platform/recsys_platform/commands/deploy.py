"""``recsys deploy``: artefacts for the Helm chart in ``helm/recsys``.

``render-config`` writes the ConfigMap data the chart embeds (``files/recsys-config.yaml``)
from the ``k8s`` settings profile, so the chart never restates an address or a name.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from recsys_core.settings import load_settings
from recsys_platform.k8s import CHART_CONFIG_FILE, recsys_environment, render_configmap_file

logger = logging.getLogger(__name__)
console = Console()

app = typer.Typer(help="Render deployment artefacts for the Helm chart.", no_args_is_help=True)


@app.callback()
def _deploy() -> None:
    """Keeps ``deploy`` a command group even with one command."""


@app.command("render-config")
def render_config(
    out: Annotated[Path, typer.Option(help="File the chart embeds as its ConfigMap data.")]
    = CHART_CONFIG_FILE,
    config: Annotated[Path | None, typer.Option(help="YAML overriding the k8s profile.")]
    = None,
    check: Annotated[bool, typer.Option(help="Only compare; exit 1 when the file is stale.")]
    = False,
) -> None:
    """Renders the chart's ConfigMap from the ``k8s`` settings profile."""
    leaked = sorted(recsys_environment())
    if leaked:
        logger.warning("RECSYS_* variables in this shell change the rendering: %s",
                       ", ".join(leaked))
    rendered = render_configmap_file(load_settings("k8s", config, secrets=False))
    if check:
        current = out.read_text() if out.is_file() else ""
        if current != rendered:
            console.print(f"[red]{out} is stale[/]: run `recsys deploy render-config`")
            raise typer.Exit(1)
        console.print(f"{out} is up to date")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(rendered)
    console.print(f"wrote {out} ({rendered.count(chr(10)) - 2} settings)")
