"""Serving latency and throughput on loopback vs the same pipeline called in-process.

Builds a small platform end to end in a temporary data dir (generator -> platform flow: ETL,
features in Redis DB 4, training, promotion), then measures:

- the floor: ``Recommender.recommend`` called in-process (same features, same bundle, 500
  candidates, real Redis read of the user's features), one request at a time;
- the Ray Serve app over HTTP, closed loop at concurrency 1, 8 and 32 (bounded: 8 s each);
- an open loop at 100 requests/s for 10 s (the target: p99 <= 50 ms at >= 100 rps).
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis
import yaml

from recsys_pipelines.generator import GeneratorConfig, generate, write_generated
from recsys_platform.orchestration import platform_flow
from recsys_platform.serving.factory import build_recommender
from recsys_platform.serving.schemas import RecommendRequest
from recsys_platform.settings import load_settings

REDIS_URL = "redis://127.0.0.1:6379/4"
CFG = GeneratorConfig(events=150_000, days=7, users=3_000, items=6_000)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q))


async def closed_loop(client: httpx.AsyncClient, users: list[str], concurrency: int,
                      seconds: float) -> tuple[list[float], int, int]:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def worker(i: int) -> None:
        nonlocal errors
        n = i
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            resp = await client.post("/recommend", json={"user_id": users[n % len(users)],
                                                         "k": 20})
            if resp.status_code == 200:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1
            n += concurrency

    start = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return latencies, errors, int(len(latencies) / (time.perf_counter() - start))


async def open_loop(client: httpx.AsyncClient, users: list[str], rps: int,
                    seconds: float) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = 0

    async def one(n: int) -> None:
        nonlocal errors
        t0 = time.perf_counter()
        resp = await client.post("/recommend", json={"user_id": users[n % len(users)], "k": 20})
        if resp.status_code == 200:
            latencies.append(time.perf_counter() - t0)
        else:
            errors += 1

    tasks = []
    start = time.perf_counter()
    for n in range(int(rps * seconds)):
        await asyncio.sleep(max(0.0, start + n / rps - time.perf_counter()))
        tasks.append(asyncio.create_task(one(n)))
    await asyncio.gather(*tasks)
    return latencies, errors


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


def main() -> None:
    import ray
    from ray import serve

    from recsys_platform.serving.app import RecommenderDeployment

    project = f"bench_{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = {"data_dir": str(root / "data"), "redis": {"url": REDIS_URL},
                  "feast": {"project": project, "online_store": "redis",
                            "repo_path": str(root / "feature_repo"),
                            "registry_path": str(root / "data" / "feast" / "registry.db")},
                  "serving": {"candidates": 500, "poll_interval_s": 30}}
        (root / "feature_repo").mkdir()
        repo = Path(__file__).resolve().parents[1] / "feature_repo" / "definitions.py"
        (root / "feature_repo" / "definitions.py").write_text(repo.read_text())
        config_file = root / "settings.yaml"
        config_file.write_text(yaml.safe_dump(config))
        settings = load_settings("local", config_file)
        data = generate(CFG)
        write_generated(data, settings.landing_dir)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        t0 = time.perf_counter()
        run = platform_flow(start=CFG.start, end=CFG.start + timedelta(days=CFG.days - 1),
                            settings=settings, epochs=1, workers=1, why="benchmark")
        print(f"setup: platform flow {time.perf_counter() - t0:.0f}s, version {run.version}, "
              f"promoted={run.promoted}")
        users = sorted(set(data.events["user_id"].dropna()))[:500]

        recommender, cache = build_recommender(settings)
        floor: list[float] = []
        for n in range(300):
            t1 = time.perf_counter()
            recommender.recommend(RecommendRequest(user_id=users[n % len(users)], k=20),
                                  log=False)
            floor.append(time.perf_counter() - t1)
        f50, f99 = pct(floor, 50), pct(floor, 99)
        print(f"in-process floor (500 candidates, c=1): p50 {f50:.1f} ms, p99 {f99:.1f} ms")
        print("in-process stage means: " + ", ".join(
            f"{stage} {ms:.1f} ms" for stage, ms in stage_means(recommender).items()))
        recommender.manager.stop()
        cache.stop()

        serve.start(http_options={"host": "127.0.0.1", "port": 8765})
        serve.run(RecommenderDeployment.options(autoscaling_config=None, num_replicas=1)
                  .bind(config_file=str(config_file)), name="bench", route_prefix="/",
                  blocking=False)
        base = "http://127.0.0.1:8765"
        for _ in range(120):
            try:
                if httpx.get(f"{base}/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)

        async def measure() -> None:
            limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
            async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:
                await closed_loop(client, users, 4, 3)  # warm-up
                for c in (1, 8, 32):
                    lat, errors, rps = await closed_loop(client, users, c, 8)
                    print(f"http closed loop c={c}: p50 {pct(lat, 50):.1f} ms, "
                          f"p99 {pct(lat, 99):.1f} ms, {rps} req/s, non-200 {errors}; "
                          f"p50 ratio vs in-process {pct(lat, 50) / f50:.1f}x")
                lat, errors = await open_loop(client, users, 100, 10)
                print(f"http open loop 100 req/s: p50 {pct(lat, 50):.1f} ms, "
                      f"p99 {pct(lat, 99):.1f} ms, non-200 {errors} "
                      f"(target p99 <= 50 ms); p99 ratio vs in-process {pct(lat, 99) / f99:.1f}x")

        asyncio.run(measure())
        serve.shutdown()
        ray.shutdown()
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"*{project}".encode(), count=1000))
        if keys:
            client.delete(*keys)
        print(f"median floor {statistics.median(floor) * 1000:.1f} ms over {len(floor)} calls")


if __name__ == "__main__":
    main()
