"""The platform at 10k, 100k and 1M items, end to end on one machine: what grows with what.

For each size the project's generator makes a catalog (users and events scaled with it, as
issue 13 tried them) and the real stages run one after another, each timed:

generate -> ETL (Prefect flow) -> batch features (Ray Data) -> materialize (Feast, online
Redis) -> training-set build -> training (one epoch; its item embedding and HNSW build are
timed inside the bundle build) -> evaluate + register -> champion alias -> one Ray Serve
replica (start time to ``/readyz``, RSS after warm-up) -> ``POST /recommend`` with 500
candidates: a closed loop measures the replica's capacity, then an open loop at 100 req/s, or
at 80% of the capacity where that is below 125 req/s (the rule applied is printed).

Redis is a private ``redis-server`` (``--port``, no persistence) so a million items do not
fill a shared one. Speeds are only comparable within one run: the table prints each figure's
growth ratio against the smallest size of the same run. Run it under the heavy lock::

    redis-server --port 6405 --save "" --appendonly no --daemonize yes
    flock /tmp/heavy.lock .venv/bin/python benchmarks/bench_scale.py --sizes 10k,100k \\
        --redis redis://127.0.0.1:6405/0 --out /tmp/scale.json

The run sets environment defaults for every size (:data:`SCALE_SETTINGS`, printed at the
start; an exported value wins): id tables sized from the training rows instead of hashed
(``RECSYS_TRAINING__ITEM_VOCAB_CAP=1000000``, ``USER_VOCAB_CAP=200000``; the table sizes are
recorded as ``item_table_rows``, ``item_vocabulary``, ...), the evaluation baselines off
(``--baselines`` keeps them) and the evaluation and the promotion gate on 10,000 holdout
users (``evaluation.max_users``).

Issue 13's acceptance is printed at the end, PASS or FAIL per size: the whole sequence
(``pipeline_s``: generate through the gate's promotion, plus ``replica_start_s``) within 60
minutes, no process of the run above 12 GiB RSS (a thread reads ``/proc`` every 2 s: this
process, all its descendants, i.e. every Ray process, and the private Redis; each process's
peak is in ``process_peaks`` with the stage it was in), materialization >= 20k rows/s,
p99 <= 50 ms, replica RSS <= 3 GiB, recall@100 of the index >= 0.95, and p99 of each larger
size / p99 of the smallest <= 1.5. The results are written to ``--out`` after every stage;
``--resume`` continues a failed run from the stages it recorded (``--rerun-serving`` measures
the serving of every size again).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import resource
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import numpy as np
from bench_common import write_platform_config

from recsys_core.settings import Settings, load_settings
from recsys_pipelines.generator import GeneratorConfig, generate, write_generated

logger = logging.getLogger("bench_scale")

SIZES: dict[str, GeneratorConfig] = {  # issue 13's sizes
    "10k": GeneratorConfig(items=10_000, users=5_000, events=200_000, days=7),
    "100k": GeneratorConfig(items=100_000, users=50_000, events=1_000_000, days=7),
    "1M": GeneratorConfig(items=1_000_000, users=200_000, events=2_000_000, days=7),
}
FULL_RATE = 100.0  # req/s of the acceptance test
CAPACITY_RULE = 125.0  # below this measured capacity the rate is 80% of it
# issue 13's acceptance limits
SEQUENCE_LIMIT_S = 3600.0  # generate -> ... -> promote -> a replica serving
PROCESS_RSS_LIMIT_GIB = 12.0  # any process of the run, Ray workers and Redis included
MATERIALIZE_RATE = 20_000.0  # rows/s
P99_LIMIT_MS = 50.0
P99_RATIO_LIMIT = 1.5  # p99 of the largest size / p99 of the smallest, same run
REPLICA_RSS_LIMIT_GIB = 3.0
RECALL_MIN = 0.95
PIPELINE_STAGES = ("generate_s", "etl_s", "features_s", "materialize_s", "training_set_s",
                   "train_register_s", "promote_s")
SERVING_KEYS = ("replica_start_s", "capacity_rps", "rate_rps", "rate_rule", "p50_ms",
                "p99_ms", "non_200", "replica_rss_gib")
# Environment defaults of every size (an exported value wins), printed at the start.
SCALE_SETTINGS = (
    ("RECSYS_TRAINING__ITEM_VOCAB_CAP", "1000000",
     "id tables sized from the training rows: 1M items do not share 100k hashed rows"),
    ("RECSYS_TRAINING__USER_VOCAB_CAP", "200000", "the same for users"),
    ("RECSYS_EVALUATION__BASELINES", "false",
     "EASE and ALS are quality references, not part of the sequence; ALS fits 5 times on one"
     " thread (hours at 1M items); --baselines turns them on"),
    ("RECSYS_EVALUATION__MAX_USERS", "10000",
     "the evaluation and the gate's re-evaluation score the final list of at most 10,000"
     " holdout users, chosen by user-id hash (1M items: 15.9k holdout users, ~6 min per"
     " evaluation at 10k)"),
)


@dataclass
class Stage:
    seconds: float
    peak_rss_gib: float  # this process's peak RSS so far


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def rss_gib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


class RssSampler:
    """Peak RSS of every process of the run, by name, read from ``/proc`` every ``interval``
    seconds in a thread: this process, all its descendants (Ray's raylet, GCS, workers, Train
    workers, the Serve controller and replica) and the private ``redis-server``. A Ray worker
    is named by its process title (``ray::IDLE``, ``ray::_map_task``, ...), which changes with
    the task it runs: each process's peak is recorded with the title it had then and the
    stage. This process's own figure also takes its ``ru_maxrss`` (peaks between samples)."""

    def __init__(self, redis_port: int | None, interval: float = 2.0) -> None:
        self.redis_port, self.interval = redis_port, interval
        self.stage = "start"
        self.peaks: dict[int, dict[str, Any]] = {}  # pid -> gib, name, stage
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception:  # a sampler must not end the run; the next sample retries
                logger.exception("RSS sample failed")

    def sample(self) -> None:
        me = os.getpid()
        procs: dict[int, tuple[int, str, int]] = {}  # pid -> (ppid, name, rss kB)
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                status = Path(entry.path, "status").read_text()
                argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
            except OSError:  # gone meanwhile
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            rss = int(fields.get("VmRSS", "0 kB").split()[0])
            procs[int(entry.name)] = (int(fields["PPid"]), _process_name(argv, fields), rss)
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in procs.items():
            children.setdefault(ppid, []).append(pid)
        mine, todo = set(), [me]
        while todo:
            pid = todo.pop()
            if pid not in mine:
                mine.add(pid)
                todo += children.get(pid, [])
        if self.redis_port is not None:
            mine |= {p for p, (_, name, _) in procs.items()
                     if name.startswith("redis-server") and f":{self.redis_port}" in name}
        for pid in mine & procs.keys():
            _, name, rss = procs[pid]
            gib = rss / 2**20
            if pid == me:
                gib = max(gib, peak_rss_gib())
            if gib > self.peaks.get(pid, {}).get("gib", -1.0):
                self.peaks[pid] = {"gib": gib, "name": name, "stage": self.stage}

    def by_size(self) -> list[dict[str, Any]]:
        """Each process's peak, largest first."""
        return sorted(({"pid": pid, **peak} for pid, peak in self.peaks.items()),
                      key=lambda p: -p["gib"])


