"""Builds training-snapshot frames (the batch pipeline's contract) from generator or MovieLens
output, for model tests and benchmarks. ``recsys_models`` never imports ``recsys_pipelines``;
these helpers stand in for ``recsys_pipelines.training_set`` on small data."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from recsys_core import features as F
from recsys_core.features import HISTORY_LENGTH
from recsys_models.bundle import Bundle, build_bundle
from recsys_models.data import EncoderSpec, time_split
from recsys_models.ranker import Ranker
from recsys_models.train import TrainConfig, fit_local
from recsys_models.two_tower import TwoTowerConfig, TwoTowerModel
from recsys_pipelines.generator import GeneratorConfig, generate


def _histories(times: np.ndarray, users: np.ndarray, eng_users: np.ndarray,
               eng_times: np.ndarray, eng_items: np.ndarray) -> list[list[str]]:
    """Last HISTORY_LENGTH engaged items strictly before each row's time, newest first."""
    out: list[list[str]] = [[] for _ in range(len(times))]
    order = np.lexsort((eng_times, eng_users))
    eu, et, ei = eng_users[order], eng_times[order], eng_items[order]
    bounds = {u: (lo, hi) for u, lo, hi in _runs(eu)}
    for row in range(len(times)):
        span = bounds.get(users[row])
        if span is None:
            continue
        lo, hi = span
        k = lo + int(np.searchsorted(et[lo:hi], times[row], side="left"))
        out[row] = list(ei[max(lo, k - HISTORY_LENGTH):k][::-1])
    return out


def _runs(sorted_keys: np.ndarray) -> list[tuple[object, int, int]]:
    if len(sorted_keys) == 0:
        return []
    change = np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [len(sorted_keys)]])
    return [(sorted_keys[s], int(s), int(e)) for s, e in zip(starts, ends, strict=True)]


def _with_items(frame: pd.DataFrame, items: pd.DataFrame) -> pd.DataFrame:
    meta = items[["item_id", "category", "creator_id", "tags", "duration_ms", "published_at"]]
    out = frame.merge(meta, on="item_id", how="left")
    age = (out["event_time"] - pd.to_datetime(out["published_at"], utc=True))
    out["item_age_days"] = (age.dt.total_seconds() / 86_400.0).clip(lower=0)
    return out.drop(columns="published_at")


def synthetic_rows(events: pd.DataFrame, items: pd.DataFrame) -> pd.DataFrame:
    """One row per impression of generator events (dirt-free), with labels and history."""
    ev = events.copy()
    ev["event_time"] = pd.to_datetime(ev["event_time"], utc=True, format="ISO8601")
    key = ["request_id", "item_id"]
    imp = ev[ev["event_type"] == "impression"].drop_duplicates(key)
    clicks = ev[ev["event_type"] == "click"].drop_duplicates(key)[key].assign(clicked=1)
    watch = ev[ev["event_type"].isin(["watch", "skip"])].drop_duplicates(key)
    watch = watch[key + ["watch_time_ms"]].rename(columns={"watch_time_ms": "_watch"})
    rows = imp[["user_id", "item_id", "event_time", "request_id", "item_duration_ms"]]
    rows = rows.merge(clicks, on=key, how="left").merge(watch, on=key, how="left")
    rows["clicked"] = rows["clicked"].fillna(0).astype(np.int64)
    rows["watch_time_ms"] = pd.to_numeric(rows["_watch"]).astype(float)
    rows = rows.drop(columns=["_watch", "request_id"]).sort_values("event_time", kind="stable")
    click_ev = ev[ev["event_type"] == "click"]
    rows["user_history"] = _histories(
        rows["event_time"].to_numpy(), rows["user_id"].to_numpy(),
        click_ev["user_id"].to_numpy(), click_ev["event_time"].to_numpy(),
        click_ev["item_id"].to_numpy())
    rows["item_duration_ms"] = pd.to_numeric(rows["item_duration_ms"]).astype(float)
    return _with_items(rows.reset_index(drop=True), items)


