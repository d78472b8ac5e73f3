"""The stream job's Flink SQL, built from the shared feature definitions (pure functions).

Every per-row step runs in SQL (the measured fast path); Python only writes the aggregated
window rows to Redis. The text is built from :mod:`recsys_core.features` and
:mod:`recsys_core.contracts`, so window sizes, feature names and rejection reasons have
one definition.

Window semantics: a feature at time ``t`` covers ``t - w < event_time <= t`` (see
:mod:`recsys_core.features`). Flink windows are ``[start, end)``, so the job's rowtime is
``event_time - 1 ms``: then ``start <= rowtime < end`` is exactly ``start < event_time <= end``
and a window's ``window_end`` is the feature timestamp. A group is one ``HOP`` window of its
longest aggregate, sliding by ``group.slide`` (or its shortest window), computed in two
levels: a ``TUMBLE`` of one slide per event (Flink slices it: one window per event), then the
``HOP`` over those per-slide rows; a shorter aggregate sums only its last slides.

Arrival rules (the watermark is ``max(rowtime) - out_of_orderness``):

- duplicates: the first line of an ``event_id`` wins, later copies are dropped for
  ``dedupe_window`` (Flink state TTL) — a replayed file is not counted twice;
- on time (``rowtime > watermark``): into the windows;
- late within ``allowed_lateness`` (``watermark - lateness < rowtime <= watermark``): applied
  by the sink to the entity's windows (see :mod:`.sink`), as one row per event;
- later than that: the late side output with a reason, counted, never dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from typing import Literal

from recsys_core.contracts import (
    EVENT_TYPES,
    RAW_EVENT_SCHEMA,
    REASON_BAD_TIME,
    REASON_BAD_TYPE,
    REASON_MISSING,
    REASON_NEGATIVE_DURATION,
    REASON_NEGATIVE_WATCH,
)
from recsys_core.features import (
    ENGAGEMENT_TYPES,
    ENTITY_KEYS,
    Aggregate,
    FeatureGroup,
)
from recsys_core.privacy import pseudonym_sql

REASON_NOT_JSON = "line is not a JSON object"
REASON_BAD_NUMBER = "watch_time_ms or item_duration_ms is not an integer"
# Separators of the recent-items list a window row carries: "time|event_id|item_id;..."
RECENT_SEP = ";"
RECENT_FIELD_SEP = "|"
RECENT_COLUMN = "recent"
EVENTS_COLUMN = "events_in_slide"
LATE_EVENT_COLUMN = "late_event_id"  # set on the rows of late events the sink applies
REASON_TOO_LATE = ("event_time is behind the watermark by more than the allowed lateness "
                   "({lateness_s} s)")

SOURCE_TABLE = "stream_events"
LINES_TABLE = "stream_lines"
PARSED_VIEW = "stream_parsed"
UNIQUE_VIEW = "stream_unique"
VALID_VIEW = "stream_valid"
LATE_APPLIED_VIEW = "stream_late_applied"
LATE_VIEW = "stream_late"
DEADLETTER_TABLE = "stream_deadletter"
LATE_TABLE = "stream_late_sink"


@dataclass(frozen=True)
class WindowPlan:
    """How one feature group is computed: a HOP window of ``size`` sliding by ``slide``."""

    group: FeatureGroup
    size: timedelta
    slide: timedelta
    recent_items: bool  # also carry the engaged items of the last slide (user groups)

    @property
    def key(self) -> str:
        return ENTITY_KEYS[self.group.entity]

    @property
    def aggregate_names(self) -> list[str]:
        return [a.name for a in self.group.aggregates]


def window_plan(group: FeatureGroup, recent_items: bool = False) -> WindowPlan:
    """Derives the HOP window of a group from its aggregates.

    Args:
        group: A stream feature group.
        recent_items: Whether rows also carry the items engaged with in the last slide.

    Returns:
        The plan: size = longest window, slide = ``group.slide`` or the shortest window.

    Raises:
        ValueError: A window is not a multiple of the slide (HOP needs whole panes).
    """
    windows = [a.window for a in group.aggregates]
    size, slide = max(windows), group.slide or min(windows)
    for w in windows:
        if w % slide:
            raise ValueError(
                f"group {group.name!r}: window {w} is not a multiple of the slide {slide}; "
                "choose a slide that divides every window in recsys_core.features"
            )
    return WindowPlan(group, size, slide, recent_items)


def _interval(span: timedelta) -> str:
    seconds = int(span.total_seconds())
    if seconds != span.total_seconds():
        raise ValueError(f"window {span} is not a whole number of seconds")
    return f"INTERVAL '{seconds}' SECOND({max(2, len(str(seconds)))})"


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _in(values: tuple[str, ...]) -> str:
    return ", ".join(_quote(v) for v in values)


def _event_time_expr() -> str:
    """``event_time`` as a TIMESTAMP(3), NULL unless it is an ISO-8601 UTC time with a ``T``
    and a ``Z`` (with or without a fraction of a second), as the generator and the serving
    log write it.

    One ``TRY_CAST`` of the text with the ``T`` made a space and the ``Z`` cut off: Flink's
    default timestamp parser, several times cheaper than pattern-based ``TO_TIMESTAMP`` (which
    also needed a second pattern for times without millis).
    """
    return (
        "CASE WHEN SUBSTRING(event_time FROM 11 FOR 1) = 'T' AND event_time LIKE '%Z' THEN "
        "TRY_CAST(OVERLAY(SUBSTRING(event_time FROM 1 FOR CHAR_LENGTH(event_time) - 1) "
        "PLACING ' ' FROM 11 FOR 1) AS TIMESTAMP(3)) END"
    )


_ONE_MS = "INTERVAL '0.001' SECOND(1, 3)"
_EPOCH = "TIMESTAMP '1970-01-01 00:00:00.000'"
# A row's event_time did not parse: its rowtime is the epoch's (parsed again only then, to
# tell a real event at the epoch from a bad time; AND evaluates its right side only if needed).
_BAD_TIME = f"rowtime = {_EPOCH} - {_ONE_MS} AND ({_event_time_expr()}) IS NULL"


def _with(options: dict[str, str]) -> str:
    return ",\n  ".join(f"{_quote(k)} = {_quote(v)}" for k, v in options.items())


def _source_options(
    source: Literal["file", "kafka"],
    stream_dir: str,
    monitor_interval_ms: int | None,
    kafka: dict[str, str] | None,
    group_suffix: str = "",
) -> dict[str, str]:
    if source == "file":
        options = {"connector": "filesystem", "path": stream_dir}
        if monitor_interval_ms is not None:
            options["source.monitor-interval"] = f"{monitor_interval_ms} ms"
        return options
    k = kafka or {}
    return {
        "connector": "kafka",
        "topic": k.get("topic", "events"),
        "properties.bootstrap.servers": k.get("bootstrap", "kafka:9092"),
        "properties.group.id": k.get("group", "recsys-stream") + group_suffix,
        "scan.startup.mode": k.get("startup", "group-offsets"),
        "properties.auto.offset.reset": "earliest",
    }


def source_ddl(
    source: Literal["file", "kafka"],
    *,
    stream_dir: str = "",
    monitor_interval_ms: int | None = 200,
    out_of_orderness: timedelta = timedelta(seconds=30),
    kafka: dict[str, str] | None = None,
) -> tuple[str, str]:
    """The two source tables over the same stream: parsed events and raw lines.

    Events are decoded by Flink's JSON format (fast; every field read as a string, so a
    wrong type is a reason, not a crash). A line that is not a JSON object at all is skipped
    by that format, so a second, raw reading of the same stream dead-letters those lines.

    Args:
        source: ``file`` (a directory of newline-JSON files) or ``kafka``.
        stream_dir: Directory read by the file source.
        monitor_interval_ms: How often the file source looks for new files; ``None`` reads
            the files present and ends (a bounded replay).
        out_of_orderness: Watermark delay behind the largest event time seen.
        kafka: ``bootstrap``, ``topic``, ``group`` and ``startup`` (a Flink startup mode).

    Returns:
        ``(events_ddl, lines_ddl)``: two ``CREATE TABLE`` statements.
    """
    # Parsed here only. An unparseable time gets the epoch (a rowtime cannot be NULL): such
    # rows are dead-lettered before any window (see _BAD_TIME).
    rowtime = f"COALESCE({_event_time_expr()}, {_EPOCH}) - {_ONE_MS}"
    columns = ",\n".join(f"  {name} STRING" for name in RAW_EVENT_SCHEMA.names)
    events = {**_source_options(source, stream_dir, monitor_interval_ms, kafka),
              "format": "json", "json.ignore-parse-errors": "true",
              "json.fail-on-missing-field": "false"}
    lines = {**_source_options(source, stream_dir, monitor_interval_ms, kafka, "-lines"),
             "format": "raw"}
    events_ddl = (
        f"CREATE TABLE {SOURCE_TABLE} (\n{columns},\n"
        f"  rowtime AS {rowtime},\n"
        "  arrival AS PROCTIME(),\n"
        f"  WATERMARK FOR rowtime AS rowtime - {_interval(out_of_orderness)}\n"
        f") WITH (\n  {_with(events)}\n)"
    )
    lines_ddl = f"CREATE TABLE {LINES_TABLE} (\n  line STRING\n) WITH (\n  {_with(lines)}\n)"
    return events_ddl, lines_ddl


def _line_expr(raw_numbers: bool = True) -> str:
    """The event as one JSON line again (for the side outputs; user_id as parsed).

    Args:
        raw_numbers: Write ``watch_time_ms`` and ``item_duration_ms`` as read (dead letters:
            they may not be integers); otherwise as the parsed integers (valid rows).
    """
    raw_names = {"watch_time_ms": "watch_raw", "item_duration_ms": "duration_raw"}
    return "JSON_OBJECT(" + ", ".join(
        f"KEY '{c}' VALUE {raw_names.get(c, c) if raw_numbers else c}"
        for c in RAW_EVENT_SCHEMA.names
    ) + " ABSENT ON NULL)"


def parsed_view_sql(from_date: date | None = None, pseudonym_key: str | None = None) -> str:
    """Types the event fields and names the first broken rule of each row (or NULL).

    The checks and their order follow :func:`recsys_core.contracts.validate_events`.

    Args:
        from_date: Keep only events on or after this date (a replay).
        pseudonym_key: When set, ``user_id`` is replaced by its pseudonym
            (:func:`recsys_core.privacy.pseudonym_sql`) before anything else sees it.
    """
    reasons = []
    for column in ("event_id", "user_id", "item_id", "event_type"):
        reasons.append((f"COALESCE({column}, '') = ''", REASON_MISSING.format(column=column)))
    reasons += [
        (_BAD_TIME, REASON_BAD_TIME),
        (f"event_type NOT IN ({_in(EVENT_TYPES)})", REASON_BAD_TYPE),
        ("(watch_raw IS NOT NULL AND watch_time_ms IS NULL) OR "
         "(duration_raw IS NOT NULL AND item_duration_ms IS NULL)", REASON_BAD_NUMBER),
        ("COALESCE(watch_time_ms, 0) < 0", REASON_NEGATIVE_WATCH),
        ("COALESCE(item_duration_ms, 0) < 0", REASON_NEGATIVE_DURATION),
    ]
    case = "\n    ".join(f"WHEN {cond} THEN {_quote(text)}" for cond, text in reasons)
    raw_names = {"watch_time_ms", "item_duration_ms", "user_id"}
    passthrough = ", ".join(n for n in RAW_EVENT_SCHEMA.names if n not in raw_names)
    user = "user_id" if pseudonym_key is None else pseudonym_sql("user_id", pseudonym_key)
    # rowtime = event time - 1 ms: event time >= midnight is rowtime >= midnight - 1 ms.
    since = "" if from_date is None else (
        f"\nWHERE ({_BAD_TIME}) OR rowtime >= TIMESTAMP '{from_date.isoformat()} 00:00:00' "
        f"- {_ONE_MS}"
    )
    return (
        f"CREATE TEMPORARY VIEW {PARSED_VIEW} AS\n"
        f"SELECT rowtime, arrival, {', '.join(RAW_EVENT_SCHEMA.names)},\n"
        "  watch_raw, duration_raw,\n"
        f"  CASE\n    {case}\n  END AS reason\n"
        "FROM (\n"
        f"  SELECT rowtime, arrival, {passthrough},\n"
        f"    {user} AS user_id,\n"
        "    watch_time_ms AS watch_raw, item_duration_ms AS duration_raw,\n"
        "    TRY_CAST(watch_time_ms AS BIGINT) AS watch_time_ms,\n"
        "    TRY_CAST(item_duration_ms AS BIGINT) AS item_duration_ms\n"
        f"  FROM {SOURCE_TABLE}\n"
        f"){since}"
    )


def unique_query() -> str:
    """Valid rows, the first arrival of each ``event_id`` only (processing-time
    deduplication: emitted at once, insert-only; its state expires after the dedupe window,
    ``table.exec.state.ttl``). Registered as a Table view (not SQL text) so that every branch
    shares one deduplication operator.

    Only the columns used after it cross the dedupe's hash exchange: the windows' and the
    late line's (:func:`late_insert` writes the parsed numbers, valid rows have no others).
    """
    columns = ", ".join(("rowtime", *RAW_EVENT_SCHEMA.names))
    return (
        f"SELECT {columns} FROM (\n"
        f"  SELECT {columns},\n"
        "    ROW_NUMBER() OVER (PARTITION BY event_id ORDER BY arrival ASC) AS arrival_rank\n"
        f"  FROM {PARSED_VIEW} WHERE reason IS NULL\n"
        ") WHERE arrival_rank = 1"
    )


def split_views_sql(allowed_lateness: timedelta = timedelta(0)) -> tuple[str, str, str]:
    """Unique valid rows split by arrival: on time, late within ``allowed_lateness``, later.

    Returns:
        ``(on_time, late_applied, late)`` view statements.
    """
    wm = "CURRENT_WATERMARK(rowtime)"
    seconds = int(allowed_lateness.total_seconds())
    bound = f"TIMESTAMPADD(SECOND, -{seconds}, {wm})" if seconds else wm
    on_time = (
        f"CREATE TEMPORARY VIEW {VALID_VIEW} AS\n"
        f"SELECT * FROM {UNIQUE_VIEW}\n"
        f"WHERE {wm} IS NULL OR rowtime > {wm}"
    )
    applied = (
        f"CREATE TEMPORARY VIEW {LATE_APPLIED_VIEW} AS\n"
        f"SELECT * FROM {UNIQUE_VIEW}\n"
        f"WHERE rowtime <= {wm} AND rowtime > {bound}"
    )
    late = (
        f"CREATE TEMPORARY VIEW {LATE_VIEW} AS\n"
        f"SELECT *, CAST({wm} AS STRING) AS watermark_at FROM {UNIQUE_VIEW}\n"
        f"WHERE rowtime <= {bound}"
    )
    return on_time, applied, late


def _slice_column(agg: Aggregate) -> str:
    return f"{agg.name}_slice"


def _contribution(agg: Aggregate) -> str:
    """One event's contribution to ``agg`` (0 for event types it does not count)."""
    value = "1" if agg.kind == "count" else f"COALESCE({agg.column}, 0)"
    return f"CASE WHEN event_type IN ({_in(agg.event_types)}) THEN {value} ELSE 0 END"