def _process_name(argv: list[bytes], fields: dict[str, str]) -> str:
    """A readable name: the process title of Ray workers (``ray::...``), ``python <script or
    module>`` for Python, else the first argument (``redis-server 127.0.0.1:6405``)."""
    words = [a.decode(errors="replace") for a in argv if a]
    if not words:
        return fields.get("Name", "?").strip()
    first = words[0].strip()
    if first.startswith("ray::"):
        return first[:60]
    if first.startswith("redis-server"):
        return " ".join(w.strip() for w in words)[:60]
    if Path(first).name.startswith("python"):
        rest = [w for w in words[1:] if not w.startswith("-")]
        return f"python {Path(rest[0]).name if rest else ''}".strip()[:60]
    return Path(first).name[:60]


SAMPLER: RssSampler | None = None  # the run's sampler (stages are named by timed())
CHECKPOINT: list[Callable[[], None]] = []  # writes the results so far (--out)


def checkpoint() -> None:
    for save in CHECKPOINT:
        save()


def timed(results: dict[str, Any], name: str, fn: Callable[[], Any]) -> Any:
    if SAMPLER is not None:
        SAMPLER.stage = f"{results.get('size', '?')} {name.removesuffix('_s')}"
    t0 = time.perf_counter()
    value = fn()
    results[name] = time.perf_counter() - t0
    logger.info("%s: %.1f s (peak RSS %.2f GiB)", name, results[name], peak_rss_gib())
    return value


