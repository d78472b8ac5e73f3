"""End-to-end steps the CLI and the demo call: train + evaluate + register, and holdouts.

Thin orchestration over the plain functions of the other modules; all of it takes the typed
settings and a snapshot id, and returns plain results.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from recsys_models.bundle import Bundle, build_bundle
from recsys_models.data import CategoryIndex, EncoderSpec, item_log_q, read_snapshot, snapshot_dir
from recsys_models.evaluate import EvaluationReport, evaluate_bundle
from recsys_models.registry import Registered, register_bundle
from recsys_models.sequences import engaged_mask, pit_histories
from recsys_models.train import TrainConfig, TrainedModels, fit, prepare_datasets
from recsys_models.validation import build_validation, split_for_validation, tune_blend
from recsys_platform.features import HISTORY_LENGTH
from recsys_platform.runtime import ensure_ray
from recsys_platform.settings import Settings

logger = logging.getLogger(__name__)

HOLDOUT_FRACTION = 0.2
EVAL_COLUMNS = ["user_id", "item_id", "event_time", "clicked"]


def load_catalog(settings: Settings, rows: pd.DataFrame | None = None) -> pd.DataFrame:
    """The item catalog: the lake's or landing's ``catalog/items.parquet``, else the item
    metadata found in the snapshot rows."""
    for base in (settings.lake_dir, settings.landing_dir):
        path = Path(base) / "catalog" / "items.parquet"
        if path.is_file():
            return pd.read_parquet(path)
    if rows is None:
        raise FileNotFoundError(f"no catalog under {settings.lake_dir} or {settings.landing_dir}")
    items = rows.drop_duplicates("item_id", keep="last").copy()
    items["published_at"] = pd.to_datetime(items["event_time"], utc=True) - pd.to_timedelta(
        items["item_age_days"].fillna(0), unit="D")
    return items[["item_id", "category", "creator_id", "tags", "duration_ms", "published_at"]]


@dataclass
class Split:
    """A snapshot split by time: Ray Data train rows, pandas holdout, pandas train labels."""

    snapshot_id: str
    cutoff: pd.Timestamp
    train: Any  # ray.data.Dataset
    train_labels: pd.DataFrame  # EVAL_COLUMNS of the train rows (popularity, exclusions)
    holdout: pd.DataFrame


def _utc(table: pa.Table) -> pa.ChunkedArray:
    column = table.column("event_time")
    if pa.types.is_timestamp(column.type) and column.type.tz is None:
        column = pc.assume_timezone(column, "UTC")
    return pc.cast(column, pa.timestamp("us", tz="UTC"))


def _arrow_to_pandas(ds: Any) -> pd.DataFrame:
    """``Dataset.to_pandas`` without Ray's tensor-extension cast of ragged list columns."""
    import ray

    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    if not tables:
        return ds.schema().base_schema.empty_table().to_pandas()
    return pa.concat_tables(tables, promote_options="default").to_pandas()


def split_snapshot(settings: Settings, snapshot_id: str | None = None,
                   holdout_fraction: float = HOLDOUT_FRACTION) -> Split:
    """Reads a snapshot with Ray Data and splits it at a time quantile."""
    path = snapshot_dir(settings.data_dir, snapshot_id)
    ds = read_snapshot(path)
    times = pd.to_datetime(ds.select_columns(["event_time"]).to_pandas()["event_time"], utc=True)
    cutoff = times.quantile(1.0 - holdout_fraction)

    # Filter in Arrow: a pandas round trip of list columns (history, tags) through Ray Data's
    # tensor extension fails on the ragged arrays the Feast join returns.
    def before(table: pa.Table) -> pa.Table:
        return table.filter(pc.less(_utc(table), pa.scalar(cutoff, _utc(table).type)))

    def after(table: pa.Table) -> pa.Table:
        return table.filter(pc.greater_equal(_utc(table), pa.scalar(cutoff, _utc(table).type)))

    train = ds.map_batches(before, batch_format="pyarrow")
    holdout = _arrow_to_pandas(ds.map_batches(after, batch_format="pyarrow"))
    labels = _arrow_to_pandas(train.select_columns(EVAL_COLUMNS))
    _, holdout = with_pit_histories(labels, holdout.reset_index(drop=True), HISTORY_LENGTH)
    return Split(path.name, cutoff, train, labels, holdout)


