"""Impressions are durable before the response leaves: kill -9 of the logging process loses none.

Before: the impression log buffered responses in memory for up to 5 s; kill -9 of a replica
lost the impressions of its last ~0.8 s (20 responses served, never logged).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq

from recsys_platform.serving.impressions import ImpressionLogger

# A stand-in for a replica's hot path: log the response, then "send" it (print its id).
SERVER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from recsys_platform.serving.impressions import ImpressionLogger

    root = Path(sys.argv[1])
    log = ImpressionLogger(root / "landing", flush_every=50, wal_dir=root / "wal")
    log.start(interval_s=0.2)
    n = 0
    while True:
        request_id = f"r{n}"
        log.log(request_id, "u1", [("i1", 0.5, "retrieval"), ("i2", float("nan"), "popular")],
                "3", "feed", "ios")
        sys.stdout.write(request_id + "\\n")
        sys.stdout.flush()
        n += 1
""")


def _logged(landing: Path) -> list[str]:
    ids: list[str] = []
    for path in sorted((landing / "served").rglob("served-*.parquet")):
        table = pq.read_table(path, columns=["request_id", "position"])
        ids += [r for r, p in zip(table.column(0).to_pylist(), table.column(1).to_pylist(),
                                  strict=True) if p == 0]
    return ids


def test_kill_9_under_load_loses_no_served_response(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    served: list[str] = []
    deadline = time.monotonic() + 60
    while len(served) < 3_000 and time.monotonic() < deadline:
        served.append(proc.stdout.readline().strip())
    os.kill(proc.pid, signal.SIGKILL)  # mid-stream, with responses buffered
    rest = proc.stdout.read().split()  # whatever was already sent before the kill
    proc.wait()
    served += rest
    landing = tmp_path / "landing"
    before = set(_logged(landing))
    assert set(served) - before, "the kill should leave unflushed responses"
    assert list((tmp_path / "wal").glob("wal-*.jsonl"))

    restarted = ImpressionLogger(landing, wal_dir=tmp_path / "wal")
    restarted.start(interval_s=60)  # recovers what the dead process left
    restarted.stop()
    logged = _logged(landing)
    assert len(logged) == len(set(logged))  # nothing written twice
    assert set(served) <= set(logged)
    assert len(set(logged) - set(served)) <= 1  # logged, killed before it was sent
    assert not list((tmp_path / "wal").glob("wal-*.jsonl"))


def test_a_live_loggers_segments_are_left_alone(tmp_path: Path) -> None:
    live = ImpressionLogger(tmp_path / "landing", wal_dir=tmp_path / "wal", flush_every=10_000)
    live.log("r1", "u1", [("i1", 0.5, "retrieval")], "3", "feed", "ios")
    other = ImpressionLogger(tmp_path / "landing", wal_dir=tmp_path / "wal")
    assert other.recover() == 0  # r1 is the live logger's, still buffered there
    assert live.flush() == 1 and _logged(tmp_path / "landing") == ["r1"]
    assert not list((tmp_path / "wal").glob("wal-*.jsonl"))


def test_a_failed_flush_keeps_the_segment(tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where a folder should be")
    log = ImpressionLogger(blocked, wal_dir=tmp_path / "wal", flush_every=10_000)
    log.log("r1", "u1", [("i1", 0.5, "retrieval")], "3", "feed", "ios")
    try:
        log.flush()
    except OSError:
        pass
    else:
        raise AssertionError("the flush should have failed")
    assert len(list((tmp_path / "wal").glob("wal-*.jsonl"))) == 1
    log.log("r2", "u1", [("i1", 0.5, "retrieval")], "3", "feed", "ios")
    log._landing = tmp_path / "landing"  # the disk is writable again
    assert log.flush() == 2
    assert sorted(_logged(tmp_path / "landing")) == ["r1", "r2"]
    assert not list((tmp_path / "wal").glob("wal-*.jsonl"))


def test_an_unwritable_wal_never_fails_the_response(tmp_path: Path) -> None:
    blocked = tmp_path / "wal"
    blocked.write_text("a file where the WAL folder should be")
    log = ImpressionLogger(tmp_path / "landing", wal_dir=blocked, flush_every=10_000)
    log.log("r1", "u1", [("i1", 0.5, "retrieval")], "3", "feed", "ios")
    assert log.wal_errors == 1 and log.flush() == 1