def write_config(workdir: Path, redis_url: str, size: str) -> Settings:
    return load_settings("local", write_platform_config(workdir, redis_url,
                                                        f"scale_{size.lower()}"))


def data_path(settings: Settings, cfg: GeneratorConfig, out: dict[str, Any]
              ) -> tuple[list[str], tuple[datetime, datetime]]:
    """Generate, ETL flow, batch features and materialization of one size, each timed; returns
    sample users for the serving load and the materialized window."""
    from recsys_pipelines import batch_features, feature_store
    from recsys_platform.flows.data import etl_flow
    from recsys_platform.runtime import ensure_ray

    data = timed(out, "generate_s", lambda: generate(cfg))
    write_generated(data, settings.landing_dir)
    users = sorted(set(data.events["user_id"].dropna().astype(str)))[:500]
    out["events"] = len(data.events)
    del data
    gc.collect()
    start, end = cfg.start, cfg.start + timedelta(days=cfg.days - 1)
    ensure_ray(settings)  # batch features (and the ETL with ray.etl) run on Ray
    timed(out, "etl_s", lambda: etl_flow(start=start, end=end, settings=settings))
    tables = timed(out, "features_s", lambda: batch_features.compute_features(
        settings.lake_dir, start, end))
    batch_features.write_feature_tables(tables, feature_store.offline_dir(settings))
    del tables
    gc.collect()
    feature_store.apply_definitions(settings)
    window = (batch_features.day_end(start).to_pydatetime(),
              batch_features.day_end(end).to_pydatetime())
    result = timed(out, "materialize_s", lambda: feature_store.materialize(settings, *window))
    out["materialized_rows"] = result.rows
    out["materialize_rows_per_s"] = result.rows / max(out["materialize_s"], 1e-9)
    return users, window


def bundle_sizes(bundle: Any, out: dict[str, Any]) -> None:
    from recsys_models.bundle import save_bundle
    from recsys_models.registry import bundle_size_stats

    with tempfile.TemporaryDirectory() as tmp:
        sizes = bundle_size_stats(bundle, save_bundle(bundle, Path(tmp) / "b"))
    out["bundle_mib"] = sizes["bundle_bytes"] / 2**20
    out["index_mib"] = sizes["index_bytes"] / 2**20
    out["replica_memory_estimate_gib"] = sizes["replica_memory_estimate_bytes"] / 2**30
    out |= bundle.spec.table_sizes()  # id tables: hashed, or vocabulary + tail (training.*)


def promote_challenger(settings: Settings, snapshot_id: str, out: dict[str, Any]) -> None:
    """``recsys models promote``'s path: the snapshot split again, the challenger loaded from
    MLflow and evaluated on the holdout (the whole gate), then ``champion`` moved. Forced:
    one epoch on synthetic data need not beat popularity, and speed, not quality, is measured
    here; the gate's reasons are recorded."""
    from recsys_models.registry import promote
    from recsys_models.workflow import split_snapshot

    def run() -> Any:
        split = split_snapshot(settings, snapshot_id)
        return promote(settings, split.train_labels, split.holdout, why="bench_scale",
                       force=True)

    result = timed(out, "promote_s", run)
    out["gate_reasons"] = result.reasons