def _recent_member() -> str:
    """The event's entry in the recent-items list (NULL unless it is an engagement)."""
    return f"CASE WHEN event_type IN ({_in(ENGAGEMENT_TYPES)}) THEN {_member_expr()} END"


def _member_expr() -> str:
    return (f"CONCAT(event_time, '{RECENT_FIELD_SEP}', event_id, "
            f"'{RECENT_FIELD_SEP}', item_id)")


def slices_view(plan: WindowPlan) -> str:
    """The view name :func:`group_query` reads :func:`slice_query` from."""
    return f"{plan.group.name}_slices"


def slice_query(plan: WindowPlan) -> str:
    """First level: one row per (entity, slide) with each aggregate's partial value.

    A ``TUMBLE`` of one slide whose aggregates do not read the window bounds: Flink
    aggregates it per slice, one window per event (a ``HOP`` whose aggregates read
    ``window_end`` would copy every event into size/slide windows first).
    """
    columns = [f"CAST(SUM({_contribution(agg)}) AS BIGINT) AS {_slice_column(agg)}"
               for agg in plan.group.aggregates]
    columns.append(f"COUNT(*) AS {EVENTS_COLUMN}")
    if plan.recent_items:
        columns.append(f"LISTAGG({_recent_member()}, '{RECENT_SEP}') AS {RECENT_COLUMN}")
    body = ",\n  ".join(columns)
    return (
        f"SELECT {plan.key}, window_time AS slice_time,\n  {body}\n"
        f"FROM TABLE(TUMBLE(TABLE {VALID_VIEW}, DESCRIPTOR(rowtime), "
        f"{_interval(plan.slide)}))\n"
        f"GROUP BY {plan.key}, window_start, window_end, window_time"
    )


