"""The stream job: wire source, SQL windows, Redis sink and side outputs into one Flink job.

Run it locally (Flink mini cluster in this process)::

    python -m recsys_pipelines.stream.job --profile local            # long-running
    python -m recsys_pipelines.stream.job --replay-from 2026-11-01   # bounded backfill
    python -m recsys_pipelines.stream.job --restore latest           # from the last checkpoint

The Flink operator runs the same module (``python -m recsys_pipelines.stream.job``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import uuid
from dataclasses import dataclass, replace
from datetime import date, timedelta
from pathlib import Path

from pyflink.common import Configuration
from pyflink.table import EnvironmentSettings, StatementSet, TableEnvironment, TableResult

from recsys_core.features import ITEM_TRENDING, USER_STREAM
from recsys_core.settings import Settings, load_settings
from recsys_pipelines.stream import sql
from recsys_pipelines.stream.checkpoints import latest_checkpoint
from recsys_pipelines.stream.sink import SinkConfig
from recsys_pipelines.stream.udf import redis_sink_udf, sink_columns

logger = logging.getLogger(__name__)

KAFKA_STARTUP = {"earliest": "earliest-offset", "latest": "latest-offset",
                 "committed": "group-offsets"}
BLACKHOLE = "stream_written"


@dataclass(frozen=True)
class JobOptions:
    """Everything the job needs, resolved from settings at the entrypoint."""

    sink: SinkConfig
    source: str = "file"
    stream_dir: str = "data/landing/stream"
    checkpoint_dir: str = "data/flink/checkpoints"
    deadletter_dir: str = "data/flink/deadletter"
    late_dir: str = "data/flink/late"
    checkpoint_interval_ms: int = 5_000
    parallelism: int = 1
    out_of_orderness_s: int = 30
    allowed_lateness_s: int = 300  # late rows within it are applied; later ones: late files
    dedupe_window_s: int = 900  # how long an event_id is remembered (processing time)
    pseudonym_key: str | None = None  # set: user_id is pseudonymized at parse time
    sink_batch_rows: int = 10_000  # window rows per Python sink call (Arrow batch)
    write_redis: bool = True  # False: the same SQL into a blackhole (the benchmark's floor)
    monitor_interval_ms: int = 200
    bounded: bool = False  # read the files present, then finish (replay)
    from_date: date | None = None
    restore_from: str | None = None  # a retained chk-N directory
    kafka: tuple[tuple[str, str], ...] = ()
    job_name: str = "recsys-stream-features"


def options_from_settings(settings: Settings, **overrides: object) -> JobOptions:
    """Resolves paths and knobs from the flink, redis and feast settings."""
    flink = settings.flink
    checkpoint_dir = Path(settings.path(flink.checkpoint_dir)).resolve()
    options = JobOptions(
        sink=SinkConfig(settings.redis.url, settings.feast.project, settings.redis.key_prefix),
        source=flink.source,
        stream_dir=str(Path(settings.path(flink.stream_dir)).resolve()),
        checkpoint_dir=str(checkpoint_dir),
        deadletter_dir=str(checkpoint_dir.parent / "deadletter"),
        late_dir=str(checkpoint_dir.parent / "late"),
        checkpoint_interval_ms=flink.checkpoint_interval_ms,
        parallelism=flink.parallelism,
        out_of_orderness_s=flink.max_out_of_orderness_s,
        allowed_lateness_s=flink.allowed_lateness_s,
        dedupe_window_s=flink.dedupe_window_s,
        pseudonym_key=settings.privacy.key if settings.privacy.pseudonymize else None,
        kafka=(("bootstrap", flink.kafka_bootstrap), ("topic", flink.kafka_topic),
               ("group", flink.kafka_group), ("startup", KAFKA_STARTUP[flink.kafka_offsets])),
    )
    return replace(options, **overrides)  # type: ignore[arg-type]


def flink_configuration(options: JobOptions) -> Configuration:
    """Flink settings of the job: thread mode, checkpoints retained, UTC, dedupe TTL."""
    conf = Configuration()
    values = {
        "python.executable": sys.executable,
        "python.client.executable": sys.executable,
        "python.execution-mode": "thread",
        "python.fn-execution.bundle.time": "100",
        "python.fn-execution.arrow.batch.size": str(options.sink_batch_rows),
        "python.fn-execution.bundle.size": str(options.sink_batch_rows),
        "pipeline.object-reuse": "true",
        # Only the event_id deduplication keeps non-window state: this bounds it.
        "table.exec.state.ttl": f"{options.dedupe_window_s} s",
        "parallelism.default": str(options.parallelism),
        "table.local-time-zone": "UTC",
        "pipeline.name": options.job_name,
        "pipeline.auto-watermark-interval": "50 ms",
        "execution.checkpointing.interval": f"{options.checkpoint_interval_ms} ms",
        "execution.checkpointing.mode": "EXACTLY_ONCE",
        "execution.checkpointing.dir": Path(options.checkpoint_dir).as_uri(),
        "execution.checkpointing.externalized-checkpoint-retention": "RETAIN_ON_CANCELLATION",
        "execution.checkpointing.num-retained": "2",
        "state.backend.type": "hashmap",
        "table.exec.source.idle-timeout": "0 ms",
    }
    if options.restore_from:
        values["execution.state-recovery.path"] = Path(options.restore_from).as_uri()
    for key, value in values.items():
        conf.set_string(key, value)
    return conf


def create_table_env(options: JobOptions) -> TableEnvironment:
    """A streaming TableEnvironment configured for the job (the JVM is reused if running)."""
    settings = (EnvironmentSettings.new_instance().in_streaming_mode()
                .with_configuration(flink_configuration(options)).build())
    return TableEnvironment.create(settings)


def build_job(t_env: TableEnvironment, options: JobOptions) -> StatementSet:
    """Registers the tables, views and sink functions; returns the job's statement set."""
    user_plan = sql.window_plan(USER_STREAM, recent_items=True)
    item_plan = sql.window_plan(ITEM_TRENDING)
    if options.source == "file":
        Path(options.stream_dir).mkdir(parents=True, exist_ok=True)
    for ddl in sql.source_ddl(
        "kafka" if options.source == "kafka" else "file",
        stream_dir=options.stream_dir,
        monitor_interval_ms=None if options.bounded else options.monitor_interval_ms,
        out_of_orderness=timedelta(seconds=options.out_of_orderness_s),
        kafka=dict(options.kafka),
    ):
        t_env.execute_sql(ddl)
    lateness = timedelta(seconds=options.allowed_lateness_s)
    t_env.execute_sql(sql.parsed_view_sql(options.from_date, options.pseudonym_key))
    # A Table view is one shared plan node: one dedupe operator for every branch.
    t_env.create_temporary_view(sql.UNIQUE_VIEW, t_env.sql_query(sql.unique_query()))
    for view in sql.split_views_sql(lateness):
        t_env.execute_sql(view)
    rollover = max(500, options.checkpoint_interval_ms)
    t_env.execute_sql(sql.side_output_ddl(sql.DEADLETTER_TABLE, options.deadletter_dir,
                                          rollover))
    t_env.execute_sql(sql.side_output_ddl(sql.LATE_TABLE, options.late_dir, rollover))
    t_env.execute_sql(f"CREATE TABLE {BLACKHOLE} (n BIGINT) WITH ('connector' = 'blackhole')")

    statements = t_env.create_statement_set()
    sink = replace(options.sink, allowed_lateness_ms=options.allowed_lateness_s * 1000,
                   run_id=uuid.uuid4().hex)
    for plan in (user_plan, item_plan):
        name = f"write_{plan.group.name}"
        t_env.create_temporary_function(name, redis_sink_udf(sink, plan))
        t_env.create_temporary_view(sql.slices_view(plan), t_env.sql_query(sql.slice_query(plan)))
        t_env.create_temporary_view(f"{plan.group.name}_windows",
                                    t_env.sql_query(sql.sink_rows_query(plan)))
        args = ", ".join(sink_columns(plan))
        written = f"{name}({args})" if options.write_redis else sql.EVENTS_COLUMN
        statements.add_insert_sql(
            f"INSERT INTO {BLACKHOLE} SELECT {written} FROM {plan.group.name}_windows")
    statements.add_insert_sql(sql.deadletter_insert())
    statements.add_insert_sql(sql.late_insert(lateness))
    return statements


