"""The stream job on a real Flink mini cluster and the real Redis, read back through Feast."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import psutil
import pytest

from recsys_core.features import ITEM_TRENDING, USER_STREAM
from recsys_pipelines.feature_store import apply_definitions
from recsys_pipelines.generator import write_jsonl
from recsys_pipelines.stream.checkpoints import latest_checkpoint
from recsys_pipelines.stream.job import start
from recsys_pipelines.stream.sql import REASON_NOT_JSON
from tests.fixtures.flink import StreamEnv
from tests.integration.stream import helpers as h

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OUT_OF_ORDERNESS_MS = 30_000


@pytest.fixture(scope="module")
def burst() -> tuple[pd.DataFrame, dict[str, int]]:
    return h.burst()


@pytest.fixture(scope="module")
def continuous_run(flink_jvm: Any, stream_env: StreamEnv, burst: tuple[pd.DataFrame, dict],
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Runs the job in continuous mode on a burst appended as four files (with duplicated
    and replayed lines), until the online store holds every window the watermark closed;
    then cancels it."""
    raw, _ = burst
    root = tmp_path_factory.mktemp("continuous")
    settings = h.settings_for(stream_env, root)
    store = apply_definitions(settings)
    options = h.job_options(settings)
    stream_dir = Path(options.stream_dir)
    stream_dir.mkdir(parents=True, exist_ok=True)
    result = start(options)
    try:
        h.wait_running(Path(options.checkpoint_dir))
        h.write_files_paced(raw, stream_dir, 4, settings.redis.url, options.sink.metrics_key,
                            duplicates=True)
        h.append_line(stream_dir, "garbage.jsonl", h.NOT_JSON)
        expected = h.expected_state(raw, h.max_event_ms(raw) - OUT_OF_ORDERNESS_MS)

        def caught_up() -> bool:
            return all(
                h.online_state(store, view, sorted(rows)) == rows
                for view, rows in expected.items())

        h.wait_until(caught_up, 60, "the online store to hold every closed window")
        h.wait_until(lambda: len(h.side_output_lines(Path(options.deadletter_dir))) > 0, 30,
                     "the dead-letter file to be committed")
        yield {"store": store, "expected": expected, "options": options, "raw": raw}
    finally:
        job = result.get_job_client()
        if job is not None:
            job.cancel().result()


def test_online_store_holds_windowed_values_read_through_feast(
        continuous_run: dict[str, Any]) -> None:
    store, expected = continuous_run["store"], continuous_run["expected"]
    users = expected[USER_STREAM.name]
    assert len(users) >= 10 and any(v["user_clicks_10m"] > 0 for v in users.values())
    assert any(v["user_recent_items"] for v in users.values())
    for view, rows in expected.items():
        assert h.online_state(store, view, sorted(rows)) == rows


def test_stream_matches_batch_semantics_on_the_same_events(
        continuous_run: dict[str, Any]) -> None:
    # The expected state is the pandas reference of recsys_core.features (t-w, t] and
    # ratio(); compare every feature of every entity, window end included.
    store, expected = continuous_run["store"], continuous_run["expected"]
    for view in (USER_STREAM.name, ITEM_TRENDING.name):
        got = pd.DataFrame.from_dict(h.online_state(store, view, sorted(expected[view])),
                                     orient="index").sort_index()
        want = pd.DataFrame.from_dict(expected[view], orient="index").sort_index()
        pd.testing.assert_frame_equal(got[want.columns], want, check_dtype=False)


