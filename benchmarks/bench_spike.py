"""A traffic spike on a real local Ray Serve: scale-up, admission, scale-down, second by second.

Reuses the platform ``bench_serving.py`` builds (``--workdir``; built first when missing),
deploys the app as ``recsys serve up`` does (direct ingress, the local profile's autoscaling
from ``serving.*``: on ongoing requests, up to ``--max-replicas``), measures one replica's
capacity (closed loop at concurrency 2, full-path answers per second), then drives an open
loop: ``--low`` x capacity for ``--before`` s, ``--spike`` x capacity for ``--spike-s`` s, and
``--low`` again until the replicas are back to the minimum (at most ``--after`` s).

The client spreads requests round-robin over the replicas' own URLs and refreshes that list
every second (what a load balancer fed by the controller's target groups does). Latency counts
from each request's scheduled send time. Per second of scheduled send time it prints the
running replicas, the offered and served rates, the admitted p99, the share of 503s and
whether each carried ``Retry-After``; ``--plot FILE`` draws the timeline (matplotlib).

    flock /tmp/heavy.lock .venv/bin/python benchmarks/bench_spike.py \\
        --workdir /tmp/bench_serving_work --table --plot docs/serving-spike.png
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from recsys_platform.serving.ingress import direct_ingress_env, replica_urls

# The built platform and the load generator are bench_serving.py's, loaded from beside this
# file so that the script runs from any directory.
_SPEC = importlib.util.spec_from_file_location(
    "bench_serving", Path(__file__).with_name("bench_serving.py"))
assert _SPEC is not None and _SPEC.loader is not None
bench = importlib.util.module_from_spec(_SPEC)
sys.modules["bench_serving"] = bench  # its dataclasses look their module up
_SPEC.loader.exec_module(bench)

APP = "spike"
PORT = 8766


@dataclass
class Second:
    """What was sent in one second of scheduled send time, and what came back."""

    replicas: int = 0
    ongoing: float = float("nan")  # what Serve's controller autoscales on (all replicas)
    offered: int = 0
    out: bench.Outcome = field(default_factory=lambda: bench.Outcome(seconds=1.0))


def controller_ongoing() -> float:
    """The ongoing requests (all replicas, averaged over the look-back) Serve's controller
    decides on now; a private, test-only controller method: NaN where it is missing."""
    import ray
    from ray.serve._private.common import DeploymentID
    from ray.serve.context import _get_global_client

    try:
        client = _get_global_client()
        total = ray.get(client._controller._get_total_num_requests_for_deployment_for_testing
                        .remote(DeploymentID(name="recommender", app_name=APP)))
        return float(total)
    except Exception:  # noqa: BLE001 - a diagnostic column only
        return float("nan")


def running_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None:
        return 0
    states = app.deployments["recommender"].replica_states
    return int(states.get("RUNNING", 0))


async def spike_run(users: list[str], capacity: float, low: float, spike: float,
                    before_s: float, spike_s: float, after_s: float, min_replicas: int
                    ) -> list[Second]:
    urls = await asyncio.to_thread(replica_urls, APP, "127.0.0.1", 60)
    seconds: list[Second] = []
    done = asyncio.Event()
    start = time.perf_counter()
    spike_end = before_s + spike_s

    replicas_now = 1

    async def watch() -> None:
        nonlocal urls, replicas_now
        while not done.is_set():
            replicas, found, ongoing = await asyncio.gather(
                asyncio.to_thread(running_replicas),
                asyncio.to_thread(replica_urls, APP, "127.0.0.1", 5),
                asyncio.to_thread(controller_ongoing))
            urls = found or urls
            replicas_now = replicas
            second = int(time.perf_counter() - start)
            while len(seconds) <= second:
                seconds.append(Second())
            seconds[second].replicas = replicas
            seconds[second].ongoing = ongoing
            await asyncio.sleep(1.0)

    async with bench.client_session(limit=512) as session:
        async def one(n: int, scheduled: float) -> None:
            url = f"{urls[n % len(urls)]}/recommend"
            status, retry_after, cheap, server = await bench.post(session, url,
                                                                  users[n % len(users)])
            second = int(scheduled - start)
            while len(seconds) <= second:
                seconds.append(Second())
            seconds[second].out.add(status, retry_after, cheap,
                                    time.perf_counter() - scheduled, server)

        watcher = asyncio.create_task(watch())
        tasks = []
        t, n = 0.0, 0
        while True:
            if t >= spike_end + after_s:
                break
            if t >= spike_end + 10 and replicas_now <= min_replicas:
                break  # back to the minimum (and at least 10 s of the low phase seen)
            rate = capacity * (spike if before_s <= t < spike_end else low)
            scheduled = start + t
            await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
            tasks.append(asyncio.create_task(one(n, scheduled)))
            second = int(t)
            while len(seconds) <= second:
                seconds.append(Second())
            seconds[second].offered += 1
            t += 1.0 / rate
            n += 1
        await asyncio.gather(*tasks)
        done.set()
        await watcher
    for i, s in enumerate(seconds):  # a second the watcher missed shows the one before it
        if s.replicas == 0 and i:
            s.replicas = seconds[i - 1].replicas
    return seconds


def p99(values: list[float]) -> float:
    return float(np.percentile(np.asarray(values) * 1000, 99)) if values else float("nan")


def table(seconds: list[Second], before_s: float, spike_s: float) -> str:
    rows = ["| s | phase | replicas | ongoing (controller) | offered req/s | 200/s (cheaper "
            "path) | admitted p99 ms | of which in the replica (p99 ms) | 503 share | 503 p50 ms "
            "| 503 with Retry-After | other |", "|" + "---|" * 12]
    for i, s in enumerate(seconds):
        o = s.out
        phase = "spike" if before_s <= i < before_s + spike_s else "low"
        share = len(o.refused) + o.bare_503
        rows.append(f"| {i} | {phase} | {s.replicas} | {s.ongoing:.2f} | {s.offered} | "
                    f"{len(o.admitted)} "
                    f"({len(o.cheap)}) | {p99(o.admitted):.0f} | {p99(o.server):.0f} | "
                    f"{share / max(o.sent, 1):.0%} | {bench.pct(o.refused, 50):.0f} | "
                    f"{len(o.refused)}/{share} | {o.other} |")
    return "\n".join(rows)


def plot(seconds: list[Second], before_s: float, spike_s: float, path: Path,
         unloaded_p99: float, low_p99: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    x = np.arange(len(seconds))
    fig, axes = plt.subplots(4, 1, figsize=(9, 8), sharex=True)
    axes[0].step(x, [s.replicas for s in seconds], where="post", color="black")
    axes[0].set_ylabel("replicas")
    axes[0].yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].plot(x, [s.offered for s in seconds], label="offered")
    axes[1].plot(x, [len(s.out.admitted) for s in seconds], label="served (200)")
    axes[1].plot(x, [len(s.out.cheap) for s in seconds], label="of which cheaper path")
    axes[1].set_ylabel("req/s")
    axes[1].legend(loc="upper right", fontsize=8)
    axes[2].plot(x, [p99(s.out.admitted) for s in seconds], color="tab:red",
                 label="admitted p99")
    axes[2].plot(x, [p99(s.out.server) for s in seconds], color="tab:purple", linewidth=0.8,
                 label="of which in the replica (Server-Timing)")
    axes[2].axhline(2 * unloaded_p99, color="grey", linestyle="--",
                    label="2x unloaded p99 (measured before)")
    axes[2].axhline(2 * low_p99, color="grey", linestyle=":",
                    label="2x the low phases' p99 (this run)")
    axes[2].set_ylabel("ms")
    axes[2].legend(loc="upper right", fontsize=8)
    axes[3].plot(x, [(len(s.out.refused) + s.out.bare_503) / max(s.out.sent, 1)
                     for s in seconds], color="tab:orange")
    axes[3].set_ylabel("503 share")
    axes[3].set_xlabel("seconds")
    for ax in axes:
        ax.axvspan(before_s, before_s + spike_s, color="tab:red", alpha=0.08)
    fig.suptitle("spike: one replica's capacity x3 for "
                 f"{spike_s:.0f} s (shaded), Serve autoscaling on ongoing requests")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, help="bench_serving's built platform")
    parser.add_argument("--redis-url", default=bench.DEFAULT_REDIS_URL)
    # 2 on the 2-core box: a third replica only adds its start-up CPU (measured: asked for
    # during the spike, serving after it, and holding the scale-down back).
    parser.add_argument("--max-replicas", type=int, default=2)
    parser.add_argument("--low", type=float, default=0.3, help="x capacity before and after")
    parser.add_argument("--spike", type=float, default=3.0, help="x capacity in the spike")
    parser.add_argument("--before", type=float, default=10.0)
    # A replica starts in ~8-20 s on this box (bench_serving prints it): 90 s lets the second
    # one carry most of the spike.
    parser.add_argument("--spike-s", type=float, default=90.0)
    parser.add_argument("--after", type=float, default=120.0)
    parser.add_argument("--port", type=int, default=PORT, help="Serve's HTTP proxy port")
    parser.add_argument("--target-ongoing", type=float, default=0.0,
                        help="autoscaling's target_ongoing_requests for this run (default: "
                        "serving.target_ongoing_requests)")
    parser.add_argument("--plot", type=Path, help="write the timeline here (PNG)")
    parser.add_argument("--table", action="store_true",
                        help="print the per-second timeline as a Markdown table")
    parser.add_argument("--capacity", type=float, default=0.0,
                        help="one replica's capacity in req/s (default: measured first)")
    args = parser.parse_args()
    os.environ.update(direct_ingress_env(True, draining_s=1))  # as `serve up`
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import ray
    from ray import serve

    from recsys_platform.serving.app import RecommenderDeployment
    from recsys_platform.serving.deployment import deployment_options

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_spike_"))
    workdir.mkdir(parents=True, exist_ok=True)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        settings, config_file, users = bench.setup(workdir, args.redis_url)
        update: dict[str, Any] = {"max_replicas": args.max_replicas, "min_replicas": 1}
        if args.target_ongoing:  # an experiment: Serve takes a float, the setting an int
            update["target_ongoing_requests"] = args.target_ongoing
        serving = settings.serving.model_copy(update=update)
        options = deployment_options(serving)
        serve.start(http_options={"host": "127.0.0.1", "port": args.port},
                    logging_config={"enable_access_log": False})
        def deploy(autoscaling: dict[str, Any]) -> None:
            serve.run(RecommenderDeployment.options(  # type: ignore[attr-defined]
                **{**options, "autoscaling_config": autoscaling})
                .bind(config_file=str(config_file)), name=APP, route_prefix="/",
                blocking=False)

        # One replica pinned while its capacity is measured (a closed loop is load enough to
        # scale up), then the profile's autoscaling: a lightweight update of the same replica.
        deploy({**options["autoscaling_config"], "max_replicas": 1})
        url = replica_urls(APP, host="127.0.0.1", timeout_s=180)[0]
        import urllib.request

        for _ in range(180):
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(1)

        async def measure() -> tuple[float, float]:
            async with bench.client_session() as session:
                # warm-up: past the replica's first item-cache refresh and index update
                await bench.closed_loop(session, f"{url}/recommend", users, 2, 15)
                capacity = args.capacity
                if not capacity:
                    out = await bench.closed_loop(session, f"{url}/recommend", users, 2, 10)
                    capacity = len(out.full) / out.seconds
                unloaded = await bench.open_loop(session, f"{url}/recommend", users,
                                                 args.low * capacity, 15)
                return capacity, p99(unloaded.admitted)

        capacity, unloaded_p99 = asyncio.run(measure())
        deploy(options["autoscaling_config"])
        time.sleep(2)
        load_before = os.getloadavg()
        print(f"one replica: capacity {capacity:.0f} req/s (closed loop c=2, full path), "
              f"unloaded p99 {unloaded_p99:.1f} ms (open loop at {args.low:g}x); autoscaling "
              f"{options['autoscaling_config']}")
        timeline = asyncio.run(spike_run(users, capacity, args.low, args.spike, args.before,
                                         args.spike_s, args.after, 1))
        if args.table:
            print(table(timeline, args.before, args.spike_s))
        in_spike = [s for i, s in enumerate(timeline)
                    if args.before <= i < args.before + args.spike_s]
        admitted = [x for s in in_spike for x in s.out.admitted]
        # the same run's own unloaded reference: every answer of its low phases
        low = [x for i, s in enumerate(timeline)
               if not args.before <= i < args.before + args.spike_s for x in s.out.admitted]
        in_replica = [x for s in in_spike for x in s.out.server]
        refused_lat = [x for s in in_spike for x in s.out.refused]
        refused = sum(len(s.out.refused) + s.out.bare_503 for s in in_spike)
        bare = sum(s.out.bare_503 for s in timeline)
        peak = max(s.replicas for s in timeline)
        up = next((i for i, s in enumerate(timeline) if s.replicas > 1), None)
        down = next((i for i, s in enumerate(timeline)
                     if i > args.before + args.spike_s and s.replicas == 1), None)
        print(f"spike: {sum(s.offered for s in in_spike) / len(in_spike):.0f} req/s offered "
              f"({args.spike:g}x capacity), {len(admitted) / len(in_spike):.0f} req/s served, "
              f"admitted p99 {p99(admitted):.1f} ms ({p99(admitted) / unloaded_p99:.2f}x the "
              f"unloaded p99 measured before the run, {p99(admitted) / p99(low):.2f}x the "
              f"{p99(low):.1f} ms of this run's low phases; in the replica from admission p99 "
              f"{p99(in_replica):.1f} ms), "
              f"{refused} refused (p50 {bench.pct(refused_lat, 50):.1f} ms, p99 "
              f"{bench.pct(refused_lat, 99):.1f} ms) of which {bare} without Retry-After; "
              f"replicas 1 -> {peak} (first >1 at t={up}s, spike from t={args.before:g}s), "
              f"back to 1 at t={down}s (spike ended t={args.before + args.spike_s:g}s); "
              f"other answers (timeouts, connection errors) "
              f"{sum(s.out.other for s in timeline)}; load average (1/5 min) "
              f"{load_before[0]:.1f}/{load_before[1]:.1f} before the run, "
              f"{os.getloadavg()[0]:.1f}/{os.getloadavg()[1]:.1f} after")
        if args.plot:
            plot(timeline, args.before, args.spike_s, args.plot, unloaded_p99, p99(low))
            print(f"wrote {args.plot}")
        serve.shutdown()
    finally:
        ray.shutdown()
        if args.workdir is None:
            bench.cleanup(workdir, args.redis_url)
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
