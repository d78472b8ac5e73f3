"""Training and ANN throughput on this machine.

Prints samples/s of the two-tower retrieval step for (1) one process, dense embeddings + Adam,
(2) one process, sparse embeddings + SparseAdam, (3) plain torch.distributed DDP (gloo, 2
processes) and (4) Ray Train TorchTrainer with 2 workers on the same model, data and loop; the
wall-time ratio (4)/(3) is the number to watch (floor: plain DDP, measured in the same run).
Then HNSW (hnswlib, M=32) build time, QPS and recall@100 against exact search.

Run: ``.venv/bin/python benchmarks/bench_train.py [--rows 1000000] [--batch 1024]``
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from recsys_models.ann import HnswIndex, recall_vs_exact
from recsys_models.data import EncoderSpec
from recsys_models.train import TrainConfig, make_optimizers, step, to_tensors
from recsys_models.two_tower import RetrievalTask, TwoTowerConfig, TwoTowerModel

SPEC = EncoderSpec(user_buckets=50_000, item_buckets=100_000, creator_buckets=5_000,
                   tag_buckets=2_000, categories=tuple(f"cat{i}" for i in range(20)))


def make_data(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    item = rng.zipf(1.2, rows) % (SPEC.item_buckets - 1) + 1
    return {
        "user_hash": rng.integers(1, SPEC.user_buckets, rows),
        "history": rng.integers(0, SPEC.item_buckets, (rows, 20)),
        "user_num": np.zeros((rows, 0), np.float32),
        "item_hash": item.astype(np.int64), "category": rng.integers(0, 21, rows),
        "creator": rng.integers(1, SPEC.creator_buckets, rows),
        "tags": rng.integers(0, SPEC.tag_buckets, (rows, 4)),
        "item_dense": rng.normal(size=(rows, 2)).astype(np.float32),
        "log_q": np.full(rows, -8.0, np.float32),
    }


def run_loop(data: dict[str, np.ndarray], cfg: TrainConfig, rank: int = 0,
             world: int = 1) -> tuple[float, int]:
    """Trains over this rank's share; returns (steady seconds after the first step, rows)."""
    torch.manual_seed(cfg.seed)
    model = TwoTowerModel(SPEC, cfg.two_tower)
    wrapped: Any = model
    if world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    task = RetrievalTask(wrapped, cfg.two_tower)
    opts = make_optimizers(model, cfg)
    n = len(data["item_hash"]) // world
    lo = rank * n
    start, rows = 0.0, 0
    for i, s in enumerate(range(lo, lo + n - cfg.batch_size + 1, cfg.batch_size)):
        b = to_tensors({k: v[s:s + cfg.batch_size] for k, v in data.items()})
        step(lambda b=b: task(b), opts)  # noqa: B023
        if i == 0:
            start = time.perf_counter()
        else:
            rows += cfg.batch_size
    return time.perf_counter() - start, rows


def _ddp_worker(rank: int, world: int, port: int, data: dict[str, np.ndarray],
                cfg: TrainConfig, out: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    seconds, rows = run_loop(data, cfg, rank, world)
    out.put((rank, seconds, rows))
    dist.destroy_process_group()


def plain_ddp(data: dict[str, np.ndarray], cfg: TrainConfig) -> tuple[float, float]:
    """Wall seconds (spawn to exit) and steady samples/s of plain gloo DDP, 2 processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    t0 = time.perf_counter()
    mp.start_processes(_ddp_worker, args=(2, port, data, cfg, queue), nprocs=2, join=True,
                       start_method="spawn")
    wall = time.perf_counter() - t0
    results = [queue.get() for _ in range(2)]
    return wall, sum(r[2] for r in results) / max(r[1] for r in results)


def _ray_func(config: dict[str, Any]) -> None:
    import tempfile

    import ray.train

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seconds, rows = run_loop(config["data"], config["cfg"], rank, world)
    with tempfile.TemporaryDirectory() as tmp:
        # Ray Train V2 fills Result.metrics only from a report that carries a checkpoint.
        checkpoint = None
        if rank == 0:
            Path(tmp, "done").write_text("1")
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"rate": world * rows / seconds}, checkpoint=checkpoint)


def ray_train(data: dict[str, np.ndarray], cfg: TrainConfig, storage: str) -> tuple[float, float]:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    try:
        ref = {"data": data, "cfg": cfg}
        t0 = time.perf_counter()
        result = TorchTrainer(
            _ray_func, train_loop_config=ref, scaling_config=ScalingConfig(num_workers=2),
            run_config=RunConfig(name=f"bench-{int(t0)}", storage_path=storage),
            torch_config=TorchConfig(backend="gloo")).fit()
        wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    return wall, float(result.metrics.get("rate", float("nan")))


def bench_ann(n_items: int, dim: int = 32, queries: int = 2000) -> None:
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(50, dim))
    emb = centers[rng.integers(0, 50, n_items)] + 0.5 * rng.normal(size=(n_items, dim))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    q = emb[rng.integers(0, n_items, queries)] + 0.3 * rng.normal(size=(queries, dim))
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    t0 = time.perf_counter()
    index = HnswIndex.build(np.arange(n_items).astype(str), emb)
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    index.search(q, 100)
    qps = queries / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    _ = q @ emb.T
    exact_qps = queries / (time.perf_counter() - t0)
    recall = recall_vs_exact(index, emb, q, 100)
    print(f"HNSW M=32 ef=200, {n_items} items: build {build:.1f}s, {qps:,.0f} QPS (1 thread), "
          f"recall@100 vs exact {recall:.3f}; exact numpy matmul {exact_qps:,.0f} QPS "
          f"(ratio {qps / exact_qps:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--storage", default="/tmp/recsys-bench-ray")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = make_data(args.rows)
    sparse = TrainConfig(batch_size=args.batch)
    dense = replace(sparse, two_tower=replace(TwoTowerConfig(), sparse=False,
                                              share_item_embeddings=True))
    for name, cfg in (("1 process, dense + Adam", dense),
                      ("1 process, sparse + SparseAdam", sparse)):
        seconds, rows = run_loop(data, cfg)
        print(f"{name}: {rows / seconds:,.0f} samples/s")
    ddp_wall, ddp_rate = plain_ddp(data, sparse)
    print(f"plain torch.distributed gloo, 2 processes: {ddp_rate:,.0f} samples/s steady, "
          f"wall {ddp_wall:.1f}s (floor)")
    ray_wall, ray_rate = ray_train(data, sparse, args.storage)
    print(f"Ray Train TorchTrainer, 2 workers: {ray_rate:,.0f} samples/s steady, wall "
          f"{ray_wall:.1f}s; Ray Train / plain DDP: wall time {ray_wall / ddp_wall:.2f}x, "
          f"steady throughput {ray_rate / ddp_rate:.2f}x")
    bench_ann(args.items)


if __name__ == "__main__":
    main()
