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

``--workdir DIR`` keeps the built platform (and its Redis keys) in DIR and reuses it on the
next run, so repeated measurements skip the ~minutes of setup. Run it under the heavy lock::

    flock /tmp/heavy.lock .venv/bin/python benchmarks/bench_serving.py --workdir /tmp/bench
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import redis
import yaml

from recsys_pipelines.generator import GeneratorConfig, generate, write_generated
from recsys_platform.serving.ingress import direct_ingress_env, replica_urls
from recsys_platform.settings import Settings, load_settings

REDIS_URL = "redis://127.0.0.1:6379/4"
CFG = GeneratorConfig(events=150_000, days=7, users=3_000, items=6_000)
PORT = 8765
logger = logging.getLogger("bench_serving")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q)) if values else float("nan")


def setup(workdir: Path) -> tuple[Settings, Path, list[str]]:
    """The built platform in ``workdir`` (built now unless a previous run left it there)."""
    marker = workdir / "built.json"
    config_file = workdir / "settings.yaml"
    if marker.is_file():
        users: list[str] = json.loads(marker.read_text())["users"]
        return load_settings("local", config_file), config_file, users
    from recsys_platform.orchestration import platform_flow

    project = f"bench_{uuid.uuid4().hex[:8]}"
    config = {"data_dir": str(workdir / "data"), "redis": {"url": REDIS_URL},
              "feast": {"project": project, "online_store": "redis",
                        "repo_path": str(workdir / "feature_repo"),
                        "registry_path": str(workdir / "data" / "feast" / "registry.db")},
              "serving": {"candidates": 500, "poll_interval_s": 30}}
    (workdir / "feature_repo").mkdir(parents=True, exist_ok=True)
    repo = Path(__file__).resolve().parents[1] / "feature_repo" / "definitions.py"
    (workdir / "feature_repo" / "definitions.py").write_text(repo.read_text())
    config_file.write_text(yaml.safe_dump(config))
    settings = load_settings("local", config_file)
    data = generate(CFG)
    write_generated(data, settings.landing_dir)
    t0 = time.perf_counter()
    run = platform_flow(start=CFG.start, end=CFG.start + timedelta(days=CFG.days - 1),
                        settings=settings, epochs=1, workers=1, why="benchmark")
    logger.info("setup: platform flow %.0fs, version %s, promoted=%s",
                time.perf_counter() - t0, run.version, run.promoted)
    users = sorted(set(data.events["user_id"].dropna()))[:500]
    marker.write_text(json.dumps({"users": users, "project": project}))
    return settings, config_file, users


def cleanup(workdir: Path) -> None:
    marker = workdir / "built.json"
    if marker.is_file():
        project = json.loads(marker.read_text())["project"]
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"*{project}".encode(), count=1000))
        if keys:
            client.delete(*keys)


def in_process(settings: Settings, users: list[str], calls: int = 400) -> tuple[float, float]:
    """p50/p99 of ``Recommender.recommend`` in this process; prints stage means."""
    import torch

    from recsys_platform.serving.factory import build_recommender, warm_up
    from recsys_platform.serving.schemas import RecommendRequest

    torch.set_num_threads(1)  # as in a replica
    recommender, cache = build_recommender(settings)
    warm_up(recommender, 20)
    gc.collect()
    gc.freeze()
    latencies: list[float] = []
    for n in range(calls):
        t1 = time.perf_counter()
        recommender.recommend(RecommendRequest(user_id=users[n % len(users)], k=20), log=False)
        latencies.append(time.perf_counter() - t1)
    f50, f99 = pct(latencies, 50), pct(latencies, 99)
    print(f"in-process floor (500 candidates, k=20, c=1, {calls} calls): p50 {f50:.2f} ms, "
          f"p99 {f99:.2f} ms")
    print("in-process stage means: " + ", ".join(
        f"{stage} {ms:.2f} ms" for stage, ms in stage_means(recommender).items()))
    item_refresh(settings, recommender.manager)
    recommender.manager.stop()
    cache.stop()
    gc.unfreeze()
    return f50, f99


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
    """Newest Serve proxy and this benchmark's replica (other Ray sessions may run too)."""
    import subprocess

    listing = subprocess.run(["ps", "-eo", "pid,args", "--sort=start_time"], check=True,
                             capture_output=True, text=True).stdout
    pids: dict[str, int] = {}
    for line in listing.splitlines():
        if "ray::ProxyActor" in line:
            pids["proxy"] = int(line.split()[0])
        elif "ServeReplica:bench" in line:
            pids["replica"] = int(line.split()[0])
    return pids


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _post(session: aiohttp.ClientSession, url: str, user: str) -> int:
    """The HTTP status, 0 for a timeout or a connection error."""
    try:
        async with session.post(url, json={"user_id": user, "k": 20}) as resp:
            await resp.read()
            return resp.status
    except (TimeoutError, aiohttp.ClientError):
        return 0