def movielens_rows(interactions: pd.DataFrame, items: pd.DataFrame) -> pd.DataFrame:
    """One row per rating: clicked = positive (rating >= 4), watch time unknown (NaN)."""
    rows = interactions.sort_values(["event_time", "user_id"], kind="stable").copy()
    rows["clicked"] = rows["positive"].astype(np.int64)
    rows["watch_time_ms"] = np.nan
    rows["item_duration_ms"] = np.nan
    pos = rows[rows["clicked"] == 1]
    rows["user_history"] = _histories(
        rows["event_time"].to_numpy(), rows["user_id"].to_numpy(),
        pos["user_id"].to_numpy(), pos["event_time"].to_numpy(), pos["item_id"].to_numpy())
    rows = rows.drop(columns=["rating", "positive"]).reset_index(drop=True)
    return _with_items(rows, items)


def write_snapshot(rows: pd.DataFrame, data_dir: Path, snapshot_id: str,
                   parts: int = 2) -> Path:
    """Writes rows as ``<data_dir>/training/<snapshot_id>/part-N.parquet``."""
    out = data_dir / "training" / snapshot_id
    out.mkdir(parents=True, exist_ok=True)
    for i, chunk in enumerate(np.array_split(np.arange(len(rows)), parts)):
        rows.iloc[chunk].to_parquet(out / f"part-{i}.parquet", index=False)
    return out


@dataclass
class Case:
    """A synthetic dataset split by time, with its encoder spec and ground truth."""

    rows: pd.DataFrame
    items: pd.DataFrame
    train: pd.DataFrame
    holdout: pd.DataFrame
    cutoff: pd.Timestamp
    spec: EncoderSpec
    user_categories: dict[str, str]  # ground-truth primary favourite category per user


TINY_SPEC = {"user_buckets": 5_000, "item_buckets": 5_000, "creator_buckets": 1_000,
             "tag_buckets": 500}


@lru_cache(maxsize=4)
def synthetic_case(events: int = 60_000, seed: int = 7) -> Case:
    """Generator data (400 users, 800 items, 10 categories, 7 days), 80/20 split by time."""
    g = generate(GeneratorConfig(events=events, days=7, users=400, items=800,
                                 new_users_per_day=5, new_items_per_day=10, categories=10,
                                 seed=seed))
    rows = synthetic_rows(g.events, g.items)
    train, holdout, cutoff = time_split(rows, 0.2)
    spec = EncoderSpec.from_catalog(g.items, list(rows.columns), **TINY_SPEC)
    favourites = {uid: f"cat{cats[0]}"
                  for uid, cats in zip(g.users["user_id"], g.user_categories, strict=True)}
    return Case(rows, g.items, train, holdout, cutoff, spec, favourites)


SMALL_TRAIN = TrainConfig(epochs=6, batch_size=256,
                          two_tower=TwoTowerConfig(dim=16, id_dim=16, hidden=32))


@lru_cache(maxsize=4)
def trained_bundle(events: int = 60_000, seed: int = 7, version: str = "test") -> Bundle:
    """A bundle trained in-process on :func:`synthetic_case` (train split only)."""
    case = synthetic_case(events, seed)
    models = fit_local(case.train, case.items, case.spec, SMALL_TRAIN)
    return make_bundle(case, models.two_tower, models.ranker, version)


def make_bundle(case: Case, two_tower: TwoTowerModel, ranker: Ranker, version: str) -> Bundle:
    catalog = case.items[pd.to_datetime(case.items["published_at"], utc=True) < case.cutoff]
    return build_bundle(two_tower, ranker, case.spec, catalog, set(case.train["item_id"]),
                        version=version, feature_service=F.RECOMMENDER_V1,
                        snapshot_id=f"synthetic-{version}", as_of=case.cutoff)
