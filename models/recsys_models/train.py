"""Training: a ``train_func(config)`` Ray Train worker, a thin TorchTrainer driver, and an
in-process loop that shares the same step code (for notebooks, tests and single-process runs).

Two phases share one epoch counter. Retrieval epochs train the two-tower on next-item examples
(every engagement with its point-in-time history; its own dataset shard) under a warm-up +
cosine learning-rate schedule, scored after each epoch on a validation split taken by time
from the training rows; training stops after ``patience`` epochs without improvement and the
best epoch's weights are kept. Ranker epochs then train the ranker on every impression. Rank 0
writes a checkpoint every epoch (models, optimizers, phase, best weights, per-epoch metrics) and
a restarted worker group resumes from the last one (``FailureConfig``). Workers use DDP over
gloo on CPU and NCCL when ``use_gpu`` (embeddings are then dense: NCCL has no sparse all-reduce).
On CPU the sparse embedding gradients are averaged by :func:`sparse_safe_allreduce` (dense
all-gathers), not by gloo's sparse all-reduce, which corrupted the heap of a worker.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from recsys_core.atomic import atomic_write_text
from recsys_models.data import Batch, EncoderSpec, encode_items, encode_rows
from recsys_models.ddp_hooks import sparse_safe_allreduce
from recsys_models.errors import EmptyTrainingSetError, TrainingFailedError
from recsys_models.ranker import Ranker, RankerConfig, RankingTask
from recsys_models.two_tower import (
    RetrievalTask,
    TwoTowerConfig,
    TwoTowerModel,
    use_full_softmax,
)
from recsys_models.validation import (
    ValidationSet,
    ranker_validation_auc,
    validation_recall,
)

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"


@dataclass(frozen=True)
class TrainConfig:
    """What and how long to train; every field has a working default."""

    epochs: int = 8  # most retrieval epochs (early stopping usually ends sooner)
    # Most ranker epochs after the retrieval phase; with a validation set the ranker stops after
    # ranker_patience epochs without a better validation AUC and keeps its best epoch (on the
    # demo's world one epoch left it below a logistic regression, the third overfitted).
    ranker_epochs: int = 4
    ranker_patience: int = 1
    patience: int = 2  # retrieval epochs without a better validation recall before stopping
    # An epoch resets the patience only if it beats the best validation recall by this share
    # (its weights are kept whenever it is the best): the plateau after convergence is not
    # trained through (demo's world: 0.193, 0.207, 0.208, 0.207, 0.214, 0.208 from epoch 2).
    min_improvement: float = 0.01
    batch_size: int = 256  # per worker; 1024 gives demo-sized snapshots too few steps
    # The ranker phase: rows per step per worker (None: batch_size) and a factor on both
    # learning rates. Demo snapshot, 2 workers: 512 and 2 reach the validation AUC of 256 and 1
    # (0.786 vs 0.785) in half the ranker steps (fit 64 s vs 82 s); 1024 and 4: AUC 0.777.
    ranker_batch_size: int | None = 512
    ranker_lr_scale: float = 2.0
    lr: float = 3e-3  # Adam, dense parameters (peak of the schedule)
    sparse_lr: float = 3e-2  # SparseAdam, embedding tables (peak of the schedule)
    warmup: float = 0.05  # share of the retrieval steps with a linear learning-rate warm-up
    lr_floor: float = 0.5  # the cosine decay ends at this fraction of the peak
    validation_fraction: float = 0.1  # last share of the training period used to early-stop
    seed: int = 7
    two_tower: TwoTowerConfig = field(default_factory=TwoTowerConfig)
    ranker: RankerConfig = field(default_factory=RankerConfig)
    train_ranker: bool = True
    max_steps_per_epoch: int | None = None  # cap (smoke runs and the DDP check)
    shuffle_buffer: int = 20_000  # Ray Data local shuffle buffer (rows)
    # Datasets of at most this many rows per worker are read once into each worker's memory
    # and reshuffled every epoch (a full permutation); larger ones stream from Ray Data every
    # epoch through the local shuffle buffer.
    in_memory_rows: int = 2_000_000
    threads_per_worker: int = 1
    trace_dir: str | None = None  # per-worker diagnostics: heartbeat, params, rows seen

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def batch_rows(self, task: str) -> int:
        """Rows per step per worker of ``task`` (``retrieval`` or ``ranking``)."""
        return (self.ranker_batch_size or self.batch_size) if task == "ranking" \
            else self.batch_size


@dataclass
class TrainedModels:
    """The result of training, wherever it ran."""

    two_tower: TwoTowerModel
    ranker: Ranker
    spec: EncoderSpec
    cfg: TrainConfig
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per epoch
    restores: int = 0  # how many times training resumed from a checkpoint


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_models(spec: EncoderSpec, cfg: TrainConfig) -> tuple[TwoTowerModel, Ranker]:
    seed_everything(cfg.seed)
    return TwoTowerModel(spec, cfg.two_tower), Ranker(spec, cfg.ranker)


def make_optimizers(module: nn.Module, cfg: TrainConfig, lr_scale: float = 1.0
                    ) -> list[torch.optim.Optimizer]:
    """SparseAdam for sparse embedding tables, Adam for everything else (learning rates
    ``cfg.sparse_lr`` and ``cfg.lr``, times ``lr_scale``)."""
    sparse_ids: set[int] = set()
    for m in module.modules():
        if isinstance(m, nn.Embedding | nn.EmbeddingBag) and m.sparse:
            sparse_ids.add(id(m.weight))
    sparse = [p for p in module.parameters() if id(p) in sparse_ids]
    dense = [p for p in module.parameters() if id(p) not in sparse_ids]
    opts: list[torch.optim.Optimizer] = [torch.optim.Adam(dense, lr=cfg.lr * lr_scale)]
    if sparse:
        opts.append(torch.optim.SparseAdam(sparse, lr=cfg.sparse_lr * lr_scale))
    return opts


def step(loss_fn: Callable[[], Tensor], optimizers: list[torch.optim.Optimizer]) -> float:
    """One optimisation step; returns the loss value."""
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    for opt in optimizers:
        opt.step()
    return float(loss.detach())


def to_tensors(batch: dict[str, Any], device: torch.device | None = None) -> dict[str, Tensor]:
    out = {}
    for k, v in batch.items():
        t = torch.as_tensor(v)
        out[k] = t.to(device) if device is not None else t
    return out


def lr_factor(step: int, total: int, warmup: float, floor: float) -> float:
    """Linear warm-up over ``warmup * total`` steps, then cosine decay to ``floor``."""
    total = max(total, 1)
    ramp = max(int(warmup * total), 1)
    if step < ramp:
        return (step + 1) / ramp
    progress = min((step - ramp) / max(total - ramp, 1), 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + float(np.cos(np.pi * progress)))


@dataclass
class _Loops:
    """The two training tasks and their optimizers (plain or DDP-wrapped models)."""

    retrieval: RetrievalTask
    ranker: RankingTask
    retrieval_opts: list[torch.optim.Optimizer]
    ranker_opts: list[torch.optim.Optimizer]
    cfg: TrainConfig
    total_steps: int = 1  # retrieval steps the schedule spans (all epochs)
    step: int = 0  # retrieval steps taken so far
    base_lrs: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.base_lrs = [g["lr"] for o in self.retrieval_opts for g in o.param_groups]

    def _schedule(self) -> None:
        factor = lr_factor(self.step, self.total_steps, self.cfg.warmup, self.cfg.lr_floor)
        groups = [g for o in self.retrieval_opts for g in o.param_groups]
        for group, base in zip(groups, self.base_lrs, strict=True):
            group["lr"] = base * factor

    def retrieval_epoch(
        self, batches: Iterable[dict[str, Tensor]],
        on_step: Callable[[str, int, dict[str, Tensor]], None] | None = None,
    ) -> dict[str, float]:
        cap = self.cfg.max_steps_per_epoch
        self.retrieval.train()
        losses: list[float] = []
        rows = 0
        for i, b in enumerate(batches):
            if cap is not None and i >= cap:
                break
            self._schedule()
            losses.append(step(partial(self.retrieval, b), self.retrieval_opts))
            self.step += 1
            rows += len(b["item_hash"])
            if on_step:
                on_step("retrieval", i, b)
        return {"retrieval_loss": float(np.mean(losses)) if losses else float("nan"),
                "retrieval_rows": float(rows)}

    def ranker_epoch(
        self, batches: Iterable[dict[str, Tensor]],
        on_step: Callable[[str, int, dict[str, Tensor]], None] | None = None,
    ) -> dict[str, float]:
        cap = self.cfg.max_steps_per_epoch
        self.ranker.ranker.train()
        if self.ranker.catalog_emb is None:
            self.ranker.prepare()  # the two-tower is final: embed the catalog once
        losses: list[float] = []
        for i, b in enumerate(batches):
            if cap is not None and i >= cap:
                break
            losses.append(step(partial(self.ranker, b), self.ranker_opts))
            if on_step:
                on_step("ranking", i, b)
        return {"ranker_loss": float(np.mean(losses)) if losses else float("nan")}


@dataclass
class _Progress:
    """Where the two phases stand; saved in every checkpoint."""

    epoch: int = 0  # next epoch index (both phases count)
    retrieval_epochs: int = 0
    ranker_epochs: int = 0
    best: float = -1.0  # best validation recall (retrieval phase)
    best_state: dict[str, Any] | None = None  # two-tower weights of the best epoch
    bad: int = 0  # retrieval epochs since the best one
    stopped: bool = False
    ranker_best: float = -1.0  # best validation AUC (ranker phase)
    ranker_best_state: dict[str, Any] | None = None
    ranker_bad: int = 0
    ranker_stopped: bool = False

    def retrieval_done(self, cfg: TrainConfig) -> bool:
        return self.stopped or self.retrieval_epochs >= cfg.epochs

    def done(self, cfg: TrainConfig) -> bool:
        ranker_epochs = cfg.ranker_epochs if cfg.train_ranker else 0
        return self.retrieval_done(cfg) and (self.ranker_stopped
                                             or self.ranker_epochs >= ranker_epochs)

    def after_ranker_epoch(self, cfg: TrainConfig, model: nn.Module,
                           score: float | None) -> None:
        """The ranker's early-stopping bookkeeping (validation AUC); keeps its best weights."""
        self.ranker_epochs += 1
        if score is None:
            return
        if score > self.ranker_best:
            self.ranker_best, self.ranker_bad = score, 0
            self.ranker_best_state = {k: v.detach().clone()
                                      for k, v in model.state_dict().items()}
        else:
            self.ranker_bad += 1
            self.ranker_stopped = self.ranker_bad >= cfg.ranker_patience

    def after_retrieval_epoch(self, cfg: TrainConfig, model: nn.Module,
                              score: float | None) -> None:
        """Early-stopping bookkeeping; keeps a copy of the best weights."""
        self.retrieval_epochs += 1
        if score is None:  # no validation set: keep the last epoch
            return
        significant = score > self.best * (1.0 + cfg.min_improvement) or self.best <= 0
        if score > self.best:
            self.best = score
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.bad = 0 if significant else self.bad + 1
        self.stopped = self.bad >= cfg.patience

    def restore_best(self, model: nn.Module) -> None:
        if self.best_state is not None:
            model.load_state_dict(self.best_state)


