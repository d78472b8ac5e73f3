"""Prefect flows: daily ETL, batch features, hourly materialization. Wiring only.

Each task wraps one plain function from :mod:`recsys_pipelines.etl`, ``.sources``,
``.batch_features`` or ``.feature_store``. Tasks at I/O boundaries retry with exponential
back-off; a partition that still fails fails the flow run (nothing is skipped silently).
Flows run on Prefect's ephemeral API unless ``PREFECT_API_URL`` points at a server
(``services`` profile: set it from ``settings.prefect.api_url``). Deployments: ``prefect.yaml``
at the repository root.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from recsys_core.settings import PrivacySettings, Settings, load_settings
from recsys_pipelines import batch_features, etl, etl_ray, feature_store, sources
from recsys_platform.runtime import ensure_ray

logger = logging.getLogger(__name__)

RETRIES = 3
RETRY_DELAY_S = 2.0  # back-off factor: waits 2, 4, 8 s between attempts
_BACKOFF = exponential_backoff(RETRY_DELAY_S)
EPHEMERAL_STARTUP_S = 120


@task(retries=RETRIES, retry_delay_seconds=_BACKOFF, cache_policy=NO_CACHE)
def read_landing(landing_dir: Path, day: date, quarantine_dir: Path) -> sources.LandingRead:
    return sources.read_landing_day(landing_dir, day, quarantine_dir)


@task(cache_policy=NO_CACHE)
def clean(raw: pd.DataFrame) -> etl.CleanBatch:
    return etl.clean_batch(raw)


@task(retries=RETRIES, retry_delay_seconds=_BACKOFF, cache_policy=NO_CACHE)
def write_partition(events: pd.DataFrame, lake_dir: Path, day: date) -> int:
    return etl.write_event_partition(events, lake_dir, day)


@task(retries=RETRIES, retry_delay_seconds=_BACKOFF, cache_policy=NO_CACHE)
def write_quarantine(quarantine: pd.DataFrame, lake_dir: Path, landing_day: date) -> int:
    return etl.write_quarantine(quarantine, lake_dir, landing_day)


@task(cache_policy=NO_CACHE)
def clean_on_ray(settings: Settings, landing_dir: Path, landing_days: list[date], start: date,
                 end: date) -> etl_ray.RayEtlCounts:
    ensure_ray(settings)
    return etl_ray.run_etl(landing_dir, settings.lake_dir, landing_days, start, end,
                           settings.privacy)


@task(retries=RETRIES, retry_delay_seconds=_BACKOFF, cache_policy=NO_CACHE)
def sync_snapshot(name: str, source: sources.SnapshotSource, lake_dir: Path,
                  privacy: PrivacySettings | None = None) -> dict[str, Any]:
    marks_path = lake_dir / "catalog" / "_watermarks.json"
    marks = sources.read_watermarks(marks_path)
    changed = sources.read_snapshot_since(source, marks.get(name))
    if privacy is not None:
        changed = etl.pseudonymize_users(changed, privacy)
    sync, mark = etl.upsert_snapshot(name, changed, lake_dir, marks.get(name))
    if mark is not None:
        sources.write_watermarks(marks_path, {**sources.read_watermarks(marks_path), name: mark})
    return asdict(sync)


def _settings(
    profile: str | None, config_file: str | None, settings: Settings | None = None
) -> Settings:
    if settings is not None:
        return settings
    return load_settings(profile, Path(config_file) if config_file else None)


@contextmanager
def prefect_api(settings: Settings) -> Iterator[None]:
    """Runs flows against ``settings.prefect.api_url`` when set, else the ephemeral API
    (given up to :data:`EPHEMERAL_STARTUP_S` to start: a busy machine needs more than 20 s)."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    if settings.prefect.api_url:
        updates: dict[Any, Any] = {PREFECT_API_URL: settings.prefect.api_url}
    else:
        updates = {PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: EPHEMERAL_STARTUP_S}
    with temporary_settings(updates=updates):
        yield


def _default_range(start: date | None, end: date | None) -> tuple[date, date]:
    """Scheduled runs: yesterday plus the day before, which picks up yesterday's late rows."""
    end = end or (datetime.now(UTC).date() - timedelta(days=1))
    return start or (end - timedelta(days=1)), end


