"""Start, inspect, stop and decide online experiments: what ``recsys experiment`` and the
scheduled ``experiment-decide`` deployment call.

``decide`` reads the active experiment, analyses its labelled impressions
(:func:`~recsys_platform.experiments.analysis.evaluate`), applies the rule
(:func:`~recsys_platform.experiments.stats.decide`) and records the outcome
(:func:`~recsys_platform.experiments.store.record_decision`): promote (``champion`` moves to
the treatment, the experiment ends), roll back or expire (the experiment ends, the champion
keeps all traffic), or keep running. Serving follows within one poll interval.
"""

from __future__ import annotations

import getpass
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from recsys_core.settings import Settings
from recsys_platform.experiments import store
from recsys_platform.experiments.definition import Experiment, ExperimentError, Guardrails
from recsys_platform.experiments.stats import Decision, Report, decide

logger = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What one ``decide`` did."""

    experiment: Experiment
    decision: Decision
    report: Report


def _version(client: Any, name: str, ref: str) -> str:
    """A version number from a version or an alias (``challenger``)."""
    if ref.isdigit():
        client.get_model_version(name, ref)  # raises when it does not exist
        return ref
    try:
        return str(client.get_model_version_by_alias(name, ref).version)
    except Exception:
        raise ExperimentError(f"no version of {name} carries the alias {ref!r}: register one "
                              "(`recsys train`) or pass a version number") from None


def start(settings: Settings, treatment: str = "challenger", mode: str = "split",
          share: float | None = None, *, why: str, who: str | None = None,
          guardrails: Guardrails | None = None, **options: Any) -> Experiment:
    """Starts an experiment of ``treatment`` (alias or version) against the champion.

    Raises:
        ExperimentError: No champion, the treatment is the champion, an experiment is running
            already, or an option is out of range.
    """
    name = settings.mlflow.model_name
    with store.client_for(settings) as client:
        treatment_version = _version(client, name, treatment)
        try:
            control = str(client.get_model_version_by_alias(name, "champion").version)
        except Exception:
            raise ExperimentError(f"{name} has no champion to compare against: promote one "
                                  "first (`recsys models promote`)") from None
        exp = Experiment.new(treatment_version, mode, share=share, control_version=control,
                             who=who or getpass.getuser(),
                             guardrails=guardrails or Guardrails(), **options)
        store.open_experiment(client, settings, exp, why)
    return exp


def current(settings: Settings) -> Experiment | None:
    """The running experiment, None when there is none."""
    with store.client_for(settings) as client:
        return store.active(client, settings.mlflow.model_name)


def _require(settings: Settings) -> Experiment:
    exp = current(settings)
    if exp is None:
        raise ExperimentError(f"no experiment is running on {settings.mlflow.model_name}: "
                              "`recsys experiment start` one")
    return exp


def status(settings: Settings, as_of: datetime | None = None) -> tuple[Experiment, Report,
                                                                       Decision]:
    """The running experiment, its numbers now and what ``decide`` would do (nothing is
    recorded)."""
    from recsys_platform.experiments.analysis import evaluate

    exp = _require(settings)
    now = as_of or datetime.now(UTC)
    report = evaluate(settings, exp, now)
    return exp, report, decide(exp, report, now)


def run_decide(settings: Settings, *, why: str = "scheduled decision", who: str | None = None,
               as_of: datetime | None = None) -> Outcome:
    """Analyses the running experiment, decides, records the decision on the versions."""
    exp, report, decision = status(settings, as_of)
    when = (as_of or datetime.now(UTC)).isoformat()
    with store.client_for(settings) as client:
        store.record_decision(client, settings, exp, decision, report,
                              who or getpass.getuser(), why, when)
    return Outcome(exp, decision, report)


def stop(settings: Settings, *, why: str, who: str | None = None) -> Experiment:
    """Ends the running experiment by hand; the champion keeps all traffic (audited)."""
    exp = _require(settings)
    when = datetime.now(UTC).isoformat()
    with store.client_for(settings) as client:
        store.record_decision(client, settings, exp, Decision("stop", [f"stopped: {why}"]),
                              None, who or getpass.getuser(), why, when)
    return exp
