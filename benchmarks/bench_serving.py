"""Serving latency and throughput on loopback vs the same pipeline called in-process.

Builds a small platform end to end in a data dir (generator -> platform flow: ETL, features in
Redis DB 4, training, promotion), then measures, for k=20 and 500 candidates with the real
Redis read of each user's features:

- the floor: ``Recommender.recommend`` called in-process, one request at a time, with the
  mean of each stage;
- the Ray Serve app over HTTP (one replica) in the mode ``recsys serve up`` deploys by default:
  direct ingress, requests to the replica's own port (``--proxy``: through Serve's proxy, the
  mode without direct ingress), closed loop at concurrency 1, 8 and 32;
- open loops at fixed arrival rates (default 100 req/s for 20 s; ``--rates 100,100,100``
  repeats it): a request's latency counts from its SCHEDULED send time, so queueing in the
  client, the proxy and the replica all count. The target: p99 <= 50 ms at >= 100 req/s with
  no non-200 answer.

The load generator shares the 2 cores with the server, so it is kept cheap: one aiohttp
session with connection reuse, and its garbage collector off while it measures.

``--experiments`` adds the online-experiment section (:func:`experiments_section`): the same
open loop with no experiment, with a 50% split experiment, and with a shadow experiment, one
after the other on the same replica, each p99 next to the no-experiment run's.

``--workdir DIR`` keeps the built platform (and its Redis keys) in DIR and reuses it on the
next run, so repeated measurements skip the ~minutes of setup. Run it under the heavy lock::

    flock /tmp/heavy.lock .venv/bin/python benchmarks/bench_serving.py --workdir /tmp/bench
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import redis
import yaml
from bench_common import write_platform_config

from recsys_core.settings import Settings, load_settings
from recsys_pipelines.generator import GeneratorConfig, generate, write_generated
from recsys_platform.serving.ingress import direct_ingress_env, replica_urls

# Redis for the built platform's online store: DB 4 unless --redis-url or BENCH_SERVING_REDIS_URL
# names another (parallel runs on one Redis each take their own DB).
DEFAULT_REDIS_URL = os.environ.get("BENCH_SERVING_REDIS_URL", "redis://127.0.0.1:6379/4")
CFG = GeneratorConfig(events=150_000, days=7, users=3_000, items=6_000)
PORT = 8765
logger = logging.getLogger("bench_serving")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q)) if values else float("nan")


def setup(workdir: Path, redis_url: str) -> tuple[Settings, Path, list[str]]:
    """The built platform in ``workdir`` (built now unless a previous run left it there)."""
    marker = workdir / "built.json"
    config_file = workdir / "settings.yaml"
    if marker.is_file():
        users: list[str] = json.loads(marker.read_text())["users"]
        settings = load_settings("local", config_file)
        ensure_champion(settings)
        return settings, config_file, users
    from recsys_platform.flows.platform_flow import platform_flow

    project = f"bench_{uuid.uuid4().hex[:8]}"
    settings = load_settings("local", write_platform_config(workdir, redis_url, project))
    data = generate(CFG)
    write_generated(data, settings.landing_dir)
    t0 = time.perf_counter()
    run = platform_flow(start=CFG.start, end=CFG.start + timedelta(days=CFG.days - 1),
                        settings=settings, epochs=1, workers=1, why="benchmark")
    logger.info("setup: platform flow %.0fs, version %s, promoted=%s",
                time.perf_counter() - t0, run.version, run.promoted)
    ensure_champion(settings)
    users = sorted(set(data.events["user_id"].dropna()))[:500]
    marker.write_text(json.dumps({"users": users, "project": project}))
    return settings, config_file, users


def ensure_champion(settings: Settings) -> None:
    """Serving needs a champion: when the quality gate refused the benchmark's one-epoch model
    (it measures speed, not quality), the newest version gets the alias anyway."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = settings.mlflow_tracking_uri
    client = MlflowClient(uri, uri)
    name = settings.mlflow.model_name
    try:
        client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        newest = max(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        client.set_registered_model_alias(name, "champion", str(newest))
        logger.info("setup: the gate refused version %d; made it champion for the benchmark",
                    newest)


def cleanup(workdir: Path, redis_url: str) -> None:
    marker = workdir / "built.json"
    if marker.is_file():
        project = json.loads(marker.read_text())["project"]
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"*{project}".encode(), count=1000))
        if keys:
            client.delete(*keys)


@dataclass
class Floor:
    """The in-process pipeline, one request at a time: the floor the replica is held to."""

    p50: float  # ms
    p99: float
    cpu_ms: float  # CPU per request of this process
    cheap_p50: float = float("nan")  # the cheaper path under load (degraded: ["load"])
    cheap_p99: float = float("nan")
    cheap_cpu_ms: float = float("nan")
    overlap: float = float("nan")  # share of the full top-k the cheaper path also returns


