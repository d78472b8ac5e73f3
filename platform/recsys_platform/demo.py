"""``recsys demo`` (``make demo``): the whole platform once, on embedded defaults, in one module.

Each step calls the same plain functions and printers as the commands that do it alone:
generate -> MovieLens import -> ETL, batch features, Feast apply + materialize, training
snapshot (``recsys etl/features``) -> train on Ray Train, evaluate, register, promote
(``recsys train``) -> the PyFlink stream job updates the online store (``recsys stream``) ->
Ray Serve answers a known user, a new user and the stream's user (``recsys serve``).
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rich.console import Console

from recsys_core import features as F
from recsys_core.logs import configure as configure_logging
from recsys_core.settings import Settings
from recsys_pipelines.online_store import resolve_online_store
from recsys_platform.commands import data as data_commands
from recsys_platform.commands import features as features_commands
from recsys_platform.commands import serve as serve_commands
from recsys_platform.commands import stream as stream_commands
from recsys_platform.commands.progress import stage
from recsys_platform.serving import cluster
from recsys_platform.serving.cluster import base_url

logger = logging.getLogger(__name__)


def run(s: Settings, console: Console, events: int, movielens: Path) -> None:
    """Runs the end-to-end demo (the steps of the module docstring) and prints a summary."""
    verbose = logging.getLogger().isEnabledFor(logging.DEBUG)
    # The stage tables, progress and summary say what the project's INFO records would
    # (ETL counts, training set, tuning): those show with -v, warnings always.
    configure_logging(verbose, project_level=logging.WARNING)
    console.rule("1. synthetic events")
    data_commands.generate(events=events, days=14, start="2026-11-01", users=2_000,
                           items=5_000, dirt_rate=0.01, seed=7, categories=None,
                           category_share=None, jsonl=False, out=None)
    console.rule("2. MovieLens")
    data_commands.import_movielens(path=movielens, out=None)
    choice = resolve_online_store(s)
    console.print(f"profile={s.profile} online store: {choice.kind} ({choice.reason})")
    batch_step(s, console)
    models_step(s, console)
    # PyFlink's gRPC stack breaks an in-process Ray connection afterwards, so the stream
    # step runs in a child process of its own.
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        stream_user = pool.apply(_stream_in_child, (s, verbose))
    users = {"known user": _most_active_user(s), "new user": "demo-new-user"}
    if stream_user:
        users["user updated by the stream"] = stream_user
    serving_step(s, console, users)
    console.rule("done")
    _print_next_steps(s, console)


def _stream_in_child(s: Settings, verbose: bool) -> str | None:
    # a spawned process: its own logging, the same quiet libraries and project records
    configure_logging(verbose, project_level=logging.WARNING)
    return stream_step(s, Console())


def _most_active_user(s: Settings) -> str:
    import pyarrow.parquet as pq

    files = sorted((s.lake_dir / "events").rglob("*.parquet"))[-2:]
    users = pq.read_table(files, columns=["user_id"]).column(0).to_pandas()
    return str(users.value_counts().index[0])


def batch_step(settings: Settings, console: Console) -> None:
    """Demo: ETL -> batch features -> apply -> materialize on the generated landing data,
    then online features of one user and one item, and a training snapshot."""
    from recsys_pipelines.feature_store import load_store, online_features
    from recsys_pipelines.training_set import build_snapshot
    from recsys_platform.flows.data import etl_flow, features_flow, prefect_api

    start, end = features_commands.landing_range(settings)
    with stage(console, f"batch: ETL {start}..{end} -> lake -> Ray Data features -> Feast -> "
               "online", 3) as step:
        with prefect_api(settings):
            step("ETL flow (Prefect): validate, quarantine, dedupe")
            etl = etl_flow(start=start, end=end, settings=settings)
            features_commands.print_etl(etl)
            step("features flow: Ray Data batch features, feast apply, materialize")
            feats = features_flow(start=start, end=end, settings=settings)
        console.print(f"feature rows {feats['rows']}; materialized "
                      f"{feats['online']['rows']:,} entity rows in "
                      f"{feats['online']['seconds']:.1f} s")
        store = load_store(settings)
        from recsys_pipelines.etl import read_lake_events

        events = read_lake_events(settings.lake_dir, end, end)
        user = str(events["user_id"].value_counts().index[0])
        item = str(events["item_id"].value_counts().index[0])
        for entity, key, views in (("user", user, (F.USER_BATCH.name, F.USER_HISTORY_VIEW)),
                                   ("item", item, (F.ITEM_BATCH.name, F.ITEM_METADATA_VIEW))):
            row = online_features(store, entity, [key], views).iloc[0]
            console.print(features_commands.table(f"online features of {entity} {key}",
                                 {k: v for k, v in row.items()
                                  if not k.endswith(("_7d", "_30d"))
                                  or k.endswith(("ctr_7d", "ctr_30d"))}))
        step("point-in-time training snapshot (Feast historical features)")
        snapshot, rows = build_snapshot(settings, store)
    console.print(f"training snapshot {snapshot}: {rows:,} labelled impressions")


def models_step(settings: Settings, console: Console) -> None:
    """Demo: short training on 2 Ray Train workers, evaluate, register, promote."""
    from recsys_models.registry import promote
    from recsys_models.workflow import train_evaluate_register
    from recsys_platform.runtime import ensure_ray

    ensure_ray(settings)
    with stage(console, "models: train on 2 Ray Train workers, evaluate, register, promote",
               2) as step:
        step("training on Ray Train (early stopping on a validation split), evaluating, "
             "registering in MLflow")
        out = train_evaluate_register(settings, workers=2)
        m = out.report.metrics
        nan = float("nan")
        epochs = sum(1 for h in out.trained.history if h.get("phase") == 0.0)
        console.print(
            f"two-tower recall@50 {m['two_tower/recall@50']:.3f} vs popularity "
            f"{m['popularity/recall@50']:.3f}; final list recall@50 "
            f"{m['final/recall@50']:.3f} (tuned EASE {m.get('ease/recall@50', nan):.3f}, ALS "
            f"{m.get('als/recall@50', nan):.3f}); ranker AUC {m['ranker/auc']:.3f} (logistic "
            f"regression {m.get('ranker/logreg_auc', nan):.3f}); ANN recall@100 "
            f"{m['ann/recall@100']:.3f}; fit {out.seconds['fit']:.0f}s ({epochs} retrieval "
            "epochs)")
        step("promotion gate: beats popularity by the margin, not below the champion")
        result = promote(settings, out.split.train_labels, out.split.holdout, why="make demo",
                         who="demo", baselines=out.baselines)
    state = "promoted to champion" if result.promoted else "refused: " + "; ".join(result.reasons)
    console.print(f"gate: version {result.challenger} {state}")
    if not result.promoted:
        # The rest of the demo (stream, serving) needs a champion to show the serving path:
        # promote anyway, recorded as forced in the version's gate tags, and say so.
        forced = promote(settings, out.split.train_labels, out.split.holdout,
                         why="make demo: forced after the gate refused, to demonstrate serving",
                         who="demo", force=True, baselines=out.baselines)
        console.print(f"[yellow]demo: version {forced.challenger} promoted with --force so "
                      "serving has a model; the refusal is kept in its gate.* tags. A real "
                      "deployment would keep the previous champion.[/yellow]")


def stream_step(settings: Settings, console: Console) -> str | None:
    """Demo: start the job in the background, append two bursts of events, and show one
    user's short-term features and one item's trending counts change in the online store.

    Returns:
        The id of the user whose stream features were shown (for the serving demo).
    """
    with stage(console, "stream: PyFlink job -> Redis (Feast layout), read through Feast",
               3) as step:
        step("starting the PyFlink job (Flink mini cluster)")
        user = _stream_bursts(settings, console, step)
    stream_commands.print_status(console, settings)
    return user


def _stream_bursts(settings: Settings, console: Console, step: Callable[[str], None]) -> str:
    import redis

    from recsys_core.contracts import split_duplicates
    from recsys_core.features import ITEM_TRENDING, USER_STREAM
    from recsys_pipelines.feature_store import apply_definitions, online_features
    from recsys_pipelines.generator import GeneratorConfig, generate, write_jsonl
    from recsys_pipelines.stream.job import options_from_settings, start
    from recsys_pipelines.stream.status import wait_for_window

    store = apply_definitions(settings)
    options = options_from_settings(settings)
    stream_dir = Path(options.stream_dir)
    stream_dir.mkdir(parents=True, exist_ok=True)
    data = generate(GeneratorConfig(events=6_000, days=1, users=40, items=120, seed=99))
    events, _ = split_duplicates(data.events)
    # Squeeze the day into the last two hours before now, in event-time order.
    t = datetime.fromisoformat(events["event_time"].min().replace("Z", "+00:00"))
    now = datetime.now(UTC).replace(microsecond=0)
    start_at = now - timedelta(hours=2)
    times = [start_at + (datetime.fromisoformat(x.replace("Z", "+00:00")) - t) / 12
             for x in events["event_time"]]
    events = events.assign(event_time=[x.strftime("%Y-%m-%dT%H:%M:%S.000Z") for x in times])
    events = events.sort_values("event_time").reset_index(drop=True)
    half = len(events) // 2
    user = str(events["user_id"].value_counts().index[0])
    item = str(events["item_id"].value_counts().index[0])

    result = start(options)
    client = redis.Redis.from_url(settings.redis.url)
    try:
        for i, part in enumerate((events.iloc[:half], events.iloc[half:])):
            step(f"burst {i + 1}: appending events, waiting for their windows")
            write_jsonl(part, stream_dir / f"demo-{now:%Y%m%dT%H%M%S}-{i}.jsonl")
            last = datetime.fromisoformat(part["event_time"].max().replace("Z", "+00:00"))
            closed = last - timedelta(seconds=options.out_of_orderness_s)
            slide_ms = int(ITEM_TRENDING.slide.total_seconds() * 1000)  # type: ignore[union-attr]
            end_ms = int(closed.timestamp() * 1000) // slide_ms * slide_ms
            ok = wait_for_window(client, options.sink.metrics_key, ITEM_TRENDING.name, end_ms,
                                 timeout_s=120)
            console.print(f"burst {i + 1}: {len(part):,} events appended; "
                          f"{'windows written' if ok else 'still catching up'}")
            for entity, key, view in (("user", user, USER_STREAM.name),
                                      ("item", item, ITEM_TRENDING.name)):
                row = online_features(store, entity, [key], (view,)).iloc[0]
                console.print(f"  {entity} {key}: " + ", ".join(
                    f"{k}={stream_commands.short(v)}" for k, v in row.items()
                    if k not in ("user_id", "item_id")), markup=False)  # "[i1, ...]" is no tag
    finally:
        client.close()
        job = result.get_job_client()
        if job is not None:
            job.cancel().result()
    return user


def serving_step(settings: Settings, console: Console, users: dict[str, str]) -> None:
    """Demo: start the service, query each ``label -> user id``, print the results, stop."""
    with stage(console, "serving: Ray Serve app, bundle from the MLflow registry @champion",
               1 + len(users)) as step:
        step("starting Ray Serve, loading the @champion bundle")
        cluster.connect(settings, start_head=True)
        url = cluster.deploy(settings)
        try:
            ready = cluster.wait_ready(url)
            console.print(f"serving on {url}, bundle version {ready['bundle_version']}")
            for label, user in users.items():
                step(f"POST /recommend for the {label}")
                status, body = cluster.http("POST", f"{url}/recommend", {"user_id": user, "k": 8})
                if status != 200:
                    console.print(f"{label}: HTTP {status} {body}")
                    continue
                serve_commands.print_recommendations(body, f"{label} ({user})")
        finally:
            cluster.delete_app()


def _print_next_steps(s: Settings, console: Console) -> None:
    from recsys_models.errors import AliasNotFoundError
    from recsys_models.registry import alias_version
    from recsys_platform.ui import mlflow_ui, prefect_ui

    try:
        champion = f"version {alias_version(s, 'champion')} is @champion"
    except AliasNotFoundError:
        champion = "no @champion yet"
    rows = [
        ("MLflow UI", "recsys ui mlflow",
         f"open {mlflow_ui(s).url}/#/models/{s.mlflow.model_name}",
         f"registry ({champion}), model cards, gate tags, runs"),
        ("Prefect UI", "recsys ui prefect", f"open {prefect_ui(s).url}/runs",
         "the ETL and features flow runs, their tasks and logs"),
        ("serving", "recsys serve up", f"POST {base_url(s)}/recommend",
         "the demo stopped its app; this one keeps running"),
    ]
    console.rule("where to look next")
    for name, command, url, what in rows:  # soft wrap: URLs stay whole, to click or copy
        console.print(f"[bold]{name:<11}[/bold] {command:<18} then {url}", soft_wrap=True)
        console.print(f"{'':<11} {what}", style="dim", soft_wrap=True)
    console.print(f"{'more':<11} recsys stream status, recsys models list; everything the "
                  f"demo wrote is under {s.data_dir.resolve()}; README.md", soft_wrap=True)
