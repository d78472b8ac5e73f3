"""Peak memory of the evaluation's exact-search recall check, before and after chunking.

``recall_vs_exact`` compares the HNSW index with exact search for every holdout user. It used to
score all users against the whole catalog at once (a users x items float32 matrix, its negated
copy and int64 argpartition indices: 13 GB at 7,663 users x 100,562 items); it now scores
``EXACT_CHUNK`` users at a time. Each case runs in a fresh process on a synthetic catalog and
reports its peak RSS above the floor: the same process's RSS once the embeddings and the index
are in memory. ``before`` is the old code, kept here verbatim.

Run: ``.venv/bin/python benchmarks/bench_eval_memory.py --items 100000 --users 2000,8000``
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

from recsys_models.ann import HnswConfig, HnswIndex, recall_vs_exact


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _before(index: HnswIndex, embeddings: np.ndarray, queries: np.ndarray, n: int) -> float:
    """The pre-chunking ``exact_search`` + ``recall_vs_exact``, verbatim."""
    scores = queries @ embeddings.T  # (q, items)
    k = min(n, embeddings.shape[0])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(scores, top, axis=1).argsort(axis=1)[:, ::-1]
    exact = np.take_along_axis(top, order, axis=1)
    labels, _ = index.index.knn_query(queries.astype(np.float32), k=k)
    hits = [len(set(a) & set(b)) for a, b in zip(labels.tolist(), exact.tolist(), strict=True)]
    return float(np.mean(hits) / k) if hits else 0.0


def child(version: str, items: int, users: int, dim: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(items, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    queries = rng.normal(size=(users, dim)).astype(np.float32)
    index = HnswIndex.build(np.arange(items).astype(str), emb,
                            HnswConfig(m=16, ef_construction=40, ef_search=100, threads=1))
    floor = _rss_mb()
    t0 = time.perf_counter()
    recall = (_before(index, emb, queries, 100) if version == "before"
              else recall_vs_exact(index, emb, queries, 100))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"floor_mb": floor, "peak_mb": peak, "seconds": seconds, "recall": recall}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--users", default="2000,8000")
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--before-max-users", type=int, default=2000,
                        help="the old code only up to this many users (it needs ~1.6 KB per "
                             "user per 1k items)")
    parser.add_argument("--child", nargs=2, metavar=("VERSION", "USERS"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.items, int(args.child[1]), args.dim)))
        return
    print(f"catalog {args.items:,} items x {args.dim} dims; recall@100 of HNSW vs exact search")
    print("| code | holdout users | floor RSS MB | peak RSS MB | peak - floor MB | seconds "
          "| recall@100 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for users in (int(u) for u in args.users.split(",")):
        for version in ("before", "after"):
            if version == "before" and users > args.before_max_users:
                continue
            out = subprocess.run([sys.executable, __file__, "--items", str(args.items),
                                  "--dim", str(args.dim), "--child", version, str(users)],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {version} | {users:,} | {r['floor_mb']:.0f} | {r['peak_mb']:.0f} | "
                  f"{r['peak_mb'] - r['floor_mb']:.0f} | {r['seconds']:.1f} | "
                  f"{r['recall']:.4f} |")


if __name__ == "__main__":
    main()
