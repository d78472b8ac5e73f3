"""``recsys serve``: run the Ray Serve application locally."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Annotated

import typer

from recsys_platform.commands.context import current_settings
from recsys_platform.settings import Settings

logger = logging.getLogger(__name__)

app = typer.Typer(help="Real-time serving on Ray Serve.", no_args_is_help=True)


def start(settings: Settings, blocking: bool = False) -> str:
    """Starts Ray (local unless settings.ray.address) and the serving app; returns its URL."""
    import ray
    from ray import serve

    from recsys_platform.serving.app import RecommenderDeployment

    os.environ.setdefault("RECSYS_PROFILE", settings.profile)
    if not ray.is_initialized():
        ray.init(address=settings.ray.address, include_dashboard=False,
                 runtime_env={"env_vars": {"RECSYS_PROFILE": settings.profile,
                                           "RECSYS_DATA_DIR": str(settings.data_dir.resolve())}})
    serve.start(http_options={"host": settings.serving.host, "port": settings.serving.port})
    s = settings.serving
    deployment = RecommenderDeployment.options(  # type: ignore[attr-defined]
        max_queued_requests=s.max_queued_requests,
        autoscaling_config={"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                            "target_ongoing_requests": s.target_ongoing_requests},
    )
    serve.run(deployment.bind(profile=settings.profile), name="recsys", route_prefix="/",
              blocking=blocking)
    return f"http://{settings.serving.host}:{settings.serving.port}"


@app.command("run")
def run_command(
    config: Annotated[Path | None, typer.Option(help="Settings YAML for the replicas.")] = None,
) -> None:
    """Serves POST /recommend until interrupted (Ctrl-C)."""
    url = start(current_settings())
    typer.echo(f"serving on {url} (POST /recommend, GET /readyz, GET /metrics)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        serve.shutdown()