@flow(name="etl", validate_parameters=True)
def etl_flow(
    start: date | None = None,
    end: date | None = None,
    landing_dir: str | None = None,
    lookahead_days: int = 1,
    catalog_url: str | None = None,
    profile: str | None = None,
    config_file: str | None = None,
    retry_delay_s: float = RETRY_DELAY_S,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Landing -> validated, deduplicated, date-partitioned lake (idempotent per date).

    Args:
        start: First event date (inclusive); default: the day before ``end``.
        end: Last event date (inclusive); default: yesterday (UTC).
        landing_dir: Raw source folder; default: ``settings.landing_dir``.
        lookahead_days: Landing partitions read past ``end`` to catch late events.
        catalog_url: SQLAlchemy URL of the catalog database (tables ``items``, ``users``);
            default: the Parquet snapshots in the landing area.
        profile: Settings profile; config_file: optional YAML overriding it.
        retry_delay_s: Back-off factor of I/O retries.
        settings: Already loaded settings (the CLI); wins over ``profile``/``config_file``.

    Returns:
        The :class:`~recsys_pipelines.etl.EtlResult` counts plus the snapshot syncs. A landing
        file that cannot be read at all is moved to the quarantine and listed under
        ``quarantined_files``; the rest of the range is processed (the CLI then exits 3).
    """
    settings = _settings(profile, config_file, settings)
    start, end = _default_range(start, end)
    etl.check_range(start, end)
    log = get_run_logger()
    backoff = exponential_backoff(retry_delay_s)
    landing = Path(landing_dir) if landing_dir else settings.landing_dir
    lake = settings.lake_dir
    existing = sources.landing_days_to_read(landing, start, end, lookahead_days)
    if settings.ray.etl:  # the same functions as below, executed by Ray (etl_ray)
        counts = clean_on_ray(settings, landing, existing, start, end)
        moved = counts.quarantined_files
        result = etl.summarize_counts(start, end, existing, counts.input_rows,
                                      counts.valid_rows, counts.duplicates, counts.reasons,
                                      counts.partitions, moved)
    else:
        reader = read_landing.with_options(retry_delay_seconds=backoff)
        reads = [reader(landing, d, lake / "quarantine") for d in existing]
        moved = [f for r in reads for f in r.quarantined_files]
        raw = sources.concat_raw([r.frame for r in reads], landing, start)
        raw = etl.pseudonymize_users(raw, settings.privacy)  # before anything reaches the lake
        batch = clean(raw)
        writer = write_partition.with_options(retry_delay_seconds=backoff)
        by_date = etl.split_by_event_date(batch.clean, start, end)
        partitions = {d.isoformat(): writer(frame, lake, d) for d, frame in by_date.items()}
        quarantiner = write_quarantine.with_options(retry_delay_seconds=backoff)
        for day in existing:
            quarantiner(batch.quarantine, lake, day)
        result = etl.summarize(start, end, existing, len(raw), batch, partitions, moved)
    syncer = sync_snapshot.with_options(retry_delay_seconds=backoff)
    snapshots = [syncer(name, source, lake, settings.privacy) for name, source
                 in sources.default_snapshot_sources(landing, catalog_url).items()]
    log.info("ETL %s..%s: %d clean, %d quarantined %s", start, end, result.clean_rows,
             result.quarantined_rows, result.reasons)
    if moved:
        log.error("%d unreadable landing files moved to %s: %s", len(moved), lake / "quarantine",
                  "; ".join(f"{f.source}: {f.reason}" for f in moved))
    return {**asdict(result), "snapshots": snapshots}


@task(cache_policy=NO_CACHE)
def compute(settings: Settings, start: date, end: date) -> batch_features.FeatureTables:
    ensure_ray(settings)
    return batch_features.compute_features(settings.lake_dir, start, end)


@task(retries=RETRIES, retry_delay_seconds=_BACKOFF, cache_policy=NO_CACHE)
def write_tables(tables: batch_features.FeatureTables, settings: Settings) -> dict[str, int]:
    return batch_features.write_feature_tables(tables, feature_store.offline_dir(settings))


@task(retries=RETRIES, retry_delay_seconds=_BACKOFF, cache_policy=NO_CACHE)
def apply(settings: Settings) -> int:
    store = feature_store.apply_definitions(settings)
    return len(store.list_feature_views())


@task(retries=RETRIES, retry_delay_seconds=_BACKOFF, cache_policy=NO_CACHE)
def materialize(settings: Settings, start: datetime, end: datetime) -> dict[str, Any]:
    return asdict(feature_store.materialize(settings, start, end))


@flow(name="features", validate_parameters=True)
def features_flow(
    start: date | None = None,
    end: date | None = None,
    profile: str | None = None,
    config_file: str | None = None,
    retry_delay_s: float = RETRY_DELAY_S,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Lake -> batch feature tables -> ``feast apply`` -> materialize the range online."""
    settings = _settings(profile, config_file, settings)
    start, end = _default_range(start, end)
    etl.check_range(start, end)
    backoff = exponential_backoff(retry_delay_s)
    tables = compute(settings, start, end)
    files = write_tables.with_options(retry_delay_seconds=backoff)(tables, settings)
    views = apply.with_options(retry_delay_seconds=backoff)(settings)
    window = (batch_features.day_end(start).to_pydatetime(),
              batch_features.day_end(end).to_pydatetime())
    online = materialize.with_options(retry_delay_seconds=backoff)(settings, *window)
    return {"rows": tables.rows, "files": files, "feature_views": views, "online": online}


@flow(name="materialize", validate_parameters=True)
def materialize_flow(
    end: datetime | None = None,
    profile: str | None = None,
    config_file: str | None = None,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Hourly: ``materialize-incremental`` of the batch views up to ``end`` (default now)."""
    settings = _settings(profile, config_file, settings)
    result = materialize_incremental_task(settings, end or datetime.now(UTC))
    return result


@task(retries=RETRIES, retry_delay_seconds=_BACKOFF, cache_policy=NO_CACHE)
def materialize_incremental_task(settings: Settings, end: datetime) -> dict[str, Any]:
    return asdict(feature_store.materialize_incremental(settings, end))