def make_champion(settings: Settings, version: str) -> None:
    """The champion alias without the quality gate (speed, not quality, is measured here)."""
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=settings.mlflow_tracking_uri,
                 registry_uri=settings.mlflow_tracking_uri).set_registered_model_alias(
        settings.mlflow.model_name, "champion", version)


def pipeline(settings: Settings, cfg: GeneratorConfig, out: dict[str, Any]) -> list[str]:
    """Every offline stage of one size; returns sample users for the serving load. Stages
    already in ``out`` (``--resume``) are not run again."""
    from recsys_pipelines import feature_store
    from recsys_pipelines.training_set import build_snapshot

    if "materialize_s" in out:  # --resume: the data path of this size is done
        users = out["sample_users"]
    else:
        users, _ = data_path(settings, cfg, out)
        out["sample_users"] = users
        checkpoint()
    if "training_set_s" in out:
        snapshot_id = out["snapshot_id"]
    else:
        snapshot_id, out["training_rows"] = timed(out, "training_set_s", lambda: build_snapshot(
            settings, feature_store.load_store(settings), None, None))
        out["snapshot_id"] = snapshot_id
        checkpoint()
    if "train_register_s" not in out:
        train_register(settings, snapshot_id, out)
        checkpoint()
    if "promote_s" not in out:
        promote_challenger(settings, snapshot_id, out)
        checkpoint()
    out["pipeline_peak_rss_gib"] = peak_rss_gib()
    return users


def train_register(settings: Settings, snapshot_id: str, out: dict[str, Any]) -> None:
    """One training epoch (then the ranker's), bundle, evaluation and registration, timed."""
    from recsys_models.train import TrainConfig
    from recsys_models.workflow import train_evaluate_register

    outcome = timed(out, "train_register_s", lambda: train_evaluate_register(
        settings, TrainConfig(epochs=1), snapshot_id=snapshot_id, workers=1))
    out["train_epoch_s"] = outcome.seconds.get("fit")
    out["evaluate_s"] = outcome.seconds.get("evaluate")
    out["register_s"] = outcome.seconds.get("register")
    out["prepare_s"] = outcome.seconds.get("prepare")  # split, encoder spec, datasets
    out["bundle_neighbours_s"] = outcome.seconds.get("baselines")  # bundle, neighbours, blend
    stats = outcome.bundle.build_stats
    out["embed_items_s"] = stats.get("embed_items_s")
    out["index_build_s"] = stats.get("index_build_s")
    out["catalog_items"] = int(stats.get("items", 0))
    out["recall_at_100_vs_exact"] = outcome.report.metrics.get("ann/recall@100")
    bundle_sizes(outcome.bundle, out)
    out["holdout_users"] = outcome.report.metrics.get("holdout/users")
    out["holdout_all_users"] = outcome.report.metrics.get("holdout/all_users")
    assert outcome.registered is not None
    del outcome
    gc.collect()


