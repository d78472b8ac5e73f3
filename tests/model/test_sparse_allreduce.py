"""The DDP hook that averages sparse embedding gradients across ranks (two real gloo ranks)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from recsys_models.ddp_hooks import sparse_safe_allreduce

WORLD = 2


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ids = nn.Embedding(50, 4, padding_idx=0, sparse=True)
        self.bag = nn.EmbeddingBag(30, 4, mode="mean", padding_idx=0, sparse=True)
        self.head = nn.Linear(8, 1)

    def forward(self, ids: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.ids(ids), self.bag(tags)], dim=1)).square().sum()


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    ids = torch.randint(0, 50, (8 + 5 * rank,), generator=g)  # ranks differ in size and rows
    if rank == 1 and step == 2:
        ids[:] = 0  # one rank's batch only padding: an empty sparse gradient on that rank
    return ids, torch.randint(0, 30, (len(ids), 3), generator=g)


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    model = _Model()
    reference = _Model()
    reference.load_state_dict(model.state_dict())
    ddp = nn.parallel.DistributedDataParallel(model)
    ddp.register_comm_hook(None, sparse_safe_allreduce)
    errors = []
    for step in range(4):
        ddp.zero_grad(set_to_none=True)
        ddp(*_batch(rank, step)).backward()
        reference.zero_grad(set_to_none=True)  # the mean of both ranks' gradients, by hand
        for r in range(WORLD):
            (reference(*_batch(r, step)) / WORLD).backward()
        for got, want in zip(model.parameters(), reference.parameters(), strict=True):
            assert got.grad is not None and want.grad is not None
            g, w = got.grad, want.grad
            errors.append(float((g.to_dense() - w.to_dense()).abs().max()))
            assert g.is_sparse == w.is_sparse
    torch.save(errors, Path(out) / f"rank-{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_hook_gives_the_mean_of_dense_and_sparse_gradients(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD)
    for rank in range(WORLD):
        errors = torch.load(tmp_path / f"rank-{rank}.pt")
        assert len(errors) == 4 * 4  # 4 steps x (ids, bag, head weight, head bias)
        assert max(errors) < 1e-6, errors
