"""``recsys train | evaluate | recommend`` and ``recsys models list | promote``.

Commands parse arguments and call plain functions of ``recsys_models``; nothing else.
Wire with ``models.register(app)`` (adds the top-level commands and the ``models`` group).
"""

from __future__ import annotations

import getpass
import json
import logging
from pathlib import Path
from typing import Annotated

import pandas as pd
import typer
from rich.console import Console
from rich.table import Table

from recsys_core import features as F
from recsys_core.settings import Settings
from recsys_platform.commands.context import current_settings

app = typer.Typer(help="Model registry: list versions, promote the challenger.",
                  no_args_is_help=True)
console = Console()
logger = logging.getLogger(__name__)


def _print_metrics(title: str, metrics: dict[str, float]) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in sorted(metrics):
        table.add_row(key, f"{metrics[key]:.4f}")
    console.print(table)


def train(
    workers: Annotated[int | None, typer.Option(help="Ray Train workers "
                                                     "(default: settings.ray.train_workers).")]
    = None,
    epochs: Annotated[int | None, typer.Option(help="Most retrieval epochs (early stopping on "
                                                   "a validation split of the training rows); "
                                                   "same as --set epochs=N.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Rows per step per worker; same as "
                                                       "--set batch_size=N.")] = None,
    assignments: Annotated[list[str] | None, typer.Option(
        "--set", help="KEY=VALUE of the training settings (repeatable), e.g. --set "
                      "temperature=0.05 --set ranker_negatives=4; dotted keys reach other "
                      "sections (evaluation.holdout=per-user). See docs/training.md.")] = None,
    snapshot: Annotated[str | None, typer.Option(help="Snapshot id (default: newest).")] = None,
    register: Annotated[bool, typer.Option(help="Register the bundle in MLflow.")] = True,
) -> None:
    """Trains the two-tower and the ranker on Ray Train, evaluates it next to popularity, EASE
    and ALS on the same holdout, registers a challenger."""
    from recsys_models.workflow import train_evaluate_register
    from recsys_platform.runtime import ensure_ray

    s = _with_sets(current_settings(), epochs, batch_size, assignments)
    ensure_ray(s)
    with console.status("training on Ray Train, then tuning the baselines and evaluating"):
        out = train_evaluate_register(s, snapshot_id=snapshot, workers=workers,
                                      register=register)
    _print_lists(f"bundle {out.bundle.version} (snapshot {out.bundle.snapshot_id}, "
                 f"{int(out.report.metrics['holdout/users']):,} holdout users)",
                 out.report.metrics)
    _print_metrics("ranker and index", {k: v for k, v in out.report.metrics.items()
                                        if k.startswith(("ranker/", "ann/"))})
    if out.registered is not None:
        console.print(f"registered {out.registered.uri} as challenger")
    console.print(f"seconds: {json.dumps({k: round(v, 1) for k, v in out.seconds.items()})}")


def _with_sets(s: Settings, epochs: int | None, batch_size: int | None,
               assignments: list[str] | None) -> Settings:
    from recsys_core.settings import with_overrides

    sets = [f"epochs={epochs}"] if epochs is not None else []
    sets += [f"batch_size={batch_size}"] if batch_size is not None else []
    sets += list(assignments or [])
    return with_overrides(s, sets) if sets else s


LIST_NAMES: tuple[tuple[str, str], ...] = (
    ("final", "final list (retrieval + ranker)"), ("two_tower", "retrieval only"),
    ("als", "als (tuned)"), ("ease", "ease (tuned)"), ("popularity", "popularity"))


def _print_lists(title: str, metrics: dict[str, float]) -> None:
    """One row per list on the same holdout: Recall@10/50, NDCG@10, and the final list's
    Recall@50 as a multiple of each list's."""
    table = Table(title=title)
    for col in ("list", "Recall@10", "Recall@50", "NDCG@10", "final R@50 / list"):
        table.add_column(col, justify="left" if col == "list" else "right")
    for key, label in LIST_NAMES:
        if f"{key}/recall@10" not in metrics:
            continue
        ratio = metrics.get(f"final/recall@50_vs_{key}")
        table.add_row(label, f"{metrics[f'{key}/recall@10']:.4f}",
                      f"{metrics[f'{key}/recall@50']:.4f}", f"{metrics[f'{key}/ndcg@10']:.4f}",
                      "-" if ratio is None or ratio != ratio else f"{ratio:.2f}x")
    console.print(table)