def pipeline_reusing_model(settings: Settings, cfg: GeneratorConfig, out: dict[str, Any],
                           model_settings: Settings) -> list[str]:
    """The catalog-sized stages only, for a size whose training does not fit the time: the
    data path (generate, ETL, features, materialize) as :func:`pipeline`, then the models of
    an already trained size (its champion) embed THIS catalog and index it (item embedding,
    HNSW build, bundle size, recall@100 vs exact), registered here as the champion."""
    import pandas as pd
    from mlflow import MlflowClient

    from recsys_models.ann import recall_vs_exact
    from recsys_models.bundle import build_bundle
    from recsys_models.provenance import load_verified
    from recsys_models.registry import register_bundle

    users, window = data_path(settings, cfg, out)
    name = model_settings.mlflow.model_name
    client = MlflowClient(tracking_uri=model_settings.mlflow_tracking_uri,
                          registry_uri=model_settings.mlflow_tracking_uri)
    version = client.get_model_version_by_alias(name, "champion").version
    trained = load_verified(model_settings.mlflow_tracking_uri, name, str(version),
                            model_settings.path(model_settings.mlflow.artifact_location))
    catalog = pd.read_parquet(settings.lake_dir / "catalog" / "items.parquet")
    bundle = build_bundle(trained.two_tower, trained.ranker, trained.spec, catalog,
                          set(catalog["item_id"].astype(str)), version=f"scale-{cfg.items}",
                          feature_service=trained.feature_service, snapshot_id="none",
                          as_of=pd.Timestamp(window[1]))
    stats = bundle.build_stats
    out["embed_items_s"] = stats.get("embed_items_s")
    out["index_build_s"] = stats.get("index_build_s")
    out["catalog_items"] = int(stats.get("items", 0))
    queries = bundle.encode_users(pd.DataFrame({"user_id": users}))
    out["recall_at_100_vs_exact"] = recall_vs_exact(bundle.index, bundle.item_embeddings,
                                                    queries, 100)
    bundle_sizes(bundle, out)
    registered = register_bundle(settings, bundle, run_name=f"scale-{cfg.items}")
    make_champion(settings, str(registered.version))
    del bundle, trained
    gc.collect()
    out["pipeline_peak_rss_gib"] = peak_rss_gib()
    out["model_from"] = f"{model_settings.data_dir} champion v{version} (not retrained)"
    return users


async def _post(session: aiohttp.ClientSession, url: str, user: str) -> int:
    try:
        async with session.post(url, json={"user_id": user, "k": 20}) as resp:
            await resp.read()
            return resp.status
    except (TimeoutError, aiohttp.ClientError):
        return 0


async def load(url: str, users: list[str], seconds: float, out: dict[str, Any]) -> None:
    """Capacity (closed loop, 8 in flight), then the open loop at the rule's rate."""
    gc.collect()
    gc.disable()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=128),
                                     timeout=aiohttp.ClientTimeout(total=30)) as session:
        done = 0
        deadline = time.perf_counter() + 8

        async def worker(i: int) -> None:
            nonlocal done
            n = i
            while time.perf_counter() < deadline:
                if await _post(session, url, users[n % len(users)]) == 200:
                    done += 1
                n += 8

        await asyncio.gather(*(worker(i) for i in range(4)))  # warm-up
        done, deadline = 0, time.perf_counter() + 10
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(8)))
        capacity = done / (time.perf_counter() - t0)
        rate = FULL_RATE if capacity >= CAPACITY_RULE else 0.8 * capacity
        rule = (f"100 req/s (capacity {capacity:.0f} >= {CAPACITY_RULE:.0f} req/s)"
                if capacity >= CAPACITY_RULE else
                f"80% of the measured capacity {capacity:.0f} req/s = {rate:.0f} req/s "
                f"(capacity < {CAPACITY_RULE:.0f} req/s)")
        print(f"  open-loop rate rule: {rule}")
        latencies: list[float] = []
        errors = 0

        async def one(n: int, scheduled: float) -> None:
            nonlocal errors
            if await _post(session, url, users[n % len(users)]) == 200:
                latencies.append(time.perf_counter() - scheduled)
            else:
                errors += 1

        await asyncio.sleep(2)
        tasks = []
        start = time.perf_counter()
        for n in range(int(rate * seconds)):
            scheduled = start + n / rate
            await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
            tasks.append(asyncio.create_task(one(n, scheduled)))
        await asyncio.gather(*tasks)
    gc.enable()
    ms = np.asarray(latencies) * 1000
    out.update({"capacity_rps": capacity, "rate_rps": rate, "rate_rule": rule,
                "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
                "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
                "non_200": errors})


