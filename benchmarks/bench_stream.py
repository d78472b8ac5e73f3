"""Stream features: sustained events/s into Redis and event-to-Redis freshness p50/p99.

Usage::

    flock /tmp/heavy.lock .venv/bin/python benchmarks/bench_stream.py [--events 1000000] \
        [--files 1] [--parallelism 1] [--seconds 30]

Writes to Redis DB 2 under a throw-away prefix/project and deletes it at the end.

1. Floors, measured in this run: redis-py alone writing Feast-layout rows (one pipeline per
   5,000 rows), and the job's SQL alone (decode, validation, dedupe, late split, HOP windows)
   into a blackhole on the same events: the job can be no faster than that.
2. Throughput: a bounded replay of ``--events`` generated events (squeezed into one hour of
   event time, a realistic density; ``--files`` files, as a stream lands) through the whole
   job: JSON decode, validation, dedupe, windows, the Python sink and Redis. The JVM is warm
   (a tiny job runs first). Three rates, each also as a ratio to the SQL-only floor's:

   - wall: events / the time from submitting the job to its end (includes job start-up);
   - net: events / Flink's net runtime of the job (deployment to end, no client planning);
   - sustained (the job only): events / wall time between the first and the last window
     written to Redis while input was still being read. A window ending at ``E`` fires once
     an event past ``E + out_of_orderness`` was read, so the events counted are those with
     times between the two windows' ``E + out_of_orderness``. Windows fired by the end of
     the input (past the last event) are left out.
3. Freshness: the job runs continuously while a producer appends a file every 200 ms whose
   event times advance 60 s per file (a compressed clock; out-of-orderness 0). A window
   ending at W can be written once a file with an event past W landed; freshness is the
   time from that file's rename to the window's first write in Redis (the sink records it).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import redis

from recsys_core import online_layout
from recsys_core.contracts import split_duplicates
from recsys_core.features import ITEM_TRENDING
from recsys_pipelines.generator import GeneratorConfig, generate, write_jsonl
from recsys_pipelines.stream.job import JobOptions, start
from recsys_pipelines.stream.sink import SinkConfig

logger = logging.getLogger(__name__)
URL = "redis://127.0.0.1:6379/2"


def events_in_span(n: int, span: timedelta, seed: int = 3) -> pd.DataFrame:
    data = generate(GeneratorConfig(events=n, days=1, users=max(100, n // 100),
                                    items=max(200, n // 40), seed=seed))
    raw, _ = split_duplicates(data.events)
    t = pd.to_datetime(raw["event_time"], utc=True, format="ISO8601")
    t = t.min() + (t - t.min()) * (span / timedelta(days=1))
    raw["event_time"] = t.dt.strftime("%Y-%m-%dT%H:%M:%S.%f").str[:-3] + "Z"
    return raw.sort_values("event_time").reset_index(drop=True)


def floor_rows_per_s(client: redis.Redis, prefix: str, rows: int) -> float:
    mapping = online_layout.row_mapping("bench", ["a", "b", "c"], [1, 2, 0.5], 1_700_000_000_000)
    began = time.perf_counter()
    for start_row in range(0, rows, 5000):
        with client.pipeline(transaction=False) as pipe:
            for i in range(start_row, min(rows, start_row + 5000)):
                pipe.hset(f"{prefix}:floor:{i}", mapping=mapping)  # type: ignore[arg-type]
            pipe.execute()
    return rows / (time.perf_counter() - began)


def options(root: Path, tag: str, **overrides: object) -> JobOptions:
    base = JobOptions(sink=SinkConfig(URL, tag, tag), stream_dir=str(root / "in"),
                      checkpoint_dir=str(root / "chk"), deadletter_dir=str(root / "dl"),
                      late_dir=str(root / "late"), checkpoint_interval_ms=5000,
                      monitor_interval_ms=50)
    return replace(base, **overrides)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Run:
    """One bounded replay: wall and net seconds, rows written, sustained events/s."""

    events: int
    wall_s: float
    net_s: float
    rows: int = 0
    sustained: float = float("nan")  # events/s between the first and last window written

    @property
    def wall_rate(self) -> float:
        return self.events / self.wall_s

    @property
    def net_rate(self) -> float:
        return self.events / self.net_s


def sustained_rate(written: dict[int, int], event_ms: np.ndarray,
                   out_of_orderness_ms: int) -> float:
    """Events/s between the first and the last window written while input was read.

    Args:
        written: Window end (epoch ms) -> wall time of its first write (epoch ms).
        event_ms: Event times of the replay (epoch ms).
        out_of_orderness_ms: The job's watermark delay.

    Returns:
        The rate, or NaN when fewer than two such windows were written.
    """
    last_event = int(event_ms.max())
    # Closed by input (not by the end of it): an event past end + out_of_orderness was read.
    ends = sorted(e for e in written if e + out_of_orderness_ms < last_event)
    if len(ends) < 2 or written[ends[-1]] <= written[ends[0]]:
        return float("nan")
    lo, hi = ends[0] + out_of_orderness_ms, ends[-1] + out_of_orderness_ms
    events = int(((event_ms > lo) & (event_ms <= hi)).sum())
    return events / ((written[ends[-1]] - written[ends[0]]) / 1000)


def throughput(root: Path, tag: str, raw: pd.DataFrame, files: int, parallelism: int,
               write_redis: bool = True) -> Run:
    for i, chunk in enumerate(np.array_split(np.arange(len(raw)), files)):
        write_jsonl(raw.iloc[chunk], root / "in" / f"events-{i}.jsonl")
    opts = options(root, tag, bounded=True, write_redis=write_redis, parallelism=parallelism)
    began = time.perf_counter()
    result = start(opts)
    job = result.get_job_client()
    assert job is not None, "a submitted job has a client"
    net_s = job.get_job_execution_result().result().get_net_runtime() / 1000
    wall_s = time.perf_counter() - began
    if not write_redis:
        return Run(len(raw), wall_s, net_s)
    client = redis.Redis.from_url(URL)
    metrics: dict[bytes, bytes] = client.hgetall(f"{tag}:stream:metrics")  # type: ignore[assignment]
    rows = sum(int(v) for k, v in metrics.items() if k.endswith(b"rows_written"))
    stored: dict[bytes, bytes] = client.hgetall(  # type: ignore[assignment]
        f"{tag}:stream:written:{ITEM_TRENDING.name}")
    client.close()
    event_ms = pd.to_datetime(raw["event_time"], utc=True, format="ISO8601").astype(
        "int64").to_numpy() // 1_000_000
    rate = sustained_rate({int(k): int(v) for k, v in stored.items()}, event_ms,
                          opts.out_of_orderness_s * 1000)
    return Run(len(raw), wall_s, net_s, rows, rate)


def freshness(root: Path, tag: str, seconds: float) -> np.ndarray:
    opts = options(root, tag, out_of_orderness_s=0, checkpoint_interval_ms=5000)
    folder = Path(opts.stream_dir)
    folder.mkdir(parents=True, exist_ok=True)
    result = start(opts)
    time.sleep(15)  # let the job deploy before the producer starts
    files = int(seconds / 0.2)
    raw = events_in_span(files * 100, timedelta(seconds=60 * files), seed=9)
    landed: list[tuple[int, int]] = []  # (max event ms in file, landing wall ms)
    for i, chunk in enumerate(np.array_split(np.arange(len(raw)), files)):
        part = raw.iloc[chunk]
        write_jsonl(part, folder / f"events-{i:06d}.jsonl")
        max_ms = int(pd.Timestamp(part["event_time"].max()).value // 1_000_000)
        landed.append((max_ms, int(time.time() * 1000)))
        time.sleep(0.2)
    time.sleep(5)
    job = result.get_job_client()
    if job is not None:
        job.cancel().result()
    client = redis.Redis.from_url(URL)
    stored: dict[bytes, bytes] = client.hgetall(  # type: ignore[assignment]
        f"{tag}:stream:written:{ITEM_TRENDING.name}")
    written = {int(k): int(v) for k, v in stored.items()}
    client.close()
    lags = []
    for end, wrote in written.items():
        closing = [w for m, w in landed if m >= end]  # the first file past the window end
        if closing:
            lags.append(wrote - closing[0])
    return np.asarray(lags[1:], dtype=float)  # the first window includes the job start


def _say(line: str) -> None:
    # Results go straight to stdout: PyFlink reconfigures logging when a job starts.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=1,
                        help="files the replay is split into (read in any order: >1 makes "
                        "some events late)")
    parser.add_argument("--parallelism", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=30.0,
                        help="freshness run length; 0 skips it")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    tag = f"bench_stream_{uuid.uuid4().hex[:8]}"
    root = Path(tempfile.mkdtemp(prefix="bench_stream_"))
    client = redis.Redis.from_url(URL)
    try:
        raw = events_in_span(args.events, timedelta(hours=1))
        floor = floor_rows_per_s(client, tag, 100_000)
        _say(f"floor measured: {floor:,.0f} rows/s")
        warm = root / "warm" / "in"
        write_jsonl(raw.head(1000), warm / "events-0.jsonl")
        start(options(root / "warm", f"{tag}w", bounded=True)).wait()  # warm the JVM
        sql = throughput(root / "sql", f"{tag}s", raw, args.files, args.parallelism,
                         write_redis=False)
        _say(f"SQL-only floor measured: {sql.net_rate:,.0f} events/s net")
        job = throughput(root / "tp", f"{tag}t", raw, args.files, args.parallelism)
        _say(f"throughput measured: {job.sustained:,.0f} events/s sustained")
        lags = freshness(root / "fr", f"{tag}f", args.seconds) if args.seconds > 0 else None
        shape = f"{len(raw):,} events in {args.files} files, parallelism {args.parallelism}"
        out = [
            f"floor: redis-py alone writes {floor:,.0f} Feast rows/s",
            f"floor: the job's SQL into a blackhole ({shape}): wall {sql.wall_s:.1f} s = "
            f"{sql.wall_rate:,.0f} events/s, net {sql.net_s:.1f} s = {sql.net_rate:,.0f} "
            "events/s",
            f"job into Redis: wall {job.wall_s:.1f} s = {job.wall_rate:,.0f} events/s "
            f"({job.wall_rate / sql.wall_rate:.2f} x floor wall), net {job.net_s:.1f} s = "
            f"{job.net_rate:,.0f} events/s ({job.net_rate / sql.net_rate:.2f} x floor net)",
            f"job into Redis: {job.sustained:,.0f} events/s sustained between the first and "
            f"last window written ({job.sustained / sql.net_rate:.2f} x floor net; "
            f"{job.rows:,} rows written, {job.rows / job.net_s:,.0f} rows/s = "
            f"{job.rows / job.net_s / floor:.2f} x redis-py)",
        ]
        if lags is not None and lags.size:
            out.append(f"freshness over {lags.size} windows: p50 {np.percentile(lags, 50):.0f} "
                       f"ms, p99 {np.percentile(lags, 99):.0f} ms")
        for line in out:
            _say(line)
    finally:
        for key in client.scan_iter(match=f"*{tag}*", count=1000):
            client.delete(key)
        client.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