def start(options: JobOptions) -> TableResult:
    """Builds and submits the job; returns at once (``.wait()`` blocks until it ends)."""
    if options.restore_from:
        logger.info("restoring from %s", options.restore_from)
    t_env = create_table_env(options)
    result = build_job(t_env, options).execute()
    logger.info("stream job %s submitted (source=%s, bounded=%s)", options.job_name,
                options.source, options.bounded)
    return result


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m recsys_pipelines.stream.job",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--profile", default=None)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--replay-from", type=date.fromisoformat, default=None,
                        help="bounded backfill of events on or after this date, then exit")
    parser.add_argument("--restore", default=None,
                        help="a chk-N directory, or 'latest' for the newest retained one")
    parser.add_argument("--stream-dir", default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entrypoint: load settings, submit the job and block until it ends."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = _parse_args(argv)
    settings = load_settings(args.profile, args.config)
    overrides: dict[str, object] = {}
    if args.stream_dir:
        overrides["stream_dir"] = str(Path(args.stream_dir).resolve())
    if args.replay_from:
        overrides.update(bounded=True, from_date=args.replay_from,
                         job_name="recsys-stream-replay")
    options = options_from_settings(settings, **overrides)
    if args.restore:
        restore = args.restore
        if restore == "latest":
            restore = str(latest_checkpoint(Path(options.checkpoint_dir)))
        options = replace(options, restore_from=restore)
    start(options).wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