def _timed_calls(recommender: Any, users: list[str], calls: int, cheap: bool,
                 log: bool = False) -> tuple[list[float], float, list[list[str]]]:
    """Latencies, CPU ms per call (this process, all its threads) and the lists. ``log``: the
    responses go to the impression log as a replica's do, and its flush (the Parquet write a
    replica's flusher thread does every 5 s) is inside the measured CPU."""
    from recsys_platform.serving.schemas import RecommendRequest

    latencies: list[float] = []
    lists: list[list[str]] = []
    if log and recommender.impressions is not None:
        recommender.impressions.flush()  # what earlier calls left: not this measurement's
    c0 = time.process_time()
    for n in range(calls):
        t1 = time.perf_counter()
        response = recommender.recommend(RecommendRequest(user_id=users[n % len(users)], k=20),
                                         log=log, cheap=cheap)
        latencies.append(time.perf_counter() - t1)
        lists.append([i.item_id for i in response.items])
    if log and recommender.impressions is not None:
        recommender.impressions.flush()
    return latencies, 1000 * (time.process_time() - c0) / calls, lists


def cheaper_path(recommender: Any, users: list[str], calls: int, full_cpu_ms: float,
                 full: list[list[str]]) -> tuple[float, float, float, float]:
    """p50, p99, CPU per request of the cheaper path, and the share of the full path's top-k
    it returns too; printed next to the full path's."""
    latencies, cpu_ms, cheap = _timed_calls(recommender, users, calls, cheap=True)
    overlap = float(np.mean([len(set(a) & set(b)) / max(len(a), 1)
                             for a, b in zip(full, cheap, strict=True)]))
    options = recommender.options
    print(f"in-process cheaper path ({options.load_candidates} candidates, "
          f"{'ranked' if options.load_rank else 'retrieval order'}, degraded load): "
          f"p50 {pct(latencies, 50):.2f} ms, p99 {pct(latencies, 99):.2f} ms, CPU {cpu_ms:.2f} ms "
          f"per request ({cpu_ms / full_cpu_ms:.2f}x the full path); its top-20 holds "
          f"{overlap:.0%} of the full path's top-20 (same users)")
    return pct(latencies, 50), pct(latencies, 99), cpu_ms, overlap


def build_in_process(settings: Settings) -> tuple[Any, Any]:
    """The recommender and its item cache, built in this process as a replica builds them."""
    import torch

    from recsys_platform.serving.factory import build_recommender, warm_up

    torch.set_num_threads(1)  # as in a replica
    recommender, cache = build_recommender(settings)
    warm_up(recommender, 20)
    gc.collect()
    gc.freeze()
    return recommender, cache


def in_process(settings: Settings, recommender: Any, users: list[str], calls: int = 400
               ) -> Floor:
    """``Recommender.recommend`` in this process (full and cheaper path); prints stage means."""
    latencies, cpu_ms, full = _timed_calls(recommender, users, calls, cheap=False)
    floor = Floor(pct(latencies, 50), pct(latencies, 99), cpu_ms)
    print(f"in-process floor (500 candidates, k=20, c=1, {calls} calls): p50 {floor.p50:.2f} ms, "
          f"p99 {floor.p99:.2f} ms, CPU {cpu_ms:.2f} ms per request")
    print("in-process stage means: " + ", ".join(
        f"{stage} {ms:.2f} ms" for stage, ms in stage_means(recommender).items()))
    configured = recommender.options  # the other variant first, for comparison
    recommender.options = replace(configured, load_rank=not configured.load_rank)
    cheaper_path(recommender, users, calls, cpu_ms, full)
    recommender.options = configured
    floor.cheap_p50, floor.cheap_p99, floor.cheap_cpu_ms, floor.overlap = cheaper_path(
        recommender, users, calls, cpu_ms, full)
    item_refresh(settings, recommender.manager)
    return floor


