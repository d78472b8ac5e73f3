"""In-process serving floor of two code versions, alternating, on one built platform.

A refactor must not slow the request path. This builds the serving benchmark's platform once
(``bench_serving.setup``: generator -> platform flow -> champion, Redis DB 4 unless
``--redis-url``), then measures ``Recommender.recommend`` (500 candidates, k=20, one request at
a time, ``log=False``, torch on one thread as in a replica) in fresh processes, the versions
alternating round by round so that load on the machine hits both alike. A version is a git
revision: it is checked out into a temporary worktree and imported first on ``PYTHONPATH``
(the venv's editable install comes after it), so both versions share this venv::

    .venv/bin/python benchmarks/bench_versions.py --before 80dab46 --after HEAD \\
        --workdir /tmp/bench-versions --rounds 3

It prints each round's p50 and CPU per request and the ratio after / before of the medians.
The measuring child imports only what every version since the serving factory has had
(settings, ``build_recommender``, ``warm_up``, ``RecommendRequest``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE_ROOTS = ("core", "platform", "pipelines", "models", "feature_repo")

# Run in a child with the version's source roots first on sys.path; prints one JSON line.
CHILD = r"""
import gc, json, sys, time
from pathlib import Path
import numpy as np
import torch
try:
    from recsys_core.settings import load_settings
except ImportError:  # versions before the ground package
    from recsys_platform.settings import load_settings
from recsys_platform.serving.factory import build_recommender, warm_up
from recsys_platform.serving.schemas import RecommendRequest
import recsys_platform.serving.recommender as where

config, users, calls = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
recommender, cache = build_recommender(load_settings("local", Path(config)))
warm_up(recommender, 20)
gc.collect()
gc.freeze()
latencies = []
c0 = time.process_time()
for n in range(calls):
    t = time.perf_counter()
    recommender.recommend(RecommendRequest(user_id=users[n % len(users)], k=20), log=False)
    latencies.append(time.perf_counter() - t)
cpu_ms = 1000 * (time.process_time() - c0) / calls
recommender.manager.stop()
cache.stop()
print(json.dumps({"p50": float(np.percentile(latencies, 50) * 1000),
                  "p99": float(np.percentile(latencies, 99) * 1000), "cpu_ms": cpu_ms,
                  "source": where.__file__}))
"""


def checkout(revision: str, into: Path) -> Path:
    """A detached worktree of ``revision`` under ``into`` (removed by the caller)."""
    path = into / revision.replace("/", "_")
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(path),
                    revision], check=True)
    return path


def measure(tree: Path, config: Path, users: list[str], calls: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(tree / r) for r in SOURCE_ROOTS),
           "RAY_DEDUP_LOGS": "0"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(config), json.dumps(users),
                          str(calls)], env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{tree.name}: the measuring process failed:\n{out.stderr[-3000:]}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    if not str(result.pop("source")).startswith(str(tree)):  # type: ignore[call-overload]
        raise RuntimeError(f"{tree.name}: imported the serving code from outside its worktree")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="git revision measured first")
    parser.add_argument("--after", default="HEAD", help="git revision compared with it")
    parser.add_argument("--workdir", type=Path, required=True,
                        help="the built platform (built now unless a previous run left it)")
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_SERVING_REDIS_URL",
                                                              "redis://127.0.0.1:6379/4"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_serving import setup

    args.workdir.mkdir(parents=True, exist_ok=True)
    _, config, users = setup(args.workdir, args.redis_url)
    users = users[:200]
    results: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="bench-versions-") as tmp:
        trees = {"before": checkout(args.before, Path(tmp)),
                 "after": checkout(args.after, Path(tmp))}
        try:
            for n in range(args.rounds):
                for name, tree in trees.items():
                    got = measure(tree, config, users, args.calls)
                    results[name].append(got)
                    revision = args.before if name == "before" else args.after
                    print(f"round {n + 1} {name:6s} ({revision}): p50 {got['p50']:.2f} ms, "
                          f"p99 {got['p99']:.2f} ms, CPU {got['cpu_ms']:.2f} ms per request",
                          flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                str(tree)], check=False)
    print("\n| measure | before (median of rounds) | after | after / before |")
    print("|---|---|---|---|")
    labels = {"p50": "p50 (ms)", "p99": "p99 (ms)", "cpu_ms": "CPU per request (ms)"}
    for key, label in labels.items():
        before = statistics.median(r[key] for r in results["before"])
        after = statistics.median(r[key] for r in results["after"])
        print(f"| {label} | {before:.2f} | {after:.2f} | {after / before:.2f}x |")


if __name__ == "__main__":
    main()
