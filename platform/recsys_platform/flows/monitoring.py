"""The monitoring flow: reads serving, the online store and MLflow; fails when something drifts.

Checks (the math is in :mod:`recsys_pipelines.monitoring`, thresholds in
``settings.monitoring``):

- feature drift: PSI per batch feature between the champion's training snapshot (newest row
  per user / item) and the online store's current values for a sample of those entities;
- score drift: PSI of served scores (impression log) in the last window against the window
  before it;
- catalog coverage and popularity skew (Gini) of the items served in the last window;
- stream freshness: now minus the newest window end the stream job wrote (Redis counters);
- serving error and fallback rates, scraped from ``/metrics`` when a URL is configured.

A check without data (no served rows, no stream counters, no URL) is skipped with a note.
Results go to an MLflow run of the ``monitoring`` experiment (metrics + ``report.json``) and
to a Prometheus textfile (``settings.monitoring.textfile``) for node-exporter's textfile
collector. Any breach fails the flow run with :class:`MonitoringBreach` naming what drifted.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context

from recsys_core import features as F
from recsys_core.settings import Settings, load_settings
from recsys_pipelines.monitoring import (
    Check,
    MonitoringBreach,
    breaches,
    feature_drift,
    freshness_check,
    latest_per_entity,
    rate_checks,
    score_drift,
    served_checks,
    serving_counters,
)

logger = logging.getLogger(__name__)

CHAMPION = "champion"
REPORT_ARTIFACT = "monitoring/report.json"


@dataclass
class MonitoringReport:
    """Every check of one run, what was skipped and why, and where the results went."""

    checks: list[Check]
    notes: list[str] = field(default_factory=list)
    champion: str | None = None
    snapshot_id: str | None = None
    mlflow_run_id: str | None = None
    textfile: str | None = None

    @property
    def breached(self) -> list[Check]:
        return breaches(self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "champion": self.champion, "snapshot_id": self.snapshot_id,
            "checks": [{**asdict(c), "breached": c in self.breached} for c in self.checks],
            "breaches": [c.describe() for c in self.breached], "notes": self.notes,
            "mlflow_run_id": self.mlflow_run_id, "textfile": self.textfile,
        }


# --- reading (I/O boundaries, retried) ------------------------------------------------------


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def champion_snapshot(settings: Settings) -> tuple[str, str, pd.DataFrame]:
    """The champion's version, its training snapshot id (a version tag) and that snapshot."""
    from mlflow import MlflowClient

    client = MlflowClient(settings.mlflow_tracking_uri, settings.mlflow_tracking_uri)
    version = client.get_model_version_by_alias(settings.mlflow.model_name, CHAMPION)
    snapshot_id = version.tags["snapshot_id"]
    path = settings.data_dir / "training" / snapshot_id
    return str(version.version), snapshot_id, pd.read_parquet(path)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def online_sample(settings: Settings, entity: str, ids: list[str]) -> pd.DataFrame:
    """Current online values of the entity's batch features (through Feast)."""
    from recsys_pipelines.feature_store import load_store, online_features

    view = F.USER_BATCH.name if entity == "user" else F.ITEM_BATCH.name
    return online_features(load_store(settings), entity, ids, (view,))


@task(cache_policy=NO_CACHE)
def served_rows(settings: Settings, since: datetime) -> pd.DataFrame:
    """Served items (the impression log's full responses) at or after ``since``."""
    import pyarrow.dataset as pads

    root = settings.landing_dir / "served"
    columns = ["user_id", "item_id", "score", "bundle_version", "served_at"]
    files = sorted(str(p) for p in root.rglob("*.parquet") if not p.name.startswith("."))
    first_day = since.date().isoformat()
    files = [f for f in files if Path(f).parent.name.removeprefix("date=") >= first_day]
    if not files:
        return pd.DataFrame(columns=columns)
    table = pads.dataset(files, format="parquet").to_table(
        columns=columns, filter=pads.field("served_at") >= pd.Timestamp(since))
    return table.to_pandas()


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def stream_latest_window(settings: Settings) -> pd.Timestamp | None:
    """The newest window end any stream view wrote, from the job's counters in Redis."""
    import redis

    client = redis.Redis.from_url(settings.redis.url, socket_timeout=5)
    try:
        raw: dict[bytes, bytes] = client.hgetall(  # type: ignore[assignment]
            f"{settings.redis.key_prefix}:stream:metrics")
    finally:
        client.close()
    ends = [int(v) for k, v in raw.items() if k.decode().endswith(":last_window_end_ms")]
    return pd.Timestamp(max(ends), unit="ms", tz="UTC") if ends else None


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