def group_query(plan: WindowPlan) -> str:
    """One row per (entity, window_end) with the group's aggregates (ratios are computed in
    the sink with :func:`recsys_core.features.ratio`).

    Cascaded: a ``HOP`` over the per-slide rows of :func:`slice_query` (registered as
    :func:`slices_view`). A slide ending at
    ``S`` has ``slice_time = S - 1 ms``; it is in the window ending at ``E`` for
    ``E - size < S <= E``, and in an aggregate of window ``w`` for ``S > E - w``, i.e.
    ``slice_time >= E - w``.
    """
    def last(span: timedelta) -> str:
        return f"slice_time >= window_end - {_interval(span)}"

    columns = []
    for agg in plan.group.aggregates:
        part = _slice_column(agg)
        value = part if agg.window == plan.size else (
            f"CASE WHEN {last(agg.window)} THEN {part} ELSE 0 END")
        columns.append(f"CAST(SUM({value}) AS BIGINT) AS {agg.name}")
    columns.append(f"CAST(SUM(CASE WHEN {last(plan.slide)} THEN {EVENTS_COLUMN} ELSE 0 END) "
                   f"AS BIGINT) AS {EVENTS_COLUMN}")
    if plan.recent_items:
        columns.append(f"LISTAGG(CASE WHEN {last(plan.slide)} THEN {RECENT_COLUMN} END, "
                       f"'{RECENT_SEP}') AS {RECENT_COLUMN}")
    columns.append(f"CAST(NULL AS STRING) AS {LATE_EVENT_COLUMN}")
    body = ",\n  ".join(columns)
    return (
        f"SELECT {plan.key}, window_end,\n  {body}\n"
        f"FROM TABLE(HOP(TABLE {slices_view(plan)}, DESCRIPTOR(slice_time), "
        f"{_interval(plan.slide)}, {_interval(plan.size)}))\n"
        f"GROUP BY {plan.key}, window_start, window_end"
    )


