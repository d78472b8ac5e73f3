"""What the sequential user tower and the neighbour table cost one request, in-process.

The request path runs the user tower once per request (``scoring.embed_user``; the ranker's
retrieval score reuses the vector) and the neighbour table twice (the neighbour candidates:
``ItemNeighbours.top``, the neighbour score of the candidates: ``score_one``). This times,
with torch on one thread as in a replica, rounds alternating so that load hits both alike:

- the sequential user tower (``TwoTowerConfig`` defaults, one user, a full history of 20)
  against the pooled-only tower it replaced (mean of the history's embeddings + user id +
  numeric features -> the same MLP width), whose difference is what the sequential encoder
  adds to a request;
- a neighbour table of ``--items`` items with 50 and with 200 neighbours per item (the old and
  the new default ``k``): ``top`` of a 20-item history and ``score_one`` of 500 candidates.

Run: ``.venv/bin/python benchmarks/bench_user_tower.py``
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from recsys_models.data import EncoderSpec
from recsys_models.neighbours import ItemNeighbours, NeighbourConfig
from recsys_models.two_tower import TwoTowerConfig, TwoTowerModel, _mlp

HISTORY = 20
CANDIDATES = 500


def _p50_ms(fn: Callable[[int], object], calls: int) -> float:
    times = []
    for n in range(calls):
        t = time.perf_counter()
        fn(n)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def _table(items: int, k: int, buckets: int, rng: np.random.Generator) -> ItemNeighbours:
    ids = rng.choice(np.arange(1, buckets), items, replace=False)
    src = np.repeat(ids, k)
    dst = ids[rng.integers(0, items, items * k)]
    matrix = sp.csr_matrix((rng.random(items * k).astype(np.float32), (src, dst)),
                           shape=(buckets, buckets))
    matrix.sum_duplicates()
    matrix.sort_indices()
    return ItemNeighbours(matrix, NeighbourConfig(k=k), ids.astype(str).astype(object), ids)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--items", type=int, default=10_000, help="neighbour table items")
    parser.add_argument("--user-features", type=int, default=18)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    spec = EncoderSpec(user_features=tuple(f"f{i}" for i in range(args.user_features)))
    cfg = TwoTowerConfig()
    tower = TwoTowerModel(spec, cfg).user_tower.eval()
    pooled_mlp = _mlp(2 * cfg.id_dim + args.user_features, cfg.hidden, cfg.dim).eval()
    users = [(torch.tensor([int(rng.integers(1, spec.user_buckets))]),
              torch.from_numpy(rng.integers(1, spec.item_buckets, (1, HISTORY))),
              torch.zeros(1, args.user_features)) for _ in range(200)]

    def sequential(n: int) -> object:
        return tower(*users[n % len(users)])

    def pooled(n: int) -> object:
        user_hash, history, user_num = users[n % len(users)]
        x = torch.cat([tower.pooled(history), tower.user_emb(user_hash), user_num], dim=1)
        return F.normalize(pooled_mlp(x), dim=1)

    tables = {k: _table(args.items, k, spec.item_buckets, rng) for k in (50, 200)}
    histories = [tables[50].buckets[rng.integers(0, args.items, HISTORY)] for _ in range(200)]
    candidates = [tables[50].buckets[rng.integers(0, args.items, CANDIDATES)]
                  for _ in range(200)]

    def top(k: int) -> Callable[[int], object]:
        return lambda n: tables[k].top(histories[n % 200], 100)

    def score(k: int) -> Callable[[int], object]:
        return lambda n: tables[k].score_one(histories[n % 200], candidates[n % 200])

    runs: dict[str, Callable[[int], object]] = {
        "user tower, sequential": sequential, "user tower, pooled only": pooled,
        "neighbour top-100, k=50": top(50), "neighbour top-100, k=200": top(200),
        "neighbour score of 500, k=50": score(50), "neighbour score of 500, k=200": score(200)}
    p50: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for fn in runs.values():
            _p50_ms(fn, 50)  # warm-up
        for _ in range(args.rounds):
            for name, fn in runs.items():
                p50[name].append(_p50_ms(fn, args.calls))
    print("| path | p50 per round (ms) | median (ms) |")
    print("|---|---|---|")
    for name, values in p50.items():
        print(f"| {name} | {' '.join(f'{v:.3f}' for v in values)} | "
              f"{statistics.median(values):.3f} |")
    med = {name: statistics.median(values) for name, values in p50.items()}
    added = med["user tower, sequential"] - med["user tower, pooled only"]
    table = {k: med[f"neighbour top-100, k={k}"] + med[f"neighbour score of 500, k={k}"]
             for k in (50, 200)}
    print(f"\nthe sequential tower adds {added:.3f} ms p50 per request (target <= 1 ms); "
          f"neighbour table k=200 vs k=50: {table[200] - table[50]:+.3f} ms")

if __name__ == "__main__":
    main()