@dataclass
class TrainOutcome:
    """What :func:`train_evaluate_register` produced."""

    trained: TrainedModels
    bundle: Bundle
    report: EvaluationReport
    registered: Registered | None
    split: Split
    seconds: dict[str, float] = field(default_factory=dict)


def with_pit_histories(train: pd.DataFrame, holdout: pd.DataFrame, length: int
                       ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Replaces the snapshot's daily ``user_history`` with each row's exact point-in-time
    engagement sequence (what serving has online: stream recent items, then batch history).
    Holdout rows see training engagements and earlier holdout ones, never their own."""
    both = pd.concat([train, holdout], ignore_index=True)
    histories = pit_histories(both, engaged_mask(both), length)
    train = train.assign(user_history=histories[: len(train)])
    holdout = holdout.assign(user_history=histories[len(train):])
    return train, holdout


def train_evaluate_register(
    settings: Settings, cfg: TrainConfig, *, snapshot_id: str | None = None,
    workers: int | None = None, register: bool = True, spec_overrides: dict[str, Any] | None =
    None,
) -> TrainOutcome:
    """Trains both models on Ray Train, builds the bundle, evaluates it and registers it.

    The training rows get point-in-time engagement histories; the last
    ``cfg.validation_fraction`` of the training period is held out for early stopping (the
    models train on the rows before it), and the holdout is only used for the report.
    """
    import ray.data

    ensure_ray(settings)
    t0 = datetime.now(UTC)
    split = split_snapshot(settings, snapshot_id)
    catalog = load_catalog(settings, split.holdout)
    spec = EncoderSpec.from_catalog(catalog, list(split.holdout.columns), **(spec_overrides or {}))
    CategoryIndex(spec)  # validates the vocabulary early
    train_rows, _ = with_pit_histories(_arrow_to_pandas(split.train), split.holdout.iloc[:0],
                                       spec.history_length)
    fit_rows, val_rows, val_cut = split_for_validation(train_rows, cfg.validation_fraction)
    published = pd.to_datetime(catalog["published_at"], utc=True)
    validation = build_validation(fit_rows, val_rows, catalog[published < val_cut], spec,
                                  set(fit_rows["item_id"]))
    positives = fit_rows.loc[fit_rows["clicked"] == 1, "item_id"]
    # Through Arrow: Ray's pandas ingestion casts the ragged list columns (tags, history) to
    # its tensor extension and fails.
    table = pa.Table.from_pandas(fit_rows.reset_index(drop=True), preserve_index=False)
    datasets = prepare_datasets(ray.data.from_arrow(table), spec, item_log_q(positives))
    t1 = datetime.now(UTC)
    run_name = f"train-{t1:%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    trained = fit(datasets, spec, cfg, num_workers=workers or settings.ray.train_workers,
                  use_gpu=settings.ray.use_gpu,
                  storage_path=str((settings.data_dir / "ray_results").resolve()),
                  name=run_name, catalog=catalog[published < val_cut], validation=validation)
    t2 = datetime.now(UTC)
    bundle = build_bundle(
        trained.two_tower, trained.ranker, spec, catalog[published < split.cutoff],
        set(split.train_labels["item_id"]), version=run_name,
        feature_service=settings.feast.retrieval_service, snapshot_id=split.snapshot_id,
        as_of=split.cutoff)
    blend = tune_blend(bundle, fit_rows, val_rows)  # the final score's retrieval weight
    if blend is not None:
        logger.info("blend tuned on validation: %s", blend)
    report = evaluate_bundle(bundle, split.train_labels, split.holdout, history=trained.history)
    t3 = datetime.now(UTC)
    registered = None
    if register:
        params = {"workers": workers or settings.ray.train_workers, **_flat(cfg.to_dict()),
                  "snapshot_id": split.snapshot_id, "cutoff": split.cutoff.isoformat(),
                  "validation_cutoff": val_cut.isoformat(),
                  "validation_users": validation.size if validation is not None else 0}
        registered = register_bundle(settings, bundle, params=params, history=trained.history,
                                     report=report, run_name=run_name)
    t4 = datetime.now(UTC)
    seconds = {"prepare": (t1 - t0).total_seconds(), "fit": (t2 - t1).total_seconds(),
               "evaluate": (t3 - t2).total_seconds(), "register": (t4 - t3).total_seconds()}
    return TrainOutcome(trained, bundle, report, registered, split, seconds)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
