"""Out-of-order files: rows behind the watermark go to the late files, none silently lost."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from recsys_pipelines.feature_store import apply_definitions
from recsys_pipelines.generator import write_jsonl
from recsys_pipelines.stream.job import start
from recsys_platform.contracts import validate_events
from tests.fixtures.flink import StreamEnv
from tests.integration.stream import helpers as h

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_out_of_order_file_lands_in_the_late_files_row_for_row(
        flink_jvm: Any, stream_env: StreamEnv, tmp_path_factory: pytest.TempPathFactory) -> None:
    raw, _ = h.burst()
    older, newer = h.parts_of(raw, 2)
    root = tmp_path_factory.mktemp("out_of_order")
    settings = h.settings_for(stream_env, root, project=f"{stream_env.project}_ooo")
    apply_definitions(settings)
    options = h.job_options(settings)
    stream_dir = Path(options.stream_dir)
    stream_dir.mkdir(parents=True, exist_ok=True)
    result = start(options)
    try:
        h.wait_running(Path(options.checkpoint_dir))
        write_jsonl(newer, stream_dir / "events-0001.jsonl")  # the newer file lands first
        h.wait_consumed(settings.redis.url, options.sink.metrics_key, newer)
        write_jsonl(older, stream_dir / "events-0000.jsonl")
        valid_older, _ = validate_events(older)
        want = set(valid_older["event_id"])
        late_dir = Path(options.late_dir)
        h.wait_until(lambda: len(h.side_output_lines(late_dir)) >= len(want), 60,
                     "the late rows to be committed")
    finally:
        job = result.get_job_client()
        if job is not None:
            job.cancel().result()
    late = [json.loads(line["line"])["event_id"] for line in h.side_output_lines(late_dir)]
    assert len(late) == len(set(late)) == len(want)
    assert set(late) == want  # every on-time-invalid row of the older file, and only those