def _run_epoch(loops: _Loops, progress: _Progress, two_tower: TwoTowerModel,
               ranker: Ranker, validation: ValidationSet | None,
               retrieval_batches: Callable[[], Iterable[dict[str, Tensor]]],
               ranking_batches: Callable[[], Iterable[dict[str, Tensor]]],
               on_step: Callable[[str, int, dict[str, Tensor]], None] | None = None,
               ) -> dict[str, float]:
    """One epoch of whichever phase is current; returns its metrics record (with its wall
    seconds, training and validation, as ``epoch_s``)."""
    t0 = time.perf_counter()
    if not progress.retrieval_done(loops.cfg):
        metrics = loops.retrieval_epoch(retrieval_batches(), on_step)
        score = validation_recall(two_tower, validation) if validation is not None else None
        progress.after_retrieval_epoch(loops.cfg, two_tower, score)
        metrics["phase"] = 0.0
        if score is not None:
            metrics[f"val_recall@{validation.k}"] = score  # type: ignore[union-attr]
        if progress.retrieval_done(loops.cfg):
            progress.restore_best(two_tower)
            progress.best_state = None  # it is the model's state now
    else:
        metrics = loops.ranker_epoch(ranking_batches(), on_step)
        auc = ranker_validation_auc(ranker, two_tower, validation)
        progress.after_ranker_epoch(loops.cfg, ranker, auc)
        metrics["phase"] = 1.0
        if auc is not None:
            metrics["val_auc"] = auc
        if progress.done(loops.cfg) and progress.ranker_best_state is not None:
            ranker.load_state_dict(progress.ranker_best_state)
    metrics["lr_factor"] = lr_factor(loops.step, loops.total_steps, loops.cfg.warmup,
                                     loops.cfg.lr_floor)
    metrics["epoch_s"] = time.perf_counter() - t0
    record = {"epoch": float(progress.epoch), **metrics}
    progress.epoch += 1
    return record


