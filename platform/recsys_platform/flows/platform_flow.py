"""The platform flow: ingest -> ETL -> features -> training set -> train -> gate -> promote.

One Prefect flow wires the stage flows and tasks of ``recsys_pipelines`` and ``recsys_models``;
each step's output is linked in MLflow (data snapshot id -> training run -> bundle version,
plus the Prefect flow-run ids of the ETL and feature runs), so any served version traces back
to its data. Serving picks the new champion up by polling the alias.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context

from recsys_core.settings import Settings, load_settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlatformRun:
    """What one platform flow run produced."""

    etl: dict[str, Any]
    features: dict[str, Any]
    snapshot_id: str
    training_rows: int
    version: str | None
    promoted: bool
    reasons: list[str]
    metrics: dict[str, float]


@task(cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def build_snapshot(settings: Settings, start: date | None, end: date | None) -> tuple[str, int]:
    """Labels the lake's closed impressions (log and wait) and joins their features."""
    from recsys_pipelines.feature_store import load_store
    from recsys_pipelines.training_set import build_snapshot as build

    return build(settings, load_store(settings), start, end)


@task(cache_policy=NO_CACHE)
def train_and_register(settings: Settings, snapshot_id: str, epochs: int, workers: int) -> Any:
    from recsys_core.settings import with_overrides
    from recsys_models.workflow import train_evaluate_register
    from recsys_platform.runtime import ensure_ray

    ensure_ray(settings)
    # the flow's epochs over the settings' training section (its other knobs apply as set)
    return train_evaluate_register(with_overrides(settings, [f"epochs={epochs}"]),
                                   snapshot_id=snapshot_id, workers=workers)


@task(cache_policy=NO_CACHE)
def gate_and_promote(settings: Settings, outcome: Any, why: str) -> Any:
    from recsys_models.registry import promote

    return promote(settings, outcome.split.train_labels, outcome.split.holdout, why=why,
                   who="platform-flow", baselines=outcome.baselines)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def link_lineage(settings: Settings, version: str, lineage: dict[str, str]) -> None:
    """Tags the bundle version with where its data came from."""
    from mlflow import MlflowClient

    client = MlflowClient(settings.mlflow_tracking_uri, settings.mlflow_tracking_uri)
    for key, value in lineage.items():
        client.set_model_version_tag(settings.mlflow.model_name, version, f"lineage.{key}",
                                     value)


def _flow_run_id() -> str:
    try:
        return str(get_run_context().flow_run.id)  # type: ignore[union-attr]
    except Exception:
        return "unknown"


@flow(name="platform", validate_parameters=False)
def platform_flow(
    start: date | None = None,
    end: date | None = None,
    profile: str | None = None,
    config_file: str | None = None,
    epochs: int = 2,
    workers: int = 2,
    why: str = "scheduled retrain",
    settings: Settings | None = None,
) -> PlatformRun:
    """The whole loop on one date range; ends with a gated promotion.

    Args:
        start: First event date; end: last event date (defaults as the ETL flow's).
        profile: Settings profile; config_file: YAML overriding it; settings: already loaded.
        epochs: Training epochs; workers: Ray Train workers.
        why: Recorded on the model version as the reason of the promotion attempt.
    """
    from recsys_platform.flows.data import etl_flow, features_flow

    settings = settings or load_settings(profile, Path(config_file) if config_file else None)
    log = get_run_logger()
    run_id = _flow_run_id()
    # The stage flows run inline (``.fn``): their tasks become tasks of this run. Prefect 3.5's
    # API, on the FastAPI release it works with, refuses the task run of a nested subflow.
    etl = etl_flow.fn(start=start, end=end, settings=settings)
    first, last = date.fromisoformat(etl["start"]), date.fromisoformat(etl["end"])
    features = features_flow.fn(start=first, end=last, settings=settings)
    snapshot_id, rows = build_snapshot(settings, None, None)
    outcome: Any = train_and_register(settings, snapshot_id, epochs, workers)
    version = outcome.registered.version if outcome.registered else None
    promotion: Any = gate_and_promote(settings, outcome, why)
    if version is not None:
        link_lineage(settings, str(version), {
            "snapshot_id": snapshot_id, "training_rows": str(rows),
            "etl_range": f"{etl['start']}..{etl['end']}", "platform_flow_run": run_id,
            "training_run": outcome.registered.run_id,
        })
    log.info("platform run: snapshot %s (%d rows) -> version %s: %s", snapshot_id, rows,
             version, "promoted" if promotion.promoted else "; ".join(promotion.reasons))
    return PlatformRun(etl=etl, features=features, snapshot_id=snapshot_id, training_rows=rows,
                       version=str(version) if version is not None else None,
                       promoted=promotion.promoted, reasons=list(promotion.reasons),
                       metrics=dict(outcome.report.metrics))