def evaluate(
    alias: Annotated[str, typer.Option(help="Registry alias to evaluate.")] = "champion",
    snapshot: Annotated[str | None, typer.Option(help="Snapshot id (default: newest).")] = None,
    assignments: Annotated[list[str] | None, typer.Option(
        "--set", help="KEY=VALUE of the evaluation settings (repeatable), e.g. --set "
                      "holdout=per-user --set baselines=false.")] = None,
) -> None:
    """Evaluates a registered bundle next to popularity, tuned EASE and tuned ALS on the
    snapshot's holdout (the baselines tuned on a validation split of the training side)."""
    from recsys_core.settings import with_overrides
    from recsys_models.evaluate import evaluate_bundle
    from recsys_models.registry import load_alias
    from recsys_models.workflow import baselines_for, split_snapshot
    from recsys_platform.runtime import ensure_ray

    s = with_overrides(current_settings(), list(assignments or []), section="evaluation")
    ensure_ray(s)
    split = split_snapshot(s, snapshot)
    bundle = load_alias(s, alias)
    with console.status("tuning the baselines on the training side, evaluating"):
        baselines = baselines_for(s, split.train_labels)
        report = evaluate_bundle(bundle, split.train_labels, split.holdout,
                                 extra=baselines.recommenders,
                                 chunk_users=s.evaluation.chunk_users,
                                 max_users=s.evaluation.max_users)
    m = report.metrics
    _print_lists(f"{alias} (bundle {bundle.version}) on snapshot {split.snapshot_id}, "
                 f"{s.evaluation.holdout} holdout, {int(m['holdout/users']):,} users", m)
    _print_metrics("ranker and index", {k: v for k, v in m.items()
                                        if k.startswith(("ranker/", "ann/"))})
    if baselines.info:
        console.print("baselines: " + ", ".join(f"{k.removeprefix('baseline/')}={v}"
                                                 for k, v in baselines.info.items()),
                      soft_wrap=True)


def recommend(
    users: Annotated[Path, typer.Option(help="Parquet/CSV/JSONL with user_id (or MovieLens's "
                                             "userId) (+ optional user_history).")],
    out: Annotated[Path, typer.Option(help="Output file (.parquet or .csv).")],
    k: Annotated[int, typer.Option(help="Items per user.")] = 10,
    alias: Annotated[str, typer.Option(help="Registry alias.")] = "champion",
    bundle_path: Annotated[Path | None, typer.Option("--bundle", help="Bundle directory "
                                                     "instead of the registry.")] = None,
    history_from: Annotated[str, typer.Option(
        "--history", help="Where users' engagement histories come from: 'file' (the file's "
                          "user_history, else none) or 'snapshot' (each user's latest "
                          "engagements in the training snapshot: batch scoring without an "
                          "online store, e.g. MovieLens).")] = "file",
    snapshot: Annotated[str | None, typer.Option(help="Snapshot for --history snapshot "
                                                      "(default: newest).")] = None,
    exclude_seen: Annotated[bool, typer.Option(
        help="Leave out the items each user engaged with: with --history file, as serving "
             "does (the file's user_history and the online store's history + the stream's "
             "recent items); with --history snapshot, everything they engaged with in it.")]
    = False,
) -> None:
    """Writes the top-K items per user from a registered bundle (offline evaluation)."""
    from recsys_models.bundle import load_bundle
    from recsys_models.registry import load_alias

    s = current_settings()
    frame = _read_users(users)
    if history_from not in ("file", "snapshot"):
        raise typer.BadParameter(f"--history {history_from!r}: expected file or snapshot")
    seen: dict[str, set[str]] | None = None
    if history_from == "snapshot":
        from recsys_models.workflow import snapshot_histories
        from recsys_platform.runtime import ensure_ray

        ensure_ray(s)  # the snapshot is read through Ray Data: its cluster, started quietly
        histories, engaged = snapshot_histories(s, frame["user_id"].tolist(), snapshot)
        frame[F.USER_HISTORY] = [histories[u] for u in frame["user_id"]]
        seen = engaged if exclude_seen else None
    elif exclude_seen:
        seen = _seen_items(s, frame)
    bundle = load_bundle(bundle_path) if bundle_path else load_alias(s, alias)
    recs = bundle.recommend(frame, k, candidates=max(s.serving.candidates, k), exclude=seen)
    recs.insert(0, "model_version", bundle.version)
    out.parent.mkdir(parents=True, exist_ok=True)
    recs.to_csv(out, index=False) if out.suffix == ".csv" else recs.to_parquet(out, index=False)
    console.print(f"wrote {len(recs)} rows for {frame['user_id'].nunique()} users to {out}")


