"""Out-of-order files: late rows within the allowed lateness are applied, later ones go to the
late files with a reason; none is lost silently."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from recsys_core.contracts import validate_events
from recsys_core.features import ITEM_TRENDING, USER_STREAM
from recsys_pipelines.feature_store import apply_definitions
from recsys_pipelines.generator import write_jsonl
from recsys_pipelines.stream.job import start
from recsys_pipelines.stream.sql import REASON_TOO_LATE
from tests.fixtures.flink import StreamEnv
from tests.integration.stream import helpers as h
from tests.integration.stream import reference

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OUT_OF_ORDERNESS_S = 30
LATENESS_S = 75 * 60  # about a quarter of the older file (1 h of event time) is within it


def test_out_of_order_file_is_applied_within_lateness_and_late_beyond(
        flink_jvm: Any, stream_env: StreamEnv, tmp_path_factory: pytest.TempPathFactory) -> None:
    raw, _ = h.burst()
    older, newer = h.parts_of(raw, 2)
    root = tmp_path_factory.mktemp("out_of_order")
    settings = h.settings_for(stream_env, root, project=f"{stream_env.project}_ooo")
    store = apply_definitions(settings)
    options = h.job_options(settings, allowed_lateness_s=LATENESS_S)
    stream_dir = Path(options.stream_dir)
    stream_dir.mkdir(parents=True, exist_ok=True)

    # The watermark once the newer file is read: its largest rowtime (event time - 1 ms)
    # minus the out-of-orderness. Older rows at or behind watermark - lateness are too late.
    watermark = h.max_event_ms(newer) - 1 - OUT_OF_ORDERNESS_S * 1000
    valid_older = reference.clean_events(validate_events(older)[0])
    too_late = valid_older["ms"] - 1 <= watermark - LATENESS_S * 1000
    want_late, want_applied = (set(valid_older.loc[too_late, "event_id"]),
                               set(valid_older.loc[~too_late, "event_id"]))
    assert want_late and want_applied  # the test covers both sides of the bound

    result = start(options)
    try:
        h.wait_running(Path(options.checkpoint_dir))
        write_jsonl(newer, stream_dir / "events-0001.jsonl")  # the newer file lands first
        h.wait_consumed(settings.redis.url, options.sink.metrics_key, newer)
        write_jsonl(older, stream_dir / "events-0000.jsonl")
        late_dir, url, metrics = Path(options.late_dir), settings.redis.url, \
            options.sink.metrics_key
        h.wait_until(lambda: len(h.side_output_lines(late_dir)) >= len(want_late), 60,
                     "the late rows to be committed")
        h.wait_until(lambda: all(h.metric(url, metrics, f"{g.name}:late_applied")
                                 >= len(want_applied) for g in (USER_STREAM, ITEM_TRENDING)),
                     60, "the late rows within the allowed lateness to be applied")
    finally:
        job = result.get_job_client()
        if job is not None:
            job.cancel().result()
    lines = h.side_output_lines(late_dir)
    late = [json.loads(line["line"])["event_id"] for line in lines]
    assert len(late) == len(set(late)) == len(want_late)
    assert set(late) == want_late  # every too-late row of the older file, and only those
    assert {line["reason"] for line in lines} == {
        REASON_TOO_LATE.format(lateness_s=LATENESS_S)}
    for group in (USER_STREAM, ITEM_TRENDING):  # the others were applied, each once
        assert h.metric(url, metrics, f"{group.name}:late_applied") == len(want_applied)

    # Entities with a window from the newer file hold the reference values over the newer
    # events plus the applied older ones.
    applied = older[older["event_id"].isin(want_applied)]
    expected = h.expected_state(pd.concat([newer, applied]), watermark + 1)  # fired ends
    valid_newer = validate_events(newer)[0]
    for view, rows in expected.items():
        key = "user_id" if view == USER_STREAM.name else "item_id"
        mine = {e: v for e, v in rows.items() if e in set(valid_newer[key])}
        assert h.online_state(store, view, sorted(mine)) == mine
