"""End-to-end steps the CLI and the demo call: train + evaluate + register, and holdouts.

Thin orchestration over the plain functions of the other modules; all of it takes the typed
settings and a snapshot id, and returns plain results.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from recsys_core.features import HISTORY_LENGTH
from recsys_core.settings import Settings
from recsys_models.baselines import Baselines, tuned_baselines
from recsys_models.bundle import Bundle, build_bundle
from recsys_models.data import CategoryIndex, EncoderSpec, item_log_q, read_snapshot, snapshot_dir
from recsys_models.errors import RayNotStartedError, UnknownTrainingKeyError
from recsys_models.evaluate import (
    EvaluationReport,
    evaluate_bundle,
    holdout_cutoffs,
    holdout_split,
)
from recsys_models.neighbours import fit_neighbours
from recsys_models.ranker import RankerConfig
from recsys_models.registry import Registered, register_bundle
from recsys_models.sequences import engaged_mask, pit_histories
from recsys_models.train import TrainConfig, TrainedModels, fit, prepare_datasets
from recsys_models.two_tower import TwoTowerConfig
from recsys_models.validation import build_validation, split_for_validation, tune_blend

logger = logging.getLogger(__name__)

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


RANKER_PREFIX = "ranker_"


def _names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


def training_config(settings: Settings, base: TrainConfig | None = None
                    ) -> tuple[TrainConfig, dict[str, Any]]:
    """``settings.training`` forwarded by name into the dataclass configs.

    Each set key goes to the first of :class:`TrainConfig`, :class:`TwoTowerConfig` and
    :class:`EncoderSpec` with a field of that name; ``ranker_<field>`` to :class:`RankerConfig`.
    Unset keys keep ``base`` (default: the dataclasses' own defaults).

    Returns:
        ``(train config, EncoderSpec overrides)``.

    Raises:
        UnknownTrainingKeyError: A key no config has (a field renamed in the model code).
    """
    cfg = base or TrainConfig()
    top: dict[str, Any] = {}
    tower: dict[str, Any] = {}
    ranker: dict[str, Any] = {}
    spec: dict[str, Any] = {}
    plain = _names(TrainConfig) - {"two_tower", "ranker"}
    for key, value in settings.training.overrides().items():
        short = key.removeprefix(RANKER_PREFIX)
        if key in plain:
            top[key] = value
        elif key in _names(TwoTowerConfig):
            tower[key] = value
        elif key in _names(EncoderSpec):
            spec[key] = value
        elif key.startswith(RANKER_PREFIX) and short in _names(RankerConfig):
            ranker[short] = value
        else:
            raise UnknownTrainingKeyError(key)
    cfg = replace(cfg, **top, two_tower=replace(cfg.two_tower, **tower),
                  ranker=replace(cfg.ranker, **ranker))
    return cfg, spec


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


def _holdout_mask(table: pa.Table, cutoff: pd.Timestamp | pd.Series) -> pa.ChunkedArray:
    """Rows at or after their cutoff (one time, or a time per user), computed in Arrow."""
    times = _utc(table)
    if not isinstance(cutoff, pd.Series):
        return pc.greater_equal(times, pa.scalar(cutoff, times.type))
    users = table.column("user_id").to_pandas()
    per_row = pa.array(pd.to_datetime(users.map(cutoff), utc=True), type=times.type)
    return pc.fill_null(pc.greater_equal(times, per_row), False)


def split_snapshot(settings: Settings, snapshot_id: str | None = None,
                   holdout_fraction: float | None = None, protocol: str | None = None) -> Split:
    """Reads a snapshot with Ray Data and splits it by time: the last ``holdout_fraction``
    (default ``settings.evaluation.holdout_fraction``) of the time range (``global``) or of each
    user's rows (``per-user``; default ``settings.evaluation.holdout``)."""
    fraction = holdout_fraction or settings.evaluation.holdout_fraction
    protocol = protocol or settings.evaluation.holdout
    path = snapshot_dir(settings.data_dir, snapshot_id)
    ds = read_snapshot(path)
    keys = _arrow_to_pandas(ds.select_columns(["user_id", "event_time"]))
    cut = holdout_cutoffs(keys, fraction, protocol)
    # the time the bundle is built "as of": the global cutoff, or (per user) after every row
    cutoff = cut if not isinstance(cut, pd.Series) else (
        pd.to_datetime(keys["event_time"], utc=True).max() + pd.Timedelta(microseconds=1))

    # Filter in Arrow: a pandas round trip of list columns (history, tags) through Ray Data's
    # tensor extension fails on the ragged arrays the Feast join returns.
    def before(table: pa.Table) -> pa.Table:
        return table.filter(pc.invert(_holdout_mask(table, cut)))

    def after(table: pa.Table) -> pa.Table:
        return table.filter(_holdout_mask(table, cut))

    train = ds.map_batches(before, batch_format="pyarrow")
    holdout = _arrow_to_pandas(ds.map_batches(after, batch_format="pyarrow"))
    labels = _arrow_to_pandas(train.select_columns(EVAL_COLUMNS))
    _, holdout = with_pit_histories(labels, holdout.reset_index(drop=True), HISTORY_LENGTH)
    return Split(path.name, cutoff, train, labels, holdout)


def baselines_for(settings: Settings, train_labels: pd.DataFrame) -> Baselines:
    """Tuned EASE and ALS on the training side (``settings.evaluation``), or none when
    ``evaluation.baselines`` is off."""
    ev = settings.evaluation
    if not ev.baselines:
        return Baselines(info={"baseline/skipped": "evaluation.baselines is false"})
    return tuned_baselines(train_labels, protocol=ev.holdout,
                           ease_max_items=ev.ease_max_items)


@dataclass
class TrainOutcome:
    """What :func:`train_evaluate_register` produced."""

    trained: TrainedModels
    bundle: Bundle
    report: EvaluationReport
    registered: Registered | None
    split: Split
    seconds: dict[str, float] = field(default_factory=dict)
    baselines: Baselines = field(default_factory=Baselines)


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


def _validation_split(settings: Settings, rows: pd.DataFrame, fraction: float
                      ) -> tuple[pd.DataFrame, pd.DataFrame, pd.Timestamp]:
    """(fit rows, validation rows, cutoff) by the holdout's own protocol."""
    if settings.evaluation.holdout == "global":
        return split_for_validation(rows, fraction)
    fit_rows, val_rows = holdout_split(rows, fraction, "per-user")
    cut = pd.to_datetime(rows["event_time"], utc=True).max() + pd.Timedelta(microseconds=1)
    return fit_rows, val_rows, cut


def train_evaluate_register(
    settings: Settings, cfg: TrainConfig | None = None, *, snapshot_id: str | None = None,
    workers: int | None = None, register: bool = True, spec_overrides: dict[str, Any] | None =
    None,
) -> TrainOutcome:
    """Trains both models on Ray Train, builds the bundle, evaluates it and registers it.

    ``cfg`` defaults to ``settings.training`` mapped onto :class:`TrainConfig`
    (:func:`training_config`); ``spec_overrides`` win over the settings' encoder keys.
    The training rows get point-in-time engagement histories; the last
    ``cfg.validation_fraction`` of the training period is held out for early stopping (the
    models train on the rows before it), and the holdout is only used for the report, next to
    popularity, EASE and ALS tuned on that same validation split of the training side.
    """
    import ray
    import ray.data

    if not ray.is_initialized():
        raise RayNotStartedError("train_evaluate_register")
    mapped, spec_settings = training_config(settings)
    cfg = cfg or mapped
    spec_overrides = {**spec_settings, **(spec_overrides or {})}
    t0 = datetime.now(UTC)
    split = split_snapshot(settings, snapshot_id)
    train_rows = _arrow_to_pandas(split.train)
    try:
        catalog = load_catalog(settings)
    except FileNotFoundError:  # no catalog file: the item metadata the snapshot rows carry
        catalog = load_catalog(settings, pd.concat([train_rows, split.holdout],
                                                   ignore_index=True))
    spec = EncoderSpec.from_catalog(catalog, list(split.holdout.columns), **spec_overrides)
    CategoryIndex(spec)  # validates the vocabulary early
    train_rows, _ = with_pit_histories(train_rows, split.holdout.iloc[:0], spec.history_length)
    fit_rows, val_rows, val_cut = _validation_split(settings, train_rows, cfg.validation_fraction)
    spec = spec.with_vocabularies(fit_rows)  # id tables sized from the rows it trains on
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
        feature_service=settings.feast.serving_service, snapshot_id=split.snapshot_id,
        as_of=split.cutoff)
    # The final score's weights are tuned on validation with the neighbour table of the rows
    # the models trained on; the served table is then refitted on the whole training side.
    bundle.neighbours = fit_neighbours(fit_rows, spec)
    blend = tune_blend(bundle, fit_rows, val_rows)
    if blend is not None:
        logger.info("blend tuned on validation: %s", bundle.blend.describe())
    bundle.neighbours = fit_neighbours(train_rows, spec)
    baselines = baselines_for(settings, split.train_labels)
    t3 = datetime.now(UTC)
    report = evaluate_bundle(bundle, split.train_labels, split.holdout, history=trained.history,
                             extra=baselines.recommenders,
                             chunk_users=settings.evaluation.chunk_users,
                             max_users=settings.evaluation.max_users)
    t4 = datetime.now(UTC)
    registered = None
    if register:
        params = {"workers": workers or settings.ray.train_workers, **_flat(cfg.to_dict()),
                  **{f"spec.{k}": v for k, v in spec_overrides.items()},
                  **{f"spec.{k}": v for k, v in spec.table_sizes().items()},
                  **{f"training.{k}": v for k, v in settings.training.overrides().items()},
                  **{f"evaluation.{k}": v for k, v in settings.evaluation.model_dump().items()},
                  **baselines.info,
                  "snapshot_id": split.snapshot_id, "cutoff": split.cutoff.isoformat(),
                  "validation_cutoff": val_cut.isoformat(),
                  "validation_users": validation.size if validation is not None else 0}
        registered = register_bundle(settings, bundle, params=params, history=trained.history,
                                     report=report, run_name=run_name)
    t5 = datetime.now(UTC)
    seconds = {"prepare": (t1 - t0).total_seconds(), "fit": (t2 - t1).total_seconds(),
               "baselines": (t3 - t2).total_seconds(), "evaluate": (t4 - t3).total_seconds(),
               "register": (t5 - t4).total_seconds()}
    return TrainOutcome(trained, bundle, report, registered, split, seconds, baselines)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def snapshot_histories(settings: Settings, users: list[str], snapshot_id: str | None = None,
                       length: int = HISTORY_LENGTH
                       ) -> tuple[dict[str, list[str]], dict[str, set[str]]]:
    """Each user's latest ``length`` distinct engaged items in a training snapshot, newest
    first, and every item they engaged with there (batch scoring where there is no online
    store, e.g. an imported MovieLens). The caller starts Ray, as for training."""
    import ray

    if not ray.is_initialized():  # Ray Data would start a cluster of its own, noisily
        raise RayNotStartedError("snapshot_histories")
    ds = read_snapshot(snapshot_dir(settings.data_dir, snapshot_id))
    rows = _arrow_to_pandas(ds.select_columns(EVAL_COLUMNS))
    rows = rows[rows["user_id"].astype(str).isin(set(users))]
    events = rows.loc[engaged_mask(rows), ["user_id", "item_id", "event_time"]]
    events = events.assign(user_id=events["user_id"].astype(str),
                           item_id=events["item_id"].astype(str))
    end = pd.to_datetime(rows["event_time"], utc=True).max() + pd.Timedelta(seconds=1)
    query = pd.DataFrame({"user_id": users, "event_time": end})
    histories = pit_histories(query, np.zeros(len(query), bool), length, events=events)
    engaged = events.groupby("user_id")["item_id"].agg(set)
    return (dict(zip(users, histories, strict=True)),
            {u: engaged.get(u, set()) for u in users})