def _seen_items(settings: Settings, frame: pd.DataFrame) -> dict[str, set[str]]:
    """Each user's engaged items: the file's ``user_history`` plus the online store's, merged
    as serving merges them (:func:`~recsys_platform.serving.online_features.merge_history`)."""
    from recsys_core.features import USER_HISTORY, USER_RECENT_ITEMS
    from recsys_pipelines.feature_store import load_store, online_features
    from recsys_platform.serving.online_features import merge_history

    seen = {str(u): set(h) for u, h in zip(frame["user_id"], frame[F.USER_HISTORY], strict=True)}
    online = online_features(load_store(settings), "user", list(seen), (
        F.USER_HISTORY_VIEW, F.USER_STREAM.name))
    for row in online.to_dict("records"):
        recent, history = row.get(USER_RECENT_ITEMS), row.get(USER_HISTORY)
        seen[str(row["user_id"])] |= set(merge_history(
            None if recent is None else list(recent), None if history is None else list(history)))
    return seen


def _read_users(path: Path) -> pd.DataFrame:
    if path.suffix == ".parquet":
        frame = pd.read_parquet(path)
    elif path.suffix in (".jsonl", ".json"):
        frame = pd.read_json(path, lines=path.suffix == ".jsonl")
    else:
        frame = pd.read_csv(path)
    if "user_id" not in frame.columns and "userId" in frame.columns:  # MovieLens's own files
        frame = frame[["userId"]].drop_duplicates().rename(columns={"userId": "user_id"})
    frame["user_id"] = frame["user_id"].astype(str)
    if F.USER_HISTORY not in frame.columns:
        frame[F.USER_HISTORY] = [[] for _ in range(len(frame))]
    frame[F.USER_HISTORY] = [json.loads(h) if isinstance(h, str) else list(h)
                             for h in frame[F.USER_HISTORY]]
    return frame


@app.command("list")
def list_models() -> None:
    """Lists registered bundle versions with aliases, metrics and promotion tags."""
    from recsys_models.registry import list_versions

    frame = list_versions(current_settings())
    table = Table(title="registered bundles")
    for col in frame.columns:
        table.add_column(col)
    for row in frame.astype(str).itertuples(index=False):
        table.add_row(*row)
    console.print(table)


@app.command("promote")
def promote_cmd(
    why: Annotated[str, typer.Option(help="Reason, recorded on the version.")],
    snapshot: Annotated[str | None, typer.Option(help="Holdout snapshot (default: newest).")]
    = None,
    force: Annotated[bool, typer.Option(help="Promote even if the gate refuses.")] = False,
) -> None:
    """Promotes the challenger to champion if it is not worse on the same holdout."""
    from recsys_models.errors import PromotionRefusedError
    from recsys_models.registry import promote
    from recsys_models.workflow import split_snapshot
    from recsys_platform.runtime import ensure_ray

    s = current_settings()
    ensure_ray(s)
    split = split_snapshot(s, snapshot)
    result = promote(s, split.train_labels, split.holdout, why=why, who=getpass.getuser(),
                     force=force)
    if not result.promoted:
        raise PromotionRefusedError(result.challenger, result.reasons)
    console.print(f"champion -> version {result.challenger} (was {result.champion})")


app.command("train")(train)
app.command("evaluate")(evaluate)
app.command("recommend")(recommend)


def register(root: typer.Typer) -> None:
    """Adds ``train``, ``evaluate``, ``recommend`` at the top level and the ``models`` group."""
    root.command("train")(train)
    root.command("evaluate")(evaluate)
    root.command("recommend")(recommend)
    root.add_typer(app, name="models")
