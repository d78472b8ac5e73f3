"""The scheduled ``decide`` of the running online experiment (deployment ``experiment-decide``).

Wiring only: the ETL brings the newest impressions and clicks from the landing area into the
lake (the experiment's days, at most the last two), then
:func:`recsys_platform.experiments.lifecycle.run_decide` analyses, decides and records the
decision on the versions (``who`` = ``experiment-flow``). No running experiment: nothing to do,
the run completes.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from recsys_core.settings import Settings, load_settings
from recsys_platform.experiments import lifecycle

logger = logging.getLogger(__name__)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def running(settings: Settings) -> Any:
    return lifecycle.current(settings)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def decide_task(settings: Settings, why: str, who: str) -> dict[str, Any]:
    from recsys_platform.experiments.store import summary

    outcome = lifecycle.run_decide(settings, why=why, who=who)
    return {"experiment": outcome.experiment.id, "decision": outcome.decision.action,
            "reasons": outcome.decision.reasons, "numbers": summary(outcome.report)}


@flow(name="experiment-decide", validate_parameters=False)
def experiment_decide_flow(why: str = "scheduled decision", who: str = "experiment-flow",
                           run_etl: bool = True, profile: str | None = None,
                           config_file: str | None = None,
                           settings: Settings | None = None) -> dict[str, Any]:
    """ETL of the experiment's recent days, then ``decide``.

    Args:
        why: Recorded with the decision; who: recorded as the decider.
        run_etl: Land the newest impressions and clicks in the lake first.
        profile: Settings profile; config_file: YAML overriding it; settings: already loaded.

    Returns:
        ``{"experiment", "decision", "reasons", "numbers"}``; ``experiment`` is None when no
        experiment is running.
    """
    from recsys_platform.flows.data import etl_flow

    settings = settings or load_settings(profile, Path(config_file) if config_file else None)
    log = get_run_logger()
    exp = running(settings)
    if exp is None:
        log.info("no online experiment is running: nothing to decide")
        return {"experiment": None, "decision": None, "reasons": [], "numbers": {}}
    today = datetime.now(UTC).date()
    if run_etl:
        # inline (.fn), as the platform flow runs its stage flows: its tasks join this run
        etl_flow.fn(start=max(exp.started.date(), today - timedelta(days=1)), end=today,
                    lookahead_days=0, settings=settings)
    result = decide_task(settings, why, who)
    log.info("experiment %s: %s (%s)", result["experiment"], result["decision"],
             "; ".join(result["reasons"]))
    return result