def item_refresh(settings: Settings, manager: Any) -> None:
    """One request's item read (500 candidates, cache cold): Feast's path vs the pipelined
    HMGET the replica uses; nothing on a replica reads the whole catalog any more."""
    from recsys_platform.serving.factory import serving_store
    from recsys_platform.serving.item_features import redis_item_fetch
    from recsys_platform.serving.online_features import feast_item_frame

    store = serving_store(settings, timeout_s=10.0)
    catalog = [str(i) for i in manager.current.bundle.item_ids] if manager.current else []
    ids = catalog[:: max(1, len(catalog) // 500)][:500]
    fetch, _ = redis_item_fetch(store, settings.redis.url, 10.0)
    timings = {}
    for name, read in (("feast get_online_features", lambda: feast_item_frame(store, ids)),
                       ("pipelined HMGET", lambda: fetch(ids))):
        read()  # warm
        c0, t0 = time.process_time(), time.perf_counter()
        read()
        timings[name] = (time.process_time() - c0, time.perf_counter() - t0)
    print(f"per-request item read ({len(ids)} items, no cache): " + ", ".join(
        f"{name} {cpu * 1000:.1f} ms CPU / {wall * 1000:.1f} ms wall"
        for name, (cpu, wall) in timings.items()))


def stage_means(recommender: Any) -> dict[str, float]:
    """Mean latency per stage (ms) from the recommender's own histogram."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for metric in recommender.metrics.registry.collect():
        for sample in metric.samples:
            stage = sample.labels.get("stage")
            if sample.name.endswith("_sum") and stage:
                sums[stage] = sample.value
            elif sample.name.endswith("_count") and stage:
                counts[stage] = sample.value
    return {k: 1000 * sums[k] / counts[k] for k in sums if counts.get(k)}


def serve_pids() -> dict[str, int]:
    """This benchmark's Serve proxy and replica: descendants of this process (the local
    cluster it started), so other Ray sessions on the machine are never measured."""
    import subprocess

    listing = subprocess.run(["ps", "-eo", "pid,ppid,args", "--sort=start_time"], check=True,
                             capture_output=True, text=True).stdout
    parent: dict[int, int] = {}
    rows: list[tuple[int, str]] = []
    for line in listing.splitlines()[1:]:
        pid, ppid, args = line.split(None, 2) if len(line.split()) > 2 else (*line.split(), "")
        parent[int(pid)] = int(ppid)
        rows.append((int(pid), args))

    def ours(pid: int) -> bool:
        while pid > 1:
            if pid == os.getpid():
                return True
            pid = parent.get(pid, 1)
        return False

    pids: dict[str, int] = {}
    for pid, args in rows:
        if "ray::ProxyActor" in args and ours(pid):
            pids["proxy"] = pid
        elif "ServeReplica:bench" in args and ours(pid):
            pids["replica"] = pid
    return pids


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def match_niceness(pid: int) -> int:
    """Gives every thread of this process the niceness of ``pid`` (Ray starts its workers, a
    replica included, at nice 15); returns it. On a CPU shared with other work a process that
    is preempted more often spends more CPU per unit of work (caches refilled), so the floor
    and the replica are measured at the same priority. Raising niceness needs no privilege;
    it is not undone (``--cpu-only`` ends the run after it)."""
    nice = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended, or a lower niceness
            if os.getpriority(os.PRIO_PROCESS, int(task.name)) < nice:
                os.setpriority(os.PRIO_PROCESS, int(task.name), nice)
    return nice


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of a process, summed by thread name (Ray's C++ threads,
    which py-spy does not see, have their own names)."""
    by_name: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue  # the thread ended
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        seconds = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        by_name[name] = by_name.get(name, 0.0) + seconds
    return by_name


@dataclass
class Outcome:
    """What one load run got back; latencies in seconds."""

    full: list[float] = field(default_factory=list)  # 200 on the full path
    cheap: list[float] = field(default_factory=list)  # 200 on the cheaper path (load)
    refused: list[float] = field(default_factory=list)  # 503 with Retry-After
    server: list[float] = field(default_factory=list)  # admitted: seconds in the replica
    bare_503: int = 0  # 503 without Retry-After (must stay 0)
    other: int = 0  # any other status, a timeout or a connection error
    seconds: float = float("nan")

    @property
    def admitted(self) -> list[float]:
        return self.full + self.cheap

    @property
    def goodput(self) -> float:
        return len(self.admitted) / self.seconds

    @property
    def sent(self) -> int:
        return len(self.admitted) + len(self.refused) + self.bare_503 + self.other

    def add(self, status: int, retry_after: bool, cheap: bool, latency: float,
            server_ms: float | None = None) -> None:
        if status == 200:
            (self.cheap if cheap else self.full).append(latency)
            if server_ms is not None:
                self.server.append(server_ms / 1000)
        elif status == 503 and retry_after:
            self.refused.append(latency)
        elif status == 503:
            self.bare_503 += 1
        else:
            self.other += 1

    def line(self) -> str:
        adm = self.admitted
        return (f"admitted p50 {pct(adm, 50):.1f} ms, p99 {pct(adm, 99):.1f} ms (in the "
                f"replica, from admission: p99 {pct(self.server, 99):.1f} ms), goodput "
                f"{self.goodput:.0f} req/s ({len(self.cheap)} of {len(adm)} on the cheaper path"
                f"{f', its p99 {pct(self.cheap, 99):.1f} ms' if self.cheap else ''}), "
                f"503 + Retry-After {len(self.refused)} (p50 {pct(self.refused, 50):.1f} ms, "
                f"p99 {pct(self.refused, 99):.1f} ms), "
                f"503 without Retry-After {self.bare_503}, other {self.other}")


async def post(session: aiohttp.ClientSession, url: str, user: str
                ) -> tuple[int, bool, bool, float | None]:
    """The HTTP status (0: a timeout or a connection error), whether it carried Retry-After,
    whether the answer took the cheaper path (``degraded: ["load"]``) and the milliseconds
    the replica took from admitting it to answering (its ``Server-Timing``, None without)."""
    try:
        async with session.post(url, json={"user_id": user, "k": 20}) as resp:
            body = await resp.read()
            timing = resp.headers.get("Server-Timing", "")
            server = float(timing.split("dur=", 1)[1]) if "dur=" in timing else None
            return resp.status, "Retry-After" in resp.headers, b'"load"' in body, server
    except (TimeoutError, aiohttp.ClientError):
        return 0, False, False, None


async def closed_loop(session: aiohttp.ClientSession, url: str, users: list[str],
                      concurrency: int, seconds: float) -> Outcome:
    out = Outcome()
    deadline = time.perf_counter() + seconds

    async def worker(i: int) -> None:
        n = i
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            status, retry_after, cheap, server = await post(session, url,
                                                            users[n % len(users)])
            out.add(status, retry_after, cheap, time.perf_counter() - t0, server)
            if status == 503:  # as a client honouring Retry-After would, but sooner
                await asyncio.sleep(0.01)
            n += concurrency

    start = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    out.seconds = time.perf_counter() - start
    return out


async def open_loop(session: aiohttp.ClientSession, url: str | Any, users: list[str],
                    rps: float, seconds: float) -> Outcome:
    """Latency from each request's scheduled send time. ``url``: a string, or a function of
    the request's number giving its URL (a client spreading over replicas)."""
    out = Outcome()
    target = url if callable(url) else (lambda n: url)

    async def one(n: int, scheduled: float) -> None:
        status, retry_after, cheap, server = await post(session, target(n),
                                                        users[n % len(users)])
        out.add(status, retry_after, cheap, time.perf_counter() - scheduled, server)

    tasks = []
    start = time.perf_counter()
    for n in range(int(rps * seconds)):
        scheduled = start + n / rps
        await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
        tasks.append(asyncio.create_task(one(n, scheduled)))
    await asyncio.gather(*tasks)
    out.seconds = time.perf_counter() - start
    return out


def client_session(limit: int = 256) -> aiohttp.ClientSession:
    """The load generator's one session; its garbage collector is off while it measures."""
    gc.collect()
    gc.freeze()
    gc.disable()
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit),
                                 timeout=aiohttp.ClientTimeout(total=30))


