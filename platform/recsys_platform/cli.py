"""The ``recsys`` command line: one entry point for every stage of the platform.

Settings are loaded here, once, from ``--profile``/``--config`` and the environment; logging is
configured here too. Commands only parse arguments and call plain functions.
"""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console

from recsys_core.errors import RecsysError
from recsys_core.logs import configure as configure_logging
from recsys_core.settings import Settings, load_settings, redacted
from recsys_pipelines.online_store import resolve_online_store
from recsys_platform.commands import data as data_commands
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

app = typer.Typer(help="Recommendation platform: data, features, training, serving.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
config_app = typer.Typer(help="Inspect the resolved configuration.", no_args_is_help=True)
app.add_typer(data_commands.app, name="data")
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


@app.command("demo")
def demo(
    events: Annotated[int, typer.Option(help="Synthetic events to generate.")] = 200_000,
    movielens: Annotated[Path, typer.Option(help="MovieLens folder.")]
    = data_commands.DEFAULT_MOVIELENS,
) -> None:
    """Runs the end-to-end demo on embedded defaults and prints a summary.

    generate -> MovieLens import -> ETL, batch features, Feast apply + materialize, training
    snapshot -> train on Ray Train, evaluate, register, promote -> PyFlink stream job updates
    the online store -> Ray Serve answers a known user, a new user and the stream's user.
    """
    from recsys_platform import demo as demo_module

    demo_module.run(settings(), console, events, movielens)


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
