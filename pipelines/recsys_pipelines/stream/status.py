"""What the stream job has done: checkpoints, counters in Redis, dead-letter and late lines.

Counters in Redis (``<prefix>:stream:metrics``) are at-least-once (a replay after a restart
counts its rows again); the dead-letter and late files are exactly-once (their part files are
committed with checkpoints).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from recsys_pipelines.stream.checkpoints import completed_checkpoints
from recsys_pipelines.stream.job import JobOptions


@dataclass
class StreamStatus:
    """A snapshot of the job's progress."""

    checkpoints: int
    latest_checkpoint: str | None
    metrics: dict[str, int] = field(default_factory=dict)
    dead_letters: int = 0
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)
    late: int = 0


def committed_lines(folder: Path) -> list[dict[str, Any]]:
    """The JSON lines of a side-output folder's committed part files (hidden ones skipped)."""
    if not folder.is_dir():
        return []
    lines: list[dict[str, Any]] = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.name.startswith((".", "_")):
            lines += [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return lines


def read_metrics(client: redis.Redis, metrics_key: str) -> dict[str, int]:
    raw: dict[bytes, bytes] = client.hgetall(metrics_key)  # type: ignore[assignment]
    return {k.decode(): int(v) for k, v in sorted(raw.items())}


def stream_status(options: JobOptions, client: redis.Redis | None = None) -> StreamStatus:
    """Collects checkpoints, counters and side-output counts of a job's options."""
    own = client or redis.Redis.from_url(options.sink.redis_url)
    try:
        metrics = read_metrics(own, options.sink.metrics_key)
    finally:
        if client is None:
            own.close()
    found = completed_checkpoints(Path(options.checkpoint_dir))
    dead = committed_lines(Path(options.deadletter_dir))
    reasons: dict[str, int] = {}
    for line in dead:
        reasons[line["reason"]] = reasons.get(line["reason"], 0) + 1
    return StreamStatus(
        checkpoints=len(found),
        latest_checkpoint=str(found[-1]) if found else None,
        metrics=metrics,
        dead_letters=len(dead),
        dead_letter_reasons=reasons,
        late=len(committed_lines(Path(options.late_dir))),
    )


def wait_for_window(client: redis.Redis, metrics_key: str, view: str, window_end_ms: int,
                    timeout_s: float = 60.0) -> bool:
    """Waits until the job wrote ``view`` windows up to ``window_end_ms``; False on timeout.

    A producer appending files calls this before the next file: Flink's file source reads
    files that are pending together in no fixed order (late rows then go to the late file).
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = client.hget(metrics_key, f"{view}:last_window_end_ms")
        if value is not None and int(value) >= window_end_ms:  # type: ignore[arg-type]
            return True
        time.sleep(0.1)
    return False