def _numpy_batches(data: Batch, batch_size: int, seed: int,
                   device: torch.device | None = None) -> Iterator[dict[str, Tensor]]:
    """Shuffled full batches of in-memory arrays as tensors on ``device`` (one short batch if
    there are fewer rows)."""
    n = len(data["item_hash"])
    order = np.random.default_rng(seed).permutation(n)
    for start in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
        idx = order[start:start + batch_size]
        yield to_tensors({k: v[idx] for k, v in data.items()}, device)


def _shard_arrays(shard: Any, world: int) -> Batch:
    """A worker's whole dataset shard as numpy arrays. Every rank keeps the smallest rank's
    row count, so all ranks take the same number of steps (DDP needs it)."""
    parts = list(shard.iter_batches(batch_size=65_536, batch_format="numpy"))
    size = torch.tensor([sum(len(p["item_hash"]) for p in parts)])
    if world > 1:
        torch.distributed.all_reduce(size, op=torch.distributed.ReduceOp.MIN)
    n = int(size.item())
    if not parts:
        return {}
    return {k: np.concatenate([p[k] for p in parts])[:n] for k in parts[0]}


def fit_local(
    rows: pd.DataFrame, catalog: pd.DataFrame, spec: EncoderSpec, cfg: TrainConfig,
    log_q: tuple[dict[str, float], float] | None = None,
    validation: ValidationSet | None = None,
) -> TrainedModels:
    """Trains both models in this process (same step code as the Ray Train worker).

    ``rows`` carry point-in-time ``user_history`` (see :mod:`recsys_models.sequences`);
    ``validation`` (from :func:`~recsys_models.validation.build_validation`) enables early
    stopping.
    """
    from recsys_models.data import item_log_q

    torch.set_num_threads(cfg.threads_per_worker)
    lq, default = log_q or item_log_q(rows.loc[rows["clicked"] == 1, "item_id"])
    encoded = encode_rows(rows, spec, lq, default)
    positives = {k: v[encoded["clicked"] == 1] for k, v in encoded.items()}
    if len(positives["item_hash"]) < 2:
        raise EmptyTrainingSetError("fewer than two clicked rows")
    two_tower, ranker = build_models(spec, cfg)
    steps = max(len(positives["item_hash"]) // cfg.batch_size, 1)
    if cfg.max_steps_per_epoch is not None:
        steps = min(steps, cfg.max_steps_per_epoch)
    loops = _make_loops(two_tower, ranker, two_tower, cfg, _catalog_tensors(catalog, spec, cfg),
                        total_steps=steps * cfg.epochs)
    progress, history = _Progress(), []
    while not progress.done(cfg):
        seed = cfg.seed + progress.epoch
        record = _run_epoch(loops, progress, two_tower, ranker, validation,
                            partial(_numpy_batches, positives, cfg.batch_size, seed),
                            partial(_numpy_batches, encoded, cfg.batch_rows("ranking"), seed))
        history.append(record)
        logger.info("epoch %d: %s", int(record["epoch"]), record)
    return TrainedModels(two_tower.eval(), ranker.eval(), spec, cfg, history)


def _catalog_tensors(catalog: pd.DataFrame | None, spec: EncoderSpec,
                     cfg: TrainConfig) -> dict[str, Tensor] | None:
    """Encoded catalog items for random retrieval negatives and the ranker's negatives."""
    wanted = (cfg.two_tower.random_negatives > 0 or cfg.two_tower.softmax != "sampled"
              or (cfg.train_ranker and cfg.ranker.negatives > 0))
    if catalog is None or not wanted:
        return None
    return to_tensors(encode_items(catalog, spec))


def _make_loops(two_tower: nn.Module, ranker: nn.Module, raw_two_tower: TwoTowerModel,
                cfg: TrainConfig, catalog: dict[str, Tensor] | None,
                total_steps: int = 1) -> _Loops:
    n_items = 0 if catalog is None else int(catalog["item_hash"].shape[0])
    full = use_full_softmax(cfg.two_tower, n_items)
    return _Loops(
        retrieval=RetrievalTask(two_tower, cfg.two_tower,
                                catalog if full or cfg.two_tower.random_negatives > 0 else None,
                                full=full),
        ranker=RankingTask(ranker, raw_two_tower, cfg.ranker, catalog),
        retrieval_opts=make_optimizers(raw_two_tower, cfg),
        ranker_opts=make_optimizers(ranker, cfg, cfg.ranker_lr_scale),
        cfg=cfg,
        total_steps=total_steps,
    )


# --------------------------------------------------------------------------- Ray Train worker


def checkpoint_state(two_tower: nn.Module, ranker: nn.Module, loops: _Loops,
                     progress: _Progress, history: list[dict[str, float]], restores: int
                     ) -> dict[str, Any]:
    """What a worker's checkpoint holds: both models, the optimizers, the phase bookkeeping.

    Once the retrieval phase is over its optimizers are never stepped again, so the ranker
    phase's checkpoints hold None in their place (about half the bytes: 162 MB -> 80 MB on the
    demo snapshot), as :func:`restore_loops` expects.
    """
    done = progress.retrieval_done(loops.cfg)
    return {"two_tower": two_tower.state_dict(), "ranker": ranker.state_dict(),
            "optimizers": [None if done else o.state_dict() for o in loops.retrieval_opts]
            + [o.state_dict() for o in loops.ranker_opts],
            "progress": progress, "step": loops.step, "history": history,
            "restores": restores}


def restore_loops(loops: _Loops, state: dict[str, Any]) -> None:
    """Puts a checkpoint's optimizer states and step count back (see
    :func:`checkpoint_state`); the models' weights are loaded by the caller."""
    for opt, saved in zip(loops.retrieval_opts + loops.ranker_opts, state["optimizers"],
                          strict=True):
        if saved is not None:  # None: a retrieval optimizer after the retrieval phase
            opt.load_state_dict(saved)
    loops.step = int(state["step"])


def _trace(cfg: TrainConfig, rank: int, record: dict[str, Any]) -> None:
    if cfg.trace_dir is None:
        return
    atomic_write_text(Path(cfg.trace_dir) / f"rank-{rank}.json", json.dumps(record))


def _flat_params(module: nn.Module) -> np.ndarray:
    return torch.cat([p.detach().flatten().cpu() for p in module.parameters()]).numpy()


def train_func(config: dict[str, Any]) -> None:
    """Ray Train worker: builds the models, resumes from a checkpoint, trains, reports.

    ``config`` holds ``cfg`` (:class:`TrainConfig`), ``spec`` (:class:`EncoderSpec`),
    ``catalog`` (catalog frame, for random negatives, or None), ``validation``
    (:class:`~recsys_models.validation.ValidationSet` or None) and ``retrieval_steps`` (steps
    per retrieval epoch per worker, for the schedule). Datasets ``retrieval`` and ``ranking``
    come from the trainer (encoded rows).
    """
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    cfg: TrainConfig = config["cfg"]
    spec: EncoderSpec = config["spec"]
    validation: ValidationSet | None = config.get("validation")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.threads_per_worker)
    two_tower, ranker = build_models(spec, cfg)
    loops_state: dict[str, Any] | None = None
    progress, history, restores = _Progress(), [], 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            loops_state = torch.load(Path(d) / STATE_FILE, weights_only=False)
        assert loops_state is not None
        two_tower.load_state_dict(loops_state["two_tower"])
        ranker.load_state_dict(loops_state["ranker"])
        progress = loops_state["progress"]
        history = list(loops_state["history"])
        restores = int(loops_state["restores"]) + 1
        logger.info("rank %d resumed at epoch %d", rank, progress.epoch)
    device = ray.train.torch.get_device()
    wrapped_tt = ray.train.torch.prepare_model(two_tower)
    wrapped_rk = ray.train.torch.prepare_model(ranker)
    for wrapped in (wrapped_tt, wrapped_rk):
        if isinstance(wrapped, nn.parallel.DistributedDataParallel) and device.type == "cpu":
            wrapped.register_comm_hook(None, sparse_safe_allreduce)
    catalog = _catalog_tensors(config.get("catalog"), spec, cfg)
    if catalog is not None:
        catalog = {k: v.to(device) for k, v in catalog.items()}
    steps = int(config.get("retrieval_steps") or 1)
    if cfg.max_steps_per_epoch is not None:
        steps = min(steps, cfg.max_steps_per_epoch)
    loops = _make_loops(wrapped_tt, wrapped_rk, two_tower, cfg, catalog,
                        total_steps=steps * cfg.epochs)
    if loops_state is not None:
        restore_loops(loops, loops_state)
    shards = {name: ray.train.get_dataset_shard(name) for name in ("retrieval", "ranking")}
    in_memory_names = set(config.get("in_memory", ()))  # shards small enough to hold
    in_memory: dict[str, Batch] = {}  # read on first use (a resumed ranker phase: one)

    while not progress.done(cfg):
        epoch = progress.epoch
        seen: list[np.ndarray] = []

        def on_step(task: str, i: int, b: dict[str, Tensor], epoch: int = epoch,
                    seen: list[np.ndarray] = seen) -> None:
            if task == "retrieval":
                seen.append(b["row_key"].cpu().numpy())
            _trace(cfg, rank, {"pid": os.getpid(), "epoch": epoch, "task": task, "step": i,
                               "restores": restores})

        def batches(name: str, epoch: int = epoch) -> Iterator[dict[str, Tensor]]:
            seed = cfg.seed + epoch + 1000 * rank
            if name in in_memory_names and name not in in_memory:
                in_memory[name] = _shard_arrays(shards[name], world)
            data = in_memory.get(name)
            rows = cfg.batch_rows(name)
            if data:
                return _numpy_batches(data, rows, seed, device)
            return iter(shards[name].iter_torch_batches(
                batch_size=rows, drop_last=True, device=device,
                local_shuffle_buffer_size=cfg.shuffle_buffer or None, local_shuffle_seed=seed))

        record = _run_epoch(loops, progress, two_tower, ranker, validation,
                            partial(batches, "retrieval"), partial(batches, "ranking"),
                            on_step)
        if world > 1:
            keys = [k for k in ("retrieval_loss", "ranker_loss") if k in record]
            values = torch.tensor([record[k] for k in keys])
            torch.distributed.all_reduce(values)
            record.update(zip(keys, (values / world).tolist(), strict=True))
        history.append(record)
        if cfg.trace_dir is not None:
            np.savez(Path(cfg.trace_dir) / f"rank-{rank}-epoch-{epoch}.npz",
                     params=_flat_params(two_tower),
                     row_keys=np.concatenate(seen) if seen else np.zeros(0, np.int64))
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                torch.save(checkpoint_state(two_tower, ranker, loops, progress, history,
                                            restores), Path(tmp) / STATE_FILE)
                ckpt = Checkpoint.from_directory(tmp)
            # V2: Result.metrics is only filled from reports that carry a checkpoint.
            ray.train.report({**record, "restores": float(restores)}, checkpoint=ckpt)