async def closed_loop(session: aiohttp.ClientSession, url: str, users: list[str],
                      concurrency: int, seconds: float) -> tuple[list[float], int, float]:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def worker(i: int) -> None:
        nonlocal errors
        n = i
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            if await _post(session, url, users[n % len(users)]) == 200:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1
            n += concurrency

    start = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return latencies, errors, len(latencies) / (time.perf_counter() - start)


async def open_loop(session: aiohttp.ClientSession, url: str, users: list[str], rps: float,
                    seconds: float) -> tuple[list[float], int, float]:
    """Latency from each request's scheduled send time; returns the achieved rate too."""
    latencies: list[float] = []
    errors = 0

    async def one(n: int, scheduled: float) -> None:
        nonlocal errors
        if await _post(session, url, users[n % len(users)]) == 200:
            latencies.append(time.perf_counter() - scheduled)
        else:
            errors += 1

    tasks = []
    start = time.perf_counter()
    for n in range(int(rps * seconds)):
        scheduled = start + n / rps
        await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
        tasks.append(asyncio.create_task(one(n, scheduled)))
    await asyncio.gather(*tasks)
    return latencies, errors, len(latencies) / (time.perf_counter() - start)


async def over_http(users: list[str], f50: float, f99: float, rates: list[float],
                    seconds: float, base: str) -> None:
    url = f"{base}/recommend"
    gc.collect()
    gc.freeze()
    gc.disable()  # no collector pauses in the load generator while it measures
    connector = aiohttp.TCPConnector(limit=128)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=30)) as session:
        await closed_loop(session, url, users, 4, 3)  # warm-up
        for c in (1, 8, 32):
            pids = serve_pids()
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            lat, errors, rps = await closed_loop(session, url, users, c, 8)
            per_request = ", ".join(
                f"{name} {1000 * (cpu_seconds(pid) - before[name]) / max(len(lat), 1):.1f}"
                for name, pid in pids.items())
            print(f"http closed loop c={c}: p50 {pct(lat, 50):.1f} ms, p99 {pct(lat, 99):.1f} ms, "
                  f"{rps:.0f} req/s, non-200 {errors}; p50 vs in-process {pct(lat, 50) / f50:.1f}x;"
                  f" CPU ms per request: {per_request}")
        for rate in rates:
            await asyncio.sleep(2)
            lat, errors, rps = await open_loop(session, url, users, rate, seconds)
            ok = pct(lat, 99) <= 50 and errors == 0 and rps >= 99.5  # 100 req/s, rounded
            print(f"http open loop {rate:.0f} req/s for {seconds:.0f}s: p50 {pct(lat, 50):.1f} ms, "
                  f"p99 {pct(lat, 99):.1f} ms, served {rps:.0f} req/s, non-200 {errors}; "
                  f"p99 vs in-process p99 {pct(lat, 99) / f99:.1f}x; "
                  f"target (p99 <= 50 ms at >= 100 req/s) {'MET' if ok else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, help="keep/reuse the built platform here")
    parser.add_argument("--rates", default="100", help="open-loop rates, comma separated")
    parser.add_argument("--seconds", type=float, default=20.0, help="open-loop duration")
    parser.add_argument("--batch-ranker", action="store_true",
                        help="rank with @serve.batch across concurrent requests")
    parser.add_argument("--throughput-optimized", action="store_true",
                        help="start Ray with RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (Ray Serve's own "
                        "same-loop / gRPC / log-buffer settings)")
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
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        settings, config_file, users = setup(workdir)
        f50, f99 = in_process(settings, users)
        serve.start(http_options={"host": "127.0.0.1", "port": PORT},
                    logging_config={"enable_access_log": False})
        app = RecommenderDeployment.options(  # type: ignore[attr-defined]
            autoscaling_config=None, num_replicas=1).bind(
            config_file=str(config_file), batch_ranker=args.batch_ranker)
        serve.run(app, name="bench", route_prefix="/", blocking=False)
        import urllib.request

        base = (f"http://127.0.0.1:{PORT}" if args.proxy
                else replica_urls("bench", host="127.0.0.1", timeout_s=180)[0])
        for _ in range(180):
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(1)
        print(f"one replica (0.5 CPU reserved), batch_ranker={args.batch_ranker}, "
              f"throughput_optimized={args.throughput_optimized}, {base}"
              f"{' (proxy)' if args.proxy else ' (replica, direct ingress as `serve up`)'}, "
              f"pid {os.getpid()}, load average {os.getloadavg()[0]:.1f}")
        rates = [float(r) for r in args.rates.split(",") if r]
        asyncio.run(over_http(users, f50, f99, rates, args.seconds, base))
        print(f"load average after: {os.getloadavg()[0]:.1f}")
        serve.shutdown()
        ray.shutdown()
    finally:
        if args.workdir is None:
            cleanup(workdir)
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