def test_malformed_lines_land_in_the_dead_letter_file_with_reasons(
        continuous_run: dict[str, Any], burst: tuple[pd.DataFrame, dict[str, int]]) -> None:
    _, malformed = burst
    want = Counter({**{k: v for k, v in malformed.items() if v}, REASON_NOT_JSON: 1})
    folder = Path(continuous_run["options"].deadletter_dir)
    # Part files become visible as checkpoints complete: wait for as many lines as sent.
    h.wait_until(lambda: len(h.side_output_lines(folder)) >= want.total(), 30,
                 "every dead letter to be committed")
    lines = h.side_output_lines(folder)
    assert Counter(line["reason"] for line in lines) == want
    assert all(line["line"] for line in lines)
    # The replayed lines of each previous file were dropped as duplicates, not sent late.
    assert h.side_output_lines(Path(continuous_run["options"].late_dir)) == []


def test_duplicated_and_replayed_lines_are_counted_once(
        continuous_run: dict[str, Any]) -> None:
    # Every file after the first repeated its own valid lines and the previous file's: the
    # online store still equals the reference on the unique events (no double count), and
    # no late event was applied (the replayed lines were dropped before the late split).
    store, expected = continuous_run["store"], continuous_run["expected"]
    for view, rows in expected.items():
        assert h.online_state(store, view, sorted(rows)) == rows
    options = continuous_run["options"]
    for view in expected:
        assert h.metric(options.sink.redis_url, options.sink.metrics_key,
                        f"{view}:late_applied") == 0


def _job_process(config: Path, *extra: str) -> subprocess.Popen[bytes]:
    """The job as its own process with its own JVM (no PyFlink gateway variables of ours)."""
    env = {k: v for k, v in os.environ.items() if "PYFLINK" not in k}
    log = (config.parent / f"job{len(list(config.parent.glob('job*.log')))}.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "recsys_pipelines.stream.job", "--config", str(config), *extra],
        stdout=log, stderr=subprocess.STDOUT, env=env)


def _sigkill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the job process and its JVM child (by pid), as a crash would."""
    children = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, signal.SIGKILL)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            os.kill(child.pid, signal.SIGKILL)
    proc.wait(30)


def test_restart_after_sigkill_gives_the_values_of_an_uninterrupted_run(
        continuous_run: dict[str, Any], stream_env: StreamEnv,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    raw, expected = continuous_run["raw"], continuous_run["expected"]
    root = tmp_path_factory.mktemp("restart")
    settings = h.settings_for(stream_env, root, project=f"{stream_env.project}_restart")
    store = apply_definitions(settings)
    options = h.job_options(settings)
    config, checkpoints = root / "settings.yaml", Path(options.checkpoint_dir)
    stream_dir, url, metrics = Path(options.stream_dir), settings.redis.url, \
        options.sink.metrics_key
    stream_dir.mkdir(parents=True, exist_ok=True)
    parts = h.parts_of(raw, 4)

    first = _job_process(config)
    try:
        h.wait_running(checkpoints, timeout_s=240)
        for i in (0, 1):
            write_jsonl(parts[i], stream_dir / f"events-{i:04d}.jsonl")
            h.wait_consumed(url, metrics, parts[i])
        h.wait_running(checkpoints)  # one more checkpoint after part 1 was consumed
        write_jsonl(parts[2], stream_dir / "events-0002.jsonl")
        time.sleep(0.3)  # mid-stream: part 2 is being read
    finally:
        _sigkill(first)
    killed_at = latest_checkpoint(checkpoints)

    second = _job_process(config, "--restore", "latest")
    try:
        h.wait_running(checkpoints, timeout_s=240)
        h.wait_consumed(url, metrics, parts[2])
        write_jsonl(parts[3], stream_dir / "events-0003.jsonl")

        def caught_up() -> bool:
            return all(h.online_state(store, view, sorted(rows)) == rows
                       for view, rows in expected.items())

        h.wait_until(caught_up, 90, "the restarted job to catch up")
    finally:
        second.terminate()
        second.wait(30)
    assert killed_at.name.startswith("chk-")
    uninterrupted = continuous_run["store"]
    for view, rows in expected.items():
        ids = sorted(rows)
        assert h.online_state(store, view, ids) == h.online_state(uninterrupted, view, ids)
