"""Online experiments in MLflow: where serving finds them and where every decision is audited.

- The registered model's tag ``experiment.active`` holds the running experiment's JSON;
  serving replicas poll it (absent: no experiment).
- Each experiment is a run of the MLflow experiment ``online-experiments`` (run name = the
  experiment id): its definition as params, ``status``/``decision`` tags, and at every
  ``decide`` the numbers as metrics (one step per decision) plus ``report-<n>.json``.
- The treatment version carries the experiment (``experiment.id``, ``.mode``, ``.share``,
  ``.run_id``, ``.control_version``, ``.started``, ``.ended``) and, after each ``decide``, the
  audit like the offline gate's ``gate.*`` on a challenger: ``experiment.decision``,
  ``experiment.who``, ``experiment.why``, ``experiment.when``, ``experiment.what`` (the
  numbers, JSON); its model card gets an "Online experiment" section. The control version
  (the champion) gets ``experiment.control_in`` (the id) and ``experiment.control_outcome``,
  so that its own experiments' tags are never overwritten by one it was only the baseline of.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from recsys_core.settings import Settings
from recsys_platform.experiments.definition import ACTIVE_TAG, Experiment, ExperimentError
from recsys_platform.experiments.stats import Decision, Report

logger = logging.getLogger(__name__)

MLFLOW_EXPERIMENT = "online-experiments"
SECTION_HEADING = "### Online experiment"
TAG_PREFIX = "experiment."
DECISION_LABELS = {"promote": "promoted", "rollback": "rolled back", "continue": "running",
                   "expire": "expired", "stop": "stopped"}


@contextmanager
def client_for(settings: Settings) -> Iterator[MlflowClient]:
    uri = settings.mlflow_tracking_uri
    yield MlflowClient(tracking_uri=uri, registry_uri=uri)


def active(client: MlflowClient, name: str) -> Experiment | None:
    """The running experiment of registered model ``name`` (None when there is none)."""
    try:
        tags = client.get_registered_model(name).tags
    except MlflowException:
        return None
    text = tags.get(ACTIVE_TAG)
    return Experiment.from_json(text) if text else None


def _mlflow_experiment(client: MlflowClient, settings: Settings) -> str:
    exp = client.get_experiment_by_name(MLFLOW_EXPERIMENT)
    if exp is not None:
        return str(exp.experiment_id)
    return str(client.create_experiment(
        MLFLOW_EXPERIMENT, artifact_location=settings.path(settings.mlflow.artifact_location)))


def run_of(client: MlflowClient, exp_id: str) -> str | None:
    """The MLflow run id of experiment ``exp_id``."""
    mlflow_exp = client.get_experiment_by_name(MLFLOW_EXPERIMENT)
    if mlflow_exp is None:
        return None
    runs = client.search_runs([mlflow_exp.experiment_id],
                              filter_string=f"tags.`experiment.id` = '{exp_id}'", max_results=1)
    return runs[0].info.run_id if runs else None


def open_experiment(client: MlflowClient, settings: Settings, exp: Experiment,
                    why: str) -> str:
    """Records a new experiment: its run, the versions' tags, then the active tag that
    replicas poll (last, so that they never see an experiment without its records)."""
    name = settings.mlflow.model_name
    current = active(client, name)
    if current is not None:
        raise ExperimentError(f"experiment {current.id} is running (treatment version "
                              f"{current.treatment_version}): `recsys experiment decide` or "
                              "`recsys experiment stop` it first")
    run = client.create_run(_mlflow_experiment(client, settings), run_name=exp.id, tags={
        "experiment.id": exp.id, "status": "running", "mode": exp.mode,
        "treatment_version": exp.treatment_version,
        "control_version": exp.control_version or "", "started_by": exp.started_by,
        "why": why[:5000], "model_name": name})
    for key, value in exp.params().items():
        client.log_param(run.info.run_id, key, value[:500])
    for key, value in (("id", exp.id), ("mode", exp.mode), ("share", f"{exp.share:g}"),
                       ("run_id", run.info.run_id), ("control_version", exp.control_version
                                                     or ""),
                       ("decision", "running"), ("started", exp.started_at)):
        client.set_model_version_tag(name, exp.treatment_version, TAG_PREFIX + key, value)
    earlier = client.get_model_version(name, exp.treatment_version).tags
    for key in ("ended", "who", "why", "when", "what"):  # a previous experiment's audit
        if TAG_PREFIX + key in earlier:
            client.delete_model_version_tag(name, exp.treatment_version, TAG_PREFIX + key)
    if exp.control_version:
        client.set_model_version_tag(name, exp.control_version, TAG_PREFIX + "control_in",
                                     exp.id)
        client.set_model_version_tag(name, exp.control_version,
                                     TAG_PREFIX + "control_outcome", "running")
    client.set_registered_model_tag(name, ACTIVE_TAG, exp.to_json())
    logger.info("experiment %s started: %s, treatment %s vs champion %s, share %g", exp.id,
                exp.mode, exp.treatment_version, exp.control_version, exp.share)
    return run.info.run_id


def summary(report: Report | None) -> dict[str, Any]:
    """The numbers a decision rests on, compact enough for a tag (``experiment.what``)."""
    if report is None:
        return {}
    out: dict[str, Any] = {"metric": report.metric, "as_of": report.as_of,
                           "pending": report.pending}
    for arm in ("control", "treatment"):
        stats = getattr(report, arm)
        if stats is not None:
            out[arm] = {"users": stats.users, "impressions": stats.impressions,
                        "clicks": stats.clicks, report.metric: round(stats.value, 6),
                        "fallback_rate": round(stats.fallback_rate, 6),
                        "p99_latency_ms": round(stats.p99_latency_ms, 3),
                        "distinct_items": stats.distinct_items}
    if report.comparison is not None:
        c = report.comparison
        out["lift"] = {"difference": round(c.difference, 6),
                       "relative": round(c.relative_lift, 6), "ci": [round(c.ci_low, 6),
                                                                      round(c.ci_high, 6)],
                       "p_value": float(f"{c.p_value:.3g}"), "method": c.method}
    if report.srm is not None:
        out["srm"] = {"p_value": float(f"{report.srm.p_value:.3g}"),
                      "mismatch": report.srm.mismatch, "method": report.srm.method}
    if report.guardrail_breaches:
        out["guardrail_breaches"] = report.guardrail_breaches
    if report.shadow:
        out["shadow"] = {k: round(v, 6) for k, v in report.shadow.items()}
    return out


def card_section(exp: Experiment, action: str, who: str, why: str, when: str,
                 reasons: list[str], numbers: dict[str, Any]) -> str:
    """The model card's paragraph on the experiment and its latest decision."""
    lines = [SECTION_HEADING, "",
             f"`{exp.id}`: {exp.mode}, treatment version {exp.treatment_version} vs champion "
             f"version {exp.control_version or '-'}, share {exp.share:g}, primary metric "
             f"{exp.primary_metric}, confidence {exp.confidence:.0%}, min "
             f"{exp.min_samples:,} impressions per arm.", "",
             f"**{DECISION_LABELS.get(action, action)}** by {who} at {when}: {why}."]
    if reasons:
        lines += ["", "Because: " + "; ".join(reasons) + "."]
    arms = [(arm, numbers[arm]) for arm in ("control", "treatment") if arm in numbers]
    if arms:
        lines += ["", f"| arm | users | impressions | clicks | {exp.primary_metric} | "
                      "fallback rate | p99 ms | distinct items |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for arm, n in arms:
            lines.append(f"| {arm} | {n['users']} | {n['impressions']} | {n['clicks']} | "
                         f"{n[exp.primary_metric]:.4f} | {n['fallback_rate']:.2%} | "
                         f"{n['p99_latency_ms']:.1f} | {n['distinct_items']} |")
    if "lift" in numbers:
        lift = numbers["lift"]
        lines += ["", f"Lift {lift['difference']:+.4f} ({lift['relative']:+.1%}), "
                      f"{exp.confidence:.0%} CI [{lift['ci'][0]:+.4f}, {lift['ci'][1]:+.4f}], "
                      f"p = {lift['p_value']:.3g} ({lift['method']}); SRM p = "
                      f"{numbers.get('srm', {}).get('p_value', float('nan')):.3g}."]
    return "\n".join(lines)


def with_section(card: str, section: str) -> str:
    """``card`` with its experiment section replaced by ``section`` (other sections kept)."""
    if SECTION_HEADING not in card:
        return f"{card.rstrip()}\n\n{section}" if card.strip() else section
    head, rest = card.split(SECTION_HEADING, 1)
    tail = rest.split("\n### ", 1)
    after = f"\n\n### {tail[1]}" if len(tail) > 1 else ""
    return f"{head.rstrip()}\n\n{section}{after}".lstrip()


def record_decision(client: MlflowClient, settings: Settings, exp: Experiment,
                    decision: Decision, report: Report | None, who: str, why: str,
                    when: str) -> None:
    """Audits one decision on both versions and the experiment's run; when it ends the
    experiment, clears the active tag (and on ``promote`` moves ``champion`` first)."""
    name = settings.mlflow.model_name
    numbers = summary(report)
    label = DECISION_LABELS.get(decision.action, decision.action)
    what = json.dumps({**numbers, "reasons": decision.reasons,
                       "treatment_version": exp.treatment_version,
                       "control_version": exp.control_version}, default=str)
    run_id = run_of(client, exp.id)
    for key, value in (("decision", label), ("who", who), ("why", why), ("when", when),
                       ("what", what)):
        client.set_model_version_tag(name, exp.treatment_version, TAG_PREFIX + key,
                                     value[:5000])
    if exp.control_version:
        client.set_model_version_tag(name, exp.control_version, TAG_PREFIX + "control_outcome",
                                     f"{label} ({when})")
    card = client.get_model_version(name, exp.treatment_version).description or ""
    section = card_section(exp, decision.action, who, why, when, decision.reasons, numbers)
    client.update_model_version(name, exp.treatment_version,
                                description=with_section(card, section))
    if run_id is not None:
        step = len(client.get_metric_history(run_id, "decisions")) + 1
        client.log_metric(run_id, "decisions", step, step=step)
        for metric, number in (report.metrics().items() if report is not None else ()):
            client.log_metric(run_id, metric, number, step=step)
        client.log_text(run_id, json.dumps({"decision": decision.action,
                                            "reasons": decision.reasons, "who": who,
                                            "why": why, "when": when,
                                            "report": report.to_dict() if report else None},
                                           indent=2, default=str),
                        f"decisions/report-{step:03d}.json")
        client.set_tag(run_id, "decision", label)
        client.set_tag(run_id, "decision_reasons", "; ".join(decision.reasons)[:5000])
    if not decision.ends:
        return
    if decision.action == "promote":
        client.set_registered_model_alias(name, "champion", exp.treatment_version)
        for key, value in (("promoted_by", who), ("promoted_at", when),
                           ("promotion_reason", f"online experiment {exp.id}: {why}")):
            client.set_model_version_tag(name, exp.treatment_version, key, value)
    client.delete_registered_model_tag(name, ACTIVE_TAG)  # replicas stop routing
    client.set_model_version_tag(name, exp.treatment_version, TAG_PREFIX + "ended", when)
    if run_id is not None:
        client.set_tag(run_id, "status", "ended")
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
    logger.info("experiment %s %s: %s", exp.id, label, "; ".join(decision.reasons))