def late_rows_query(plan: WindowPlan) -> str:
    """One row per late event within the allowed lateness, in the columns of
    :func:`group_query`: ``window_end`` is the event time and each aggregate holds the
    event's own contribution (the sink adds it to every window end that covers it)."""
    columns = [f"CAST({_contribution(agg)} AS BIGINT) AS {agg.name}"
               for agg in plan.group.aggregates]
    columns.append(f"CAST(1 AS BIGINT) AS {EVENTS_COLUMN}")
    if plan.recent_items:
        columns.append(f"{_recent_member()} AS {RECENT_COLUMN}")
    columns.append(f"event_id AS {LATE_EVENT_COLUMN}")
    body = ",\n  ".join(columns)
    return (
        f"SELECT {plan.key},\n"
        "  CAST(rowtime + INTERVAL '0.001' SECOND(1, 3) AS TIMESTAMP(3)) AS window_end,\n"
        f"  {body}\nFROM {LATE_APPLIED_VIEW}"
    )


def sink_rows_query(plan: WindowPlan) -> str:
    """What one group's sink sees: its window rows and its late-but-allowed event rows."""
    return f"{group_query(plan)}\nUNION ALL\n{late_rows_query(plan)}"


def side_output_ddl(table: str, path: str, rollover_ms: int) -> str:
    """A newline-JSON file sink; part files become visible when a checkpoint completes."""
    extra = "watermark_at STRING,\n  reason STRING" if table == LATE_TABLE else "reason STRING"
    return (
        f"CREATE TABLE {table} (\n  line STRING,\n  {extra}\n) WITH (\n"
        f"  'connector' = 'filesystem',\n  'path' = {_quote(path)},\n  'format' = 'json',\n"
        f"  'sink.rolling-policy.rollover-interval' = '{rollover_ms} ms',\n"
        f"  'sink.rolling-policy.check-interval' = '{max(100, rollover_ms // 2)} ms'\n)"
    )


def deadletter_insert() -> str:
    """Rows that break a rule, and lines that are not a JSON object at all."""
    return (
        f"INSERT INTO {DEADLETTER_TABLE}\n"
        f"SELECT {_line_expr()}, reason FROM {PARSED_VIEW} WHERE reason IS NOT NULL\n"
        "UNION ALL\n"
        f"SELECT line, {_quote(REASON_NOT_JSON)} FROM {LINES_TABLE}\n"
        "WHERE TRIM(line) <> '' AND TRIM(line) NOT LIKE '{%}'"
    )


def late_insert(allowed_lateness: timedelta = timedelta(0)) -> str:
    """Rows later than the allowed lateness, each with the watermark it missed and why."""
    reason = REASON_TOO_LATE.format(lateness_s=int(allowed_lateness.total_seconds()))
    return (f"INSERT INTO {LATE_TABLE}\n"
            f"SELECT {_line_expr(raw_numbers=False)}, watermark_at, {_quote(reason)} "
            f"FROM {LATE_VIEW}")