async def replica_cpu(session: aiohttp.ClientSession, url: str, users: list[str],
                      concurrency: int, seconds: float) -> tuple[Outcome, dict[str, float]]:
    """A closed loop at ``concurrency`` and the CPU ms per 200 of the Serve processes."""
    pids = serve_pids()
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    threads = thread_cpu(pids["replica"])
    out = await closed_loop(session, url, users, concurrency, seconds)
    served = max(len(out.admitted), 1)
    cpu = {name: 1000 * (cpu_seconds(pid) - before[name]) / served
           for name, pid in pids.items()}
    after = thread_cpu(pids["replica"])
    per_thread = sorted(((1000 * (v - threads.get(k, 0.0)) / served, k)
                         for k, v in after.items()), reverse=True)
    print(f"  replica threads at c={concurrency}, CPU ms per 200: " + ", ".join(
        f"{name} {ms:.2f}" for ms, name in per_thread[:8] if ms >= 0.01))
    return out, cpu


async def closed_loops(users: list[str], floor: Floor, base: str) -> float:
    """Closed loops at c=1, 2, 4 on the full path only; CPU per request of the replica
    against the in-process floor's. Returns one replica's capacity: the most 200/s."""
    url = f"{base}/recommend"
    capacity = 0.0
    async with client_session() as session:
        await closed_loop(session, url, users, 2, 3)  # warm-up
        idle_ms_per_s = await replica_idle(session)
        for c in (1, 2, 4):
            out, cpu = await replica_cpu(session, url, users, c, 8)
            served = max(len(out.admitted), 1)
            capacity = max(capacity, len(out.full) / out.seconds)
            print(f"http closed loop c={c}: {out.line()}; CPU ms per 200: " + ", ".join(
                f"{name} {ms:.2f}" for name, ms in cpu.items())
                + f"; replica CPU per request {cpu['replica'] / floor.cpu_ms:.2f}x the "
                f"in-process pipeline's {floor.cpu_ms:.2f} ms (target <= 1.3x); net of the idle "
                f"replica's background "
                f"{(cpu['replica'] - idle_ms_per_s * out.seconds / served) / floor.cpu_ms:.2f}x")
    print(f"one replica's capacity (most 200/s of the closed loops, full path): "
          f"{capacity:.0f} req/s")
    return capacity


async def replica_idle(session: aiohttp.ClientSession, seconds: float = 5.0) -> float:
    """CPU ms per second of the idle replica (printed; returned)."""
    replica = serve_pids()["replica"]
    idle0 = cpu_seconds(replica)
    await asyncio.sleep(seconds)
    idle_ms_per_s = 1000 * (cpu_seconds(replica) - idle0) / seconds
    print(f"replica idle: {idle_ms_per_s:.1f} ms of CPU per second (metrics pushes, "
          "health checks, refreshers: counted in the CPU per request below)")
    return idle_ms_per_s