# --------------------------------------------------------------------------- driver


def _encode_fn(spec: EncoderSpec, log_q: dict[str, float], default: float,
               positives_only: bool) -> Callable[[pd.DataFrame], Batch]:
    def encode(frame: pd.DataFrame) -> Batch:
        if positives_only:
            frame = frame[pd.to_numeric(frame["clicked"]).fillna(0) == 1]
        return encode_rows(frame, spec, log_q, default)

    return encode


def prepare_datasets(rows: Any, spec: EncoderSpec,
                     log_q: tuple[dict[str, float], float]) -> dict[str, Any]:
    """Encodes a Ray Dataset of training rows into the two training datasets (materialized,
    so that the encoding does not compete with the training workers for CPUs)."""
    lq, default = log_q
    out = {}
    for name, positives in (("retrieval", True), ("ranking", False)):
        ds = rows.map_batches(_encode_fn(spec, lq, default, positives), batch_format="pandas",
                              batch_size=4096)
        out[name] = ds.materialize()
    if out["retrieval"].count() < 2:
        raise EmptyTrainingSetError("fewer than two clicked rows")
    return out


def fit(
    datasets: dict[str, Any], spec: EncoderSpec, cfg: TrainConfig, *,
    num_workers: int, storage_path: str, name: str, use_gpu: bool = False,
    max_failures: int = 3, catalog: pd.DataFrame | None = None,
    validation: ValidationSet | None = None,
) -> TrainedModels:
    """Runs :func:`train_func` on ``num_workers`` Ray Train workers and loads the result.

    A worker that dies restarts the group from the last epoch's checkpoint, up to
    ``max_failures`` times (Ray Train's fault tolerance; ``test_ray_train`` kills a worker).

    Raises:
        TrainingFailedError: Training ended without a checkpoint.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if use_gpu:  # NCCL cannot all-reduce sparse gradients
        cfg = replace(cfg, two_tower=replace(cfg.two_tower, sparse=False),
                      ranker=replace(cfg.ranker, sparse=False))
    rows = {name: ds.count() for name, ds in datasets.items()}
    trainer = TorchTrainer(
        train_func,
        train_loop_config={
            "cfg": cfg, "spec": spec, "catalog": catalog, "validation": validation,
            "retrieval_steps": rows["retrieval"] // (cfg.batch_size * num_workers),
            "in_memory": [name for name, n in rows.items()
                          if n <= cfg.in_memory_rows * num_workers],
        },
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": 1}),
        run_config=RunConfig(
            name=name, storage_path=storage_path,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets=datasets,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise TrainingFailedError(f"no checkpoint (error: {result.error})")
    return load_checkpoint(result.checkpoint.path, spec, cfg,
                           filesystem=result.checkpoint.filesystem)


def load_checkpoint(path: str, spec: EncoderSpec, cfg: TrainConfig,
                    filesystem: Any = None) -> TrainedModels:
    """Loads the models and the per-epoch history from a checkpoint directory."""
    from ray.train import Checkpoint

    checkpoint = Checkpoint(path=path, filesystem=filesystem)
    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, weights_only=False)
    cpu_cfg = replace(cfg, two_tower=replace(cfg.two_tower, sparse=False),
                      ranker=replace(cfg.ranker, sparse=False))
    two_tower, ranker = build_models(spec, cpu_cfg)
    two_tower.load_state_dict(state["two_tower"])
    ranker.load_state_dict(state["ranker"])
    return TrainedModels(two_tower.eval(), ranker.eval(), spec, cfg, list(state["history"]),
                         int(state["restores"]))
