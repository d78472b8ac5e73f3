"""The Flink edge of the sink: a vectorized (pandas) UDF that hands batches to FeatureWriter.

Flink calls it with Arrow batches of window rows (flushed by size or by
``python.fn-execution.bundle.time``) and flushes every pending batch before a checkpoint
barrier passes, so everything before a completed checkpoint is in Redis.
"""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd
from pyflink.table import DataTypes
from pyflink.table.udf import FunctionContext, ScalarFunction, UserDefinedScalarFunctionWrapper, udf

from recsys_pipelines.stream.sink import FeatureWriter, SinkConfig
from recsys_pipelines.stream.sql import (
    EVENTS_COLUMN,
    LATE_EVENT_COLUMN,
    RECENT_COLUMN,
    WindowPlan,
)

logger = logging.getLogger(__name__)


def sink_columns(plan: WindowPlan) -> list[str]:
    """The columns the UDF is called with, in order (matches :func:`sql.sink_rows_query`)."""
    columns = [plan.key, "window_end", *plan.aggregate_names, EVENTS_COLUMN]
    if plan.recent_items:
        columns.append(RECENT_COLUMN)
    columns.append(LATE_EVENT_COLUMN)
    return columns


class RedisSinkFunction(ScalarFunction):  # type: ignore[misc]
    """Writes each batch of sink rows (window rows and late events); returns 1 per row."""

    def __init__(self, config: SinkConfig, plan: WindowPlan) -> None:
        self.config = config
        self.plan = plan
        self.columns = sink_columns(plan)
        self.writer: FeatureWriter | None = None

    def open(self, function_context: FunctionContext) -> None:
        self.writer = FeatureWriter(self.config, self.plan)
        group = function_context.get_metric_group().add_group("recsys").add_group(
            self.plan.group.name)
        self.rows_written = group.counter("rows_written")
        self.rows_stale = group.counter("rows_stale")
        self.late_applied = group.counter("late_applied")

    def eval(self, *columns: pd.Series) -> pd.Series:
        assert self.writer is not None, "open() was not called"
        frame = pd.DataFrame(dict(zip(self.columns, columns, strict=True)))
        result = self.writer.write(frame)
        self.rows_written.inc(result.written)
        self.rows_stale.inc(result.stale)
        self.late_applied.inc(result.late)
        return pd.Series([1] * result.rows, dtype="int64")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def is_deterministic(self) -> bool:
        return False  # it has a side effect: never fold or reorder it


def redis_sink_udf(config: SinkConfig, plan: WindowPlan) -> UserDefinedScalarFunctionWrapper:
    """The registered pandas UDF of one group's sink."""
    fn: Any = udf(RedisSinkFunction(config, plan), result_type=DataTypes.BIGINT(),
                  func_type="pandas")
    return fn  # type: ignore[no-any-return]