def cpu_repeats(recommender: Any, users: list[str], base: str, repeats: int,
                seconds: float = 6.0, calls: int = 750) -> None:
    """The replica's CPU per request against the in-process pipeline's, ``repeats`` times.

    CPU time (process CPU seconds / requests), not latency, and each replica measurement
    (closed loop at c=1, 2, 4 for ``seconds``) bracketed by two in-process floors of
    ``calls`` requests (the mean of the two is its floor): on a 2-vCPU box shared with other
    work, what runs beside a process changes its CPU per unit of work too, so the two sides
    of a ratio are measured seconds apart. The floor writes the impression log as a replica
    does (:func:`_timed_calls`); the ratio without it is printed too. Prints each repeat and
    the spread (min, median, max) per concurrency. ``calls`` 750: one flush of the log per
    floor holds as many responses as a replica's flusher writes every 5 s at ~150 req/s (a
    flush has a fixed cost too, which fewer rows per flush would weigh more)."""
    url = f"{base}/recommend"
    ratios: dict[int, list[float]] = {1: [], 2: [], 4: []}
    bare: dict[int, list[float]] = {1: [], 2: [], 4: []}

    def floors() -> tuple[float, float]:
        _, logged, _ = _timed_calls(recommender, users, calls, cheap=False, log=True)
        _, without, _ = _timed_calls(recommender, users, calls, cheap=False, log=False)
        return logged, without

    async def one_repeat() -> str:
        parts = []
        async with client_session() as session:
            await closed_loop(session, url, users, 2, 2)  # warm-up
            before = floors()
            for c in ratios:
                out, cpu = await replica_cpu(session, url, users, c, seconds)
                after = floors()
                floor_ms, bare_ms = ((a + b) / 2 for a, b in zip(before, after, strict=True))
                ratios[c].append(cpu["replica"] / floor_ms)
                bare[c].append(cpu["replica"] / bare_ms)
                parts.append(f"c={c} {cpu['replica']:.2f} ms ({len(out.admitted) / out.seconds:.0f}"
                             f" req/s) vs in-process {floor_ms:.2f} ms = {ratios[c][-1]:.2f}x "
                             f"({bare_ms:.2f} ms without the log: {bare[c][-1]:.2f}x)")
                before = after
        gc.enable()
        return "; ".join(parts)

    nice = match_niceness(serve_pids()["replica"])
    print(f"the floor runs at the replica's niceness ({nice}) from here on")
    for r in range(repeats):
        gc.collect()
        load = os.getloadavg()[0]
        line = asyncio.run(one_repeat())
        print(f"CPU repeat {r + 1}/{repeats} (load average {load:.1f} -> "
              f"{os.getloadavg()[0]:.1f}): {line}")
    for c, values in ratios.items():
        v = sorted(values)
        over = sum(x > 1.3 for x in v)
        print(f"replica CPU per request / in-process, c={c}, {len(v)} repeats: min {v[0]:.2f}x, "
              f"median {float(np.median(v)):.2f}x, max {v[-1]:.2f}x (target <= 1.3x): "
              + ("MET in every repeat" if not over else f"NOT met in {over} of {len(v)}")
              + f"; against the pipeline without its impression log: median "
              f"{float(np.median(bare[c])):.2f}x, max {max(bare[c]):.2f}x")


async def unloaded(users: list[str], base: str, capacity: float, seconds: float) -> float:
    """Open loop at 0.25x capacity; returns its p99 (the reference of the overload runs)."""
    async with client_session() as session:
        out = await open_loop(session, f"{base}/recommend", users, 0.25 * capacity, seconds)
    print(f"http open loop, unloaded ({0.25 * capacity:.0f} req/s = 0.25x capacity, "
          f"{seconds:.0f}s): {out.line()}")
    return pct(out.admitted, 99)


async def capacity_now(users: list[str], base: str, seconds: float = 6.0) -> float:
    """Full-path answers per second of a closed loop at c=4 now: the capacity that an overload
    run next to it is held to (the box's load drifts between the runs of one benchmark)."""
    async with client_session() as session:
        out = await closed_loop(session, f"{base}/recommend", users, 4, seconds)
    return len(out.full) / out.seconds