# --- checks (plain functions over what was read) --------------------------------------------


def drift_checks(settings: Settings, snapshot: pd.DataFrame, seed: int = 0
                 ) -> tuple[list[Check], list[str]]:
    """PSI per batch feature: snapshot (newest row per entity) vs online, per entity kind."""
    m = settings.monitoring
    checks: list[Check] = []
    notes: list[str] = []
    rng = np.random.default_rng(seed)
    for entity, group, size in (("user", F.USER_BATCH, m.sample_users),
                                ("item", F.ITEM_BATCH, m.sample_items)):
        key = F.ENTITY_KEYS[entity]
        reference = latest_per_entity(snapshot, key)
        ids = reference[key].astype(str).to_numpy()
        if ids.size > size:
            ids = rng.choice(ids, size=size, replace=False)
        current = online_sample(settings, entity, sorted(ids.tolist()))
        found = current[group.feature_names].notna().any(axis=1).sum() if len(current) else 0
        if found == 0:
            notes.append(f"feature drift ({entity}): none of {len(ids)} sampled {entity}s has "
                         "online features; skipped")
            continue
        reference = reference[reference[key].astype(str).isin(set(ids))]
        checks += feature_drift(reference, current, group.feature_names, m.max_feature_psi,
                                m.psi_bins)
    return checks, notes


def served_log_checks(settings: Settings, served: pd.DataFrame, catalog_size: int,
                      now: datetime) -> tuple[list[Check], list[str]]:
    """Score drift (this window vs the previous one), coverage and Gini of this window."""
    m = settings.monitoring
    window = timedelta(hours=m.window_hours)
    at = pd.to_datetime(served["served_at"], utc=True)
    current = served[at >= pd.Timestamp(now - window)]
    previous = served[(at < pd.Timestamp(now - window)) & (at >= pd.Timestamp(now - 2 * window))]
    checks: list[Check] = []
    notes: list[str] = []
    if current.empty:
        notes.append(f"served items: nothing served in the last {m.window_hours:g} h; "
                     "score drift, coverage and popularity skew skipped")
        return checks, notes
    checks += served_checks(current, catalog_size, m.min_catalog_coverage, m.max_popularity_gini)
    if previous.empty:
        notes.append(f"score drift: nothing served in the {m.window_hours:g} h before; skipped")
    else:
        checks.append(score_drift(previous["score"].to_numpy(), current["score"].to_numpy(),
                                  m.max_score_psi, m.psi_bins))
    return checks, notes


def serving_rate_checks(settings: Settings, metrics_text: str) -> tuple[list[Check], list[str]]:
    """Error and fallback rates per request since the scraped replica started."""
    m = settings.monitoring
    totals = serving_counters(metrics_text)
    # Serving the last good version because the champion alias names a rejected one.
    bundle = ([Check("serving_bundle_fallback", totals["bundle_fallback"], 0.0)]
              if "bundle_fallback" in totals else [])
    if totals["requests"] <= 0:
        return bundle, ["serving rates: the scraped replica has served no request yet; skipped"]
    counters = {"errors": totals["errors"], "fallbacks": totals["fallbacks"]}
    return bundle + rate_checks(counters, totals["requests"],
                                {"errors": m.max_error_rate, "fallbacks": m.max_fallback_rate}), []


# --- outputs --------------------------------------------------------------------------------