def serve_size(settings: Settings, config_file: Path, users: list[str], seconds: float,
               out: dict[str, Any]) -> None:
    """One replica of the real deployment: start time, RSS after warm-up, latency."""
    from ray import serve

    from recsys_platform.serving.app import RecommenderDeployment
    from recsys_platform.serving.ingress import replica_urls

    if SAMPLER is not None:
        SAMPLER.stage = f"{out['size']} serve"
    t0 = time.perf_counter()
    app = RecommenderDeployment.options(  # type: ignore[attr-defined]
        autoscaling_config=None, num_replicas=1).bind(config_file=str(config_file))
    serve.run(app, name="scale", route_prefix="/", blocking=False)
    base = replica_urls("scale", host="127.0.0.1", timeout_s=600)[0]
    while True:
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.perf_counter() - t0 > 900:
            raise TimeoutError("replica not ready in 15 min")
        time.sleep(0.5)
    out["replica_start_s"] = time.perf_counter() - t0
    if SAMPLER is not None:
        SAMPLER.stage = f"{out['size']} load"
    asyncio.run(load(f"{base}/recommend", users, seconds, out))
    pid = replica_pid()
    out["replica_rss_gib"] = rss_gib(pid) if pid else None
    serve.delete("scale")


def replica_pid() -> int | None:
    listing = subprocess.run(["ps", "-eo", "pid,args", "--sort=start_time"], check=True,
                             capture_output=True, text=True).stdout
    pids = [int(line.split()[0]) for line in listing.splitlines() if "ServeReplica:scale" in line]
    return pids[-1] if pids else None


ROWS = [("events", "events", "{:,.0f}"), ("ETL", "etl_s", "{:.0f} s"),
        ("batch features", "features_s", "{:.0f} s"),
        ("materialize", "materialize_s", "{:.0f} s"),
        ("materialize rate", "materialize_rows_per_s", "{:,.0f} rows/s"),
        ("training-set build", "training_set_s", "{:.0f} s"),
        ("train (1 epoch)", "train_epoch_s", "{:.0f} s"),
        ("bundle + neighbours + blend", "bundle_neighbours_s", "{:.0f} s"),
        ("evaluate", "evaluate_s", "{:.0f} s"),
        ("holdout users evaluated", "holdout_users", "{:,.0f}"),
        ("register", "register_s", "{:.0f} s"),
        ("promote (gate re-evaluates)", "promote_s", "{:.0f} s"),
        ("item embedding", "embed_items_s", "{:.1f} s"),
        ("HNSW build (all cores)", "index_build_s", "{:.1f} s"),
        ("bundle size", "bundle_mib", "{:.0f} MiB"), ("index size", "index_mib", "{:.0f} MiB"),
        ("recall@100 index vs exact", "recall_at_100_vs_exact", "{:.3f}"),
        ("pipeline peak RSS (driver)", "pipeline_peak_rss_gib", "{:.2f} GiB"),
        ("largest process peak RSS", "max_process_rss_gib", "{:.2f} GiB"),
        ("replica start", "replica_start_s", "{:.0f} s"),
        ("whole sequence (generate -> serving)", "sequence_s", "{:.0f} s"),
        ("replica RSS after warm-up", "replica_rss_gib", "{:.2f} GiB"),
        ("replica capacity (c=8)", "capacity_rps", "{:.0f} req/s"),
        ("open-loop rate", "rate_rps", "{:.0f} req/s"),
        ("POST /recommend p50", "p50_ms", "{:.1f} ms"),
        ("POST /recommend p99", "p99_ms", "{:.1f} ms"),
        ("non-200", "non_200", "{:.0f}")]