async def overloaded(users: list[str], base: str, capacity: float, unloaded_p99: float,
                     overload: float, seconds: float, what: str, after: bool = True) -> float:
    """Open loop at ``overload`` x ``capacity`` (measured just before), then (``after``: on a
    replica without the cheaper path, whose closed loop counts only full-path answers) the
    capacity again (closed loop, c=4): goodput against the mean of the two, and admitted p99
    against the targets. Returns the capacity measured after."""
    rate = overload * capacity
    async with client_session() as session:
        out = await open_loop(session, f"{base}/recommend", users, rate, seconds)
    measured = await capacity_now(users, base) if after else capacity
    bracket = (capacity + measured) / 2
    p99 = pct(out.admitted, 99)
    ok = (out.goodput >= 0.8 * bracket and p99 <= 2 * unloaded_p99 and out.bare_503 == 0
          and out.other == 0)
    print(f"http open loop, overload, {what} ({rate:.0f} req/s = {overload:g}x the capacity "
          f"measured just before, {capacity:.0f} req/s; {measured:.0f} req/s just after; "
          f"{seconds:.0f}s, {out.sent} sent): {out.line()}; goodput "
          f"{out.goodput / bracket:.2f}x capacity (the mean of before and after; "
          f"{out.goodput / capacity:.2f}x the one before; target >= 0.8x), full-path goodput "
          f"{len(out.full) / out.seconds / bracket:.2f}x, admitted p99 "
          f"{p99 / unloaded_p99:.2f}x the unloaded p99 (target <= 2x): "
          f"{'MET' if ok else 'NOT met'}")
    return measured


async def fixed_rates(users: list[str], base: str, floor: Floor, rates: list[float],
                      seconds: float) -> None:
    """Open loops at fixed rates (the issue-6 target: p99 <= 50 ms at 100 req/s, all 200)."""
    async with client_session() as session:
        for rate in rates:
            await asyncio.sleep(2)
            out = await open_loop(session, f"{base}/recommend", users, rate, seconds)
            lat = out.admitted
            ok = pct(lat, 99) <= 50 and out.sent == len(lat) and out.goodput >= 0.995 * rate
            print(f"http open loop {rate:.0f} req/s for {seconds:.0f}s: {out.line()}; p99 vs "
                  f"in-process p99 {pct(lat, 99) / floor.p99:.1f}x; target (p99 <= 50 ms at "
                  f">= {rate:.0f} req/s, all 200) {'MET' if ok else 'NOT met'}")


async def ray_backpressure(users: list[str], base: str) -> None:
    """A burst against Ray Serve's own limits (max_ongoing_requests=1, max_queued_requests=1)
    while the app's admission lets everything in: Ray's 503s must carry Retry-After too
    (serving/ingress.py's middleware)."""
    counts = {"200": 0, "ray 503": 0, "ray 503 with Retry-After": 0, "other": 0}
    deadline = time.perf_counter() + 3

    async def worker(session: aiohttp.ClientSession, i: int) -> None:
        while time.perf_counter() < deadline:
            async with session.post(f"{base}/recommend",
                                    json={"user_id": users[i % len(users)], "k": 20}) as resp:
                body = await resp.read()
                if resp.status == 200:
                    counts["200"] += 1
                elif resp.status == 503 and b"backpressure" in body:
                    counts["ray 503"] += 1
                    counts["ray 503 with Retry-After"] += "Retry-After" in resp.headers
                else:
                    counts["other"] += 1

    async with client_session() as session:
        await asyncio.gather(*(worker(session, i) for i in range(16)))
    print("Ray Serve's own backpressure (max_ongoing_requests=1, max_queued_requests=1, app "
          "admission open, closed loop c=16 for 3 s): "
          + ", ".join(f"{k} {v}" for k, v in counts.items()))


# Leaf frames of threads that wait (in C: a lock, a queue, epoll); on a loaded machine py-spy
# samples some of them as active.
IDLE_FRAMES = ("Condition.wait", "Event.wait", "_worker (concurrent/futures/thread.py:81)",
               "Thread.run (threading.py:982)", "_run_user_code_event_loop", "main_loop",
               "select (selectors.py", "run_forever")


async def profile_replica(users: list[str], base: str, seconds: float) -> None:
    """py-spy samples of the replica (all its threads, native frames off) under a bounded
    closed loop; prints the functions holding the most samples, self and total."""
    import subprocess
    import sys

    out = Path(tempfile.mkdtemp(prefix="pyspy_")) / "replica.txt"
    spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "-p",
                            str(serve_pids()["replica"]), "-d", f"{seconds:g}", "-r", "200",
                            "-f", "raw", "--gil", "-o", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    async with client_session() as session:
        await closed_loop(session, f"{base}/recommend", users, 2, seconds + 1)
    spy.wait()
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if any(idle in frames[-1] for idle in IDLE_FRAMES):
            continue  # a thread blocked in a wait that py-spy sampled as active
        n = int(count)
        samples += n
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for frame in set(frames):
            total[frame] = total.get(frame, 0) + n
    print(f"py-spy of the replica: {samples} busy samples; top self / top total:")
    for name, table in (("self", own), ("total", total)):
        for frame, n in sorted(table.items(), key=lambda kv: -kv[1])[:25]:
            print(f"  {name} {100 * n / samples:5.1f}%  {frame}")


def wait_ready(base: str, timeout_s: float = 180) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{base}/readyz not 200 after {timeout_s:.0f}s")


# --- online experiments (issue 17): p99 with a split and with shadow, next to none ---------


