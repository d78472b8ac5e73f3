"""The stream job parses event_time once, in the source: both accepted spellings give the
same instant as the batch parser, anything else is a bad time (evaluated by Flink)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from recsys_core.contracts import REASON_BAD_TIME
from recsys_pipelines.stream import sql
from recsys_pipelines.stream.job import JobOptions, create_table_env
from recsys_pipelines.stream.sink import SinkConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GOOD = {
    "millis": "2026-11-01T10:00:00.123Z",
    "seconds": "2026-11-01T10:00:00Z",
    "epoch": "1970-01-01T00:00:00.000Z",  # the rowtime of a bad time: still a valid event
}
BAD = {
    "words": "yesterday-ish",
    "no_zone": "2026-11-01T10:00:00.123",
    "space": "2026-11-01 10:00:00Z",
    "date_only": "2026-11-01Z",
    "hour_25": "2026-11-01T25:00:00Z",
    "empty": "",
}


def _event(event_id: str, event_time: str) -> dict[str, Any]:
    return {"event_id": event_id, "event_time": event_time, "user_id": "u1", "item_id": "i1",
            "event_type": "click", "watch_time_ms": None, "item_duration_ms": None}


def test_event_time_spellings_parse_like_batch_and_bad_times_get_the_reason(
        flink_jvm: Any, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    lines = [json.dumps(_event(k, v)) for k, v in {**GOOD, **BAD}.items()]
    (folder / "events.jsonl").write_text("\n".join(lines) + "\n")
    options = JobOptions(sink=SinkConfig("redis://unused", "p", "p"),
                         checkpoint_dir=str(tmp_path / "chk"))
    t_env = create_table_env(options)
    for ddl in sql.source_ddl("file", stream_dir=str(folder), monitor_interval_ms=None):
        t_env.execute_sql(ddl)
    t_env.execute_sql(sql.parsed_view_sql())
    table = t_env.execute_sql(f"SELECT event_id, rowtime, reason FROM {sql.PARSED_VIEW}")
    with table.collect() as rows:
        got = {row[0]: (row[1], row[2]) for row in rows}

    assert set(got) == set(GOOD) | set(BAD)
    for name, text in GOOD.items():
        rowtime, reason = got[name]
        want = pd.Timestamp(text).tz_convert(None).to_pydatetime() - timedelta(milliseconds=1)
        assert (rowtime, reason) == (want, None), name
        assert isinstance(rowtime, datetime)
    assert {name: got[name][1] for name in BAD} == dict.fromkeys(BAD, REASON_BAD_TIME)