def table(results: dict[str, dict[str, Any]], sizes: list[str]) -> str:
    """Markdown: one row per figure, one column per size, growth vs the smallest size."""
    base = sizes[0]
    head = "| stage | " + " | ".join([*sizes, *(f"{base} -> {s}" for s in sizes[1:])]) + " |"
    lines = [head, "|" + "---|" * (2 * len(sizes))]
    for label, key, fmt in ROWS:
        cells = []
        for s in sizes:
            value = results.get(s, {}).get(key)
            cells.append(fmt.format(value) if isinstance(value, int | float) else "not run")
        ratios = []
        for s in sizes[1:]:
            a, b = results.get(base, {}).get(key), results.get(s, {}).get(key)
            ok = isinstance(a, int | float) and isinstance(b, int | float) and a
            ratios.append(f"x{b / a:.1f}" if ok else "-")
        lines.append(f"| {label} | " + " | ".join([*cells, *ratios]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10k,100k", help="of " + ",".join(SIZES))
    parser.add_argument("--redis", default="redis://127.0.0.1:6405/0",
                        help="a private Redis (its DB is used by this run only)")
    parser.add_argument("--workdir", type=Path, help="data of every size (default: a temp dir)")
    parser.add_argument("--seconds", type=float, default=20.0, help="open-loop duration")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument("--reuse-model", type=Path, metavar="SETTINGS_YAML",
                        help="skip the training-set build and training: embed and index each "
                        "size's catalog with this platform's champion models")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run of --out in --workdir: sizes and stages "
                        "recorded there are not run again (the private Redis must still hold "
                        "its data); the sequence time is then the sum of the stage times")
    parser.add_argument("--rerun-serving", action="store_true",
                        help="with --resume: measure serving again for every size (one "
                        "run's p99 ratio)")
    parser.add_argument("--baselines", action="store_true",
                        help="also tune EASE and ALS in the evaluation (off by default)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for key, value, why in SCALE_SETTINGS:
        if key == "RECSYS_EVALUATION__BASELINES" and args.baselines:
            continue
        os.environ.setdefault(key, value)
        print(f"  {key}={os.environ[key]}: {why}")
    from recsys_platform.serving.ingress import direct_ingress_env

    os.environ.update(direct_ingress_env(True, draining_s=1))  # as `recsys serve up`
    import ray
    from ray import serve

    global SAMPLER
    sizes = [s for s in args.sizes.split(",") if s]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_scale_"))
    if args.resume and not (args.out and args.workdir and args.out.is_file()):
        parser.error("--resume needs --workdir and an existing --out")
    results: dict[str, dict[str, Any]] = (json.loads(args.out.read_text()) if args.resume
                                          else {})
    if args.out:
        CHECKPOINT.append(lambda: args.out.write_text(json.dumps(results, indent=2,
                                                                 default=str)))
    SAMPLER = RssSampler(urlsplit(args.redis).port).start()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 0},
                logging_config={"enable_access_log": False})
    try:
        for size in sizes:
            out: dict[str, Any] = results.setdefault(size, {"size": size})
            folder = workdir / size
            if not args.resume:
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(parents=True)
                settings = write_config(folder, args.redis, size)
            else:
                settings = load_settings("local", folder / "settings.yaml")
            resumed = args.resume and "generate_s" in out
            if resumed and "sequence_s" in out and not args.rerun_serving:
                continue  # done in the run resumed
            earlier: list[dict[str, Any]] = []
            if resumed:
                out.setdefault("resumed", []).append(sorted(k for k in out if k.endswith("_s")))
                earlier = out.pop("process_peaks", [])
                out["process_peaks_earlier_run"] = earlier
                for key in ("pipeline_s", "sequence_s", *(SERVING_KEYS if args.rerun_serving
                                                          else ())):
                    out.pop(key, None)
            SAMPLER.peaks = {}
            t0 = time.perf_counter()
            try:
                users = (pipeline_reusing_model(settings, SIZES[size], out,
                                                load_settings("local", args.reuse_model))
                         if args.reuse_model else pipeline(settings, SIZES[size], out))
                # resumed: the sum of the stages (each measured once, in one run or the other)
                out["pipeline_s"] = (sum(out.get(k) or 0.0 for k in PIPELINE_STAGES)
                                     if resumed else time.perf_counter() - t0)
                serve_size(settings, folder / "settings.yaml", users, args.seconds, out)
            finally:  # a failed run keeps its peaks for --resume
                SAMPLER.sample()
                out["process_peaks"] = SAMPLER.by_size()
                checkpoint()
            # generate -> ... -> promote, then deploy until /readyz (the load is the benchmark)
            out["sequence_s"] = out["pipeline_s"] + out["replica_start_s"]
            top = max([*out["process_peaks"], *earlier], key=lambda p: p["gib"])
            out["max_process"] = f"{top['name']} (pid {top['pid']}, {top['stage']})"
            out["max_process_rss_gib"] = top["gib"]
            print(f"{size}: {json.dumps(out, default=str)}", flush=True)
            checkpoint()
    finally:
        serve.shutdown()
        ray.shutdown()
        SAMPLER.stop()
    print(table(results, sizes))
    for line in acceptance(results, sizes):
        print(line)