def experiment_config(config_file: Path) -> Path:
    """The bench config with a 2 s registry poll, so replicas pick experiments up quickly."""
    data = yaml.safe_load(config_file.read_text())
    data.setdefault("serving", {})["poll_interval_s"] = 2
    path = config_file.with_name("settings-experiments.yaml")
    path.write_text(yaml.safe_dump(data))
    return path


def _readyz(base: str) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(f"{base}/readyz", timeout=5) as r:
        body: dict[str, Any] = json.loads(r.read())
        return body


def _metric(base: str, line_start: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(line_start):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def _await_experiment(base: str, exp_id: str | None, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = _readyz(base).get("experiment")
        if (got is None and exp_id is None) or (got and got["id"] == exp_id and got["live"]):
            return
        time.sleep(0.5)
    raise RuntimeError(f"serving did not pick up experiment {exp_id} in {timeout_s:.0f}s")


async def experiments_section(settings: Settings, users: list[str], rate: float,
                              seconds: float, base: str) -> None:
    """Open loop at ``rate`` with no experiment, a 50% split, then shadow; p99 of each."""
    from recsys_models.registry import load_alias, register_bundle
    from recsys_platform.experiments import lifecycle

    if lifecycle.current(settings) is not None:
        lifecycle.stop(settings, why="benchmark start", who="bench_serving")
    treatment = register_bundle(settings, load_alias(settings, "champion"),
                                run_name="bench-treatment").version  # same model, 2nd copy
    url = f"{base}/recommend"
    gc.collect()
    gc.disable()
    results: dict[str, tuple[float, float, int]] = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=128),
                                     timeout=aiohttp.ClientTimeout(total=30)) as session:
        for mode in ("none", "split", "shadow"):
            if mode != "none":
                exp = lifecycle.start(settings, treatment, mode, 0.5 if mode == "split" else 1.0,
                                      why="benchmark", who="bench_serving",
                                      min_samples=10**9)
                _await_experiment(base, exp.id)
            await closed_loop(session, url, users, 4, 3)  # warm-up (both arms' caches)
            shadow_before = {o: _metric(base, f'recsys_experiment_shadow_total{{outcome="{o}"')
                             for o in ("logged", "dropped", "stale")}
            out = await open_loop(session, url, users, rate, seconds)
            lat, errors, rps = out.admitted, out.sent - len(out.admitted), out.goodput
            results[mode] = (pct(lat, 50), pct(lat, 99), errors)
            extra = ""
            if mode == "shadow":
                got = {o: _metric(base, f'recsys_experiment_shadow_total{{outcome="{o}"')
                       - shadow_before[o] for o in shadow_before}
                extra = (f"; shadow rankings logged {got['logged']:.0f}, dropped "
                         f"{got['dropped']:.0f} (queue full), stale {got['stale']:.0f} of "
                         f"{len(lat) + errors} requests")
            base99 = results["none"][1]
            print(f"experiment {mode:6s} open loop {rate:.0f} req/s for {seconds:.0f}s: p50 "
                  f"{pct(lat, 50):.1f} ms, p99 {pct(lat, 99):.1f} ms "
                  f"({pct(lat, 99) / base99:.2f}x no experiment), served {rps:.0f} req/s, "
                  f"non-200 {errors} ({len(out.cheap)} on the cheaper path){extra}")
            if mode != "none":
                lifecycle.stop(settings, why="benchmark", who="bench_serving")
                _await_experiment(base, None)
    gc.enable()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, help="keep/reuse the built platform here")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL,
                        help="online store of the built platform (default: DB 4, or "
                        "$BENCH_SERVING_REDIS_URL)")
    parser.add_argument("--rates", default="100",
                        help="open loops at these fixed rates too, comma separated ('': none)")
    parser.add_argument("--seconds", type=float, default=20.0, help="open-loop duration")
    parser.add_argument("--overload", type=float, default=3.0,
                        help="the overload run's rate, in multiples of the measured capacity")
    parser.add_argument("--profile-replica", type=float, default=0.0, metavar="SECONDS",
                        help="py-spy the replica this long under a closed loop at c=2 "
                        "(needs py-spy in the venv) and print its top functions")
    parser.add_argument("--hot-path-threads", type=int, default=None,
                        help="the deployment's hot_path_threads (default: its own default; 0 "
                        "runs the hot path on the replica's event loop)")
    parser.add_argument("--batch-ranker", action="store_true",
                        help="rank with @serve.batch across concurrent requests")
    parser.add_argument("--throughput-optimized", action="store_true",
                        help="start Ray with RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (Ray Serve's own "
                        "same-loop / gRPC / log-buffer settings)")
    parser.add_argument("--experiments", action="store_true",
                        help="also: p99 with a split and with a shadow experiment, next to none")
    parser.add_argument("--experiments-only", action="store_true",
                        help="only the experiments section (skips the closed loops)")
    parser.add_argument("--port", type=int, default=PORT,
                        help="Serve's HTTP proxy port (direct ingress: replicas from "
                        "$RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT, 30000, up)")
    parser.add_argument("--cpu-only", action="store_true",
                        help="only the replica's CPU per request against the in-process floor")
    parser.add_argument("--repeats", type=int, default=1,
                        help="with --cpu-only: measure the floor and the replica's CPU per "
                        "request this many times, alternating, and print the spread")
    parser.add_argument("--cpu-seconds", type=float, default=6.0,
                        help="with --cpu-only: each closed loop's length; 30 covers one period "
                        "of the replica's pollers (bundle, experiments: every 30 s), so their "
                        "CPU weighs as in steady state instead of 0 or 5x in a 6 s loop")
    parser.add_argument("--proxy", action="store_true",
                        help="no direct ingress: requests go through Serve's proxy "
                        "(`recsys serve up --no-direct-ingress`)")
    args = parser.parse_args()
    if args.throughput_optimized:
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"  # inherited by every Ray process
    os.environ.update(direct_ingress_env(not args.proxy, draining_s=1))  # as `serve up`
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import ray
    from ray import serve

    from recsys_platform.serving.app import RecommenderDeployment

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_serving_"))
    workdir.mkdir(parents=True, exist_ok=True)
    recommender: Any = None
    cache: Any = None
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        settings, config_file, users = setup(workdir, args.redis_url)
        recommender, cache = build_in_process(settings)
        floor = in_process(settings, recommender, users)
        serve.start(http_options={"host": "127.0.0.1", "port": args.port},
                    logging_config={"enable_access_log": False})
        experiments = args.experiments or args.experiments_only
        served_config = experiment_config(config_file) if experiments else config_file

        def deploy(**options: Any) -> str:
            """(Re)deploys the one replica; returns its URL once /readyz answers 200."""
            t0 = time.perf_counter()
            serve.run(RecommenderDeployment.options(  # type: ignore[attr-defined]
                autoscaling_config=None, num_replicas=1, **options).bind(
                    config_file=str(served_config), batch_ranker=args.batch_ranker,
                    **({} if args.hot_path_threads is None
                       else {"hot_path_threads": args.hot_path_threads})),
                name="bench", route_prefix="/", blocking=False)
            base = (f"http://127.0.0.1:{args.port}" if args.proxy
                    else replica_urls("bench", host="127.0.0.1", timeout_s=180)[0])
            wait_ready(base)
            print(f"deployed: /readyz 200 {time.perf_counter() - t0:.1f}s after serve.run")
            return base

        # Admission alone first (no cheaper path: refusals only), then the cheaper path
        # switched on in the same replica (Serve's user_config, no restart).
        base = deploy(user_config={"cheap_path": False})
        print(f"one replica (0.5 CPU reserved), batch_ranker={args.batch_ranker}, "
              f"hot_path_threads={args.hot_path_threads}, "
              f"throughput_optimized={args.throughput_optimized}, {base}"
              f"{' (proxy)' if args.proxy else ' (replica, direct ingress as `serve up`)'}, "
              f"pid {os.getpid()}, load average {os.getloadavg()[0]:.1f}")
        rates = [float(r) for r in args.rates.split(",") if r]
        if experiments:  # p99 with a split and with shadow, next to none, on a fresh replica
            asyncio.run(experiments_section(settings, users, rates[0], args.seconds,
                                            deploy()))
            if args.experiments_only:
                serve.shutdown()
                ray.shutdown()
                return
            base = deploy(user_config={"cheap_path": False})
        if args.profile_replica:
            asyncio.run(profile_replica(users, base, args.profile_replica))
        if args.cpu_only:  # at the replica's niceness from here on: nothing else after it
            cpu_repeats(recommender, users, base, args.repeats, args.cpu_seconds)
            serve.shutdown()
            ray.shutdown()
            return
        capacity = asyncio.run(closed_loops(users, floor, base))
        base_p99 = asyncio.run(unloaded(users, base, capacity, args.seconds))
        capacity = asyncio.run(capacity_now(users, base))
        capacity = asyncio.run(overloaded(users, base, capacity, base_p99, args.overload,
                                          args.seconds, "admission only (cheap_path off)"))
        base = deploy(user_config={"cheap_path": True})
        asyncio.run(overloaded(users, base, capacity, base_p99, args.overload, args.seconds,
                               "with the cheaper path (cheap_path on, the default)",
                               after=False))
        asyncio.run(fixed_rates(users, base, floor, rates, args.seconds))
        # Ray Serve's own backpressure: its limits at 1 (a lightweight update, same replica)
        base = deploy(user_config={"cheap_path": True, "queue_budget_ms": 60_000},
                      max_ongoing_requests=1, max_queued_requests=1)
        asyncio.run(ray_backpressure(users, base))
        print(f"load average after: {os.getloadavg()[0]:.1f}")
        serve.shutdown()
        ray.shutdown()
    finally:
        if recommender is not None:
            recommender.manager.stop()
            cache.stop()
        if args.workdir is None:
            cleanup(workdir, args.redis_url)
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