def metric_name(check: Check) -> str:
    """MLflow metric key of a check (``psi:user_ctr_7d`` -> ``psi/user_ctr_7d``)."""
    return check.name.replace(":", "/")


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def log_to_mlflow(settings: Settings, report: MonitoringReport, flow_run_id: str) -> str:
    """One run under the monitoring experiment: a metric per check and ``report.json``."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(settings.mlflow_tracking_uri, settings.mlflow_tracking_uri)
    name = settings.monitoring.experiment
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment is not None else \
        client.create_experiment(name, artifact_location=settings.path(
            settings.mlflow.artifact_location))
    run = client.create_run(experiment_id, run_name="monitoring", tags={
        "prefect.flow_run_id": flow_run_id, "champion": str(report.champion),
        "snapshot_id": str(report.snapshot_id), "breaches": str(len(report.breached)),
    })
    stamp = int(time.time() * 1000)
    # A non-finite value (stream never wrote: lag = inf) is only in report.json.
    metrics = [Metric(metric_name(c), c.value, stamp, 0) for c in report.checks
               if np.isfinite(c.value)]
    metrics.append(Metric("breaches", float(len(report.breached)), stamp, 0))
    client.log_batch(run.info.run_id, metrics=metrics)
    client.log_text(run.info.run_id, json.dumps(report.to_dict(), indent=2), REPORT_ARTIFACT)
    client.set_terminated(run.info.run_id, "FAILED" if report.breached else "FINISHED")
    return str(run.info.run_id)


def write_prometheus(path: Path, report: MonitoringReport) -> Path:
    """Writes the checks as gauges in Prometheus' text format (atomically, for node-exporter).

    ``recsys_monitoring_value{check}``, ``recsys_monitoring_threshold{check}``,
    ``recsys_monitoring_breached{check}`` (0/1), ``recsys_monitoring_breaches`` and
    ``recsys_monitoring_last_run_timestamp_seconds``.
    """
    from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

    registry = CollectorRegistry()
    value = Gauge("recsys_monitoring_value", "Monitored value.", ["check"], registry=registry)
    limit = Gauge("recsys_monitoring_threshold", "Threshold of the check.", ["check"],
                  registry=registry)
    breached = Gauge("recsys_monitoring_breached", "1 when past its threshold.", ["check"],
                     registry=registry)
    bad = report.breached
    for check in report.checks:
        value.labels(check.name).set(check.value)
        limit.labels(check.name).set(check.threshold)
        breached.labels(check.name).set(1.0 if check in bad else 0.0)
    Gauge("recsys_monitoring_breaches", "Checks past their threshold in the last run.",
          registry=registry).set(len(bad))
    Gauge("recsys_monitoring_last_run_timestamp_seconds", "When the last run finished.",
          registry=registry).set_to_current_time()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), registry)  # writes a temp file, then renames
    return path


def _flow_run_id() -> str:
    try:
        return str(get_run_context().flow_run.id)  # type: ignore[union-attr]
    except Exception:
        return "unknown"


# --- the flow -------------------------------------------------------------------------------


def collect_checks(settings: Settings, now: datetime) -> MonitoringReport:
    """Reads every source and runs every check (no outputs written)."""
    from recsys_models.workflow import load_catalog

    m = settings.monitoring
    version, snapshot_id, snapshot = champion_snapshot(settings)
    report = MonitoringReport(checks=[], champion=version, snapshot_id=snapshot_id)
    checks, notes = drift_checks(settings, snapshot)
    report.checks += checks
    report.notes += notes

    served = served_rows(settings, now - timedelta(hours=2 * m.window_hours))
    checks, notes = served_log_checks(settings, served, len(load_catalog(settings, snapshot)),
                                      now)
    report.checks += checks
    report.notes += notes

    latest = stream_latest_window(settings)
    if latest is None and not m.require_stream:
        report.notes.append("stream freshness: the stream job has written no counters to "
                            f"{settings.redis.key_prefix}:stream:metrics; skipped")
    else:
        report.checks.append(freshness_check(latest, pd.Timestamp(now), m.max_stream_lag_s))

    if m.serving_metrics_url is None:
        report.notes.append("serving rates: monitoring.serving_metrics_url not set; skipped")
    else:
        checks, notes = serving_rate_checks(settings, scrape(m.serving_metrics_url))
        report.checks += checks
        report.notes += notes
    return report


@flow(name="monitoring", validate_parameters=False)
def monitoring_flow(profile: str | None = None, config_file: str | None = None,
                    settings: Settings | None = None) -> dict[str, Any]:
    """Runs every check, logs to MLflow and the Prometheus textfile, fails on a breach.

    Args:
        profile: Settings profile; config_file: YAML overriding it; settings: already loaded.

    Returns:
        The report as a dict (checks, breaches, notes, MLflow run id, textfile).

    Raises:
        MonitoringBreach: A check passed its threshold; the message names each one.
    """
    settings = settings or load_settings(profile, Path(config_file) if config_file else None)
    log = get_run_logger()
    report = collect_checks(settings, datetime.now(UTC))
    report.textfile = str(write_prometheus(Path(settings.path(settings.monitoring.textfile)),
                                           report))
    report.mlflow_run_id = log_to_mlflow(settings, report, _flow_run_id())
    for note in report.notes:
        log.info("%s", note)
    log.info("monitoring: %d checks, %d breached (MLflow run %s, textfile %s)",
             len(report.checks), len(report.breached), report.mlflow_run_id, report.textfile)
    if report.breached:
        raise MonitoringBreach(report.breached)
    return report.to_dict()