def acceptance(results: dict[str, dict[str, Any]], sizes: list[str]) -> list[str]:
    """Issue 13's acceptance points, PASS or FAIL with the figures (1M: the largest size)."""

    def check(ok: bool | None, text: str) -> str:
        return f"{'n/a ' if ok is None else 'PASS' if ok else 'FAIL'} {text}"

    lines = ["acceptance (issue 13):"]
    for size in sizes:
        r = results.get(size, {})
        if "sequence_s" not in r:
            lines.append(check(False, f"{size}: the sequence did not complete"))
            continue
        lines.append(check(r["sequence_s"] <= SEQUENCE_LIMIT_S,
                           f"{size}: whole sequence {r['sequence_s'] / 60:.1f} min "
                           f"(<= {SEQUENCE_LIMIT_S / 60:.0f} min)"))
        lines.append(check(r["max_process_rss_gib"] <= PROCESS_RSS_LIMIT_GIB,
                           f"{size}: largest process {r['max_process']!r} "
                           f"{r['max_process_rss_gib']:.2f} GiB RSS "
                           f"(<= {PROCESS_RSS_LIMIT_GIB:.0f} GiB)"))
        rate = r.get("materialize_rows_per_s", 0.0)
        lines.append(check(rate >= MATERIALIZE_RATE, f"{size}: materialization "
                           f"{rate:,.0f} rows/s, {r.get('materialized_rows', 0):,} rows "
                           f"(>= {MATERIALIZE_RATE:,.0f})"))
        p99 = r.get("p99_ms")
        lines.append(check(p99 is not None and p99 <= P99_LIMIT_MS,
                           f"{size}: POST /recommend p99 {p99 or float('nan'):.1f} ms at "
                           f"{r.get('rate_rps', 0):.0f} req/s ({r.get('rate_rule')}), "
                           f"{r.get('non_200')} non-200 (<= {P99_LIMIT_MS:.0f} ms)"))
        rss = r.get("replica_rss_gib")
        lines.append(check(rss is not None and rss <= REPLICA_RSS_LIMIT_GIB,
                           f"{size}: replica RSS after warm-up {rss or float('nan'):.2f} GiB "
                           f"(<= {REPLICA_RSS_LIMIT_GIB:.0f} GiB)"))
        recall = r.get("recall_at_100_vs_exact")
        lines.append(check(recall is not None and recall >= RECALL_MIN,
                           f"{size}: recall@100 index vs exact {recall or float('nan'):.3f} "
                           f"(>= {RECALL_MIN}); index build {r.get('index_build_s') or 0:.0f} s,"
                           f" replica start {r['replica_start_s']:.0f} s"))
    for size in sizes[1:]:
        a, b = results.get(sizes[0], {}).get("p99_ms"), results.get(size, {}).get("p99_ms")
        lines.append(check(None if not (a and b) else b / a <= P99_RATIO_LIMIT,
                           f"p99({size}) / p99({sizes[0]}) = "
                           f"{b / a if a and b else float('nan'):.2f} (<= {P99_RATIO_LIMIT})"))
    return lines


if __name__ == "__main__":
    main()
