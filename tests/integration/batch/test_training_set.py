"""Point-in-time correctness of training sets built through Feast."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

from recsys_core import features as F
from recsys_pipelines import etl, feature_store
from recsys_pipelines.batch_features import day_end
from recsys_pipelines.training_set import (
    IMPRESSION_COLUMNS,
    LABEL_WINDOW,
    build_training_set,
    label_impressions,
    view_folder,
    write_training_snapshot,
)
from tests.fixtures.feast_store import BatchEnv
from tests.integration.batch import reference

pytestmark = pytest.mark.integration
CHECKED = ("user_impressions_1d", "user_clicks_7d", "user_watch_time_ms_1d")


def _impressions(events: pd.DataFrame, batch_env: BatchEnv) -> pd.DataFrame:
    labelled = label_impressions(events)
    rows = labelled.iloc[np.linspace(0, len(labelled) - 1, 60).astype(int)]
    # Rows exactly at a day end see that day's features; one millisecond earlier they don't.
    user = str(events["user_id"].value_counts().index[0])
    boundary = day_end(batch_env.start + pd.Timedelta(days=2))
    edges = pd.DataFrame({"user_id": user, "item_id": rows["item_id"].iloc[0],
                          "event_time": [boundary, boundary - pd.Timedelta(milliseconds=1)],
                          "clicked": 0, "watch_time_ms": np.nan, "item_duration_ms": 1.0})
    return pd.concat([rows, edges], ignore_index=True)


@pytest.fixture(scope="module")
def training(features_state: Any, batch_env: BatchEnv) -> tuple[pd.DataFrame, pd.DataFrame]:
    assert features_state.is_completed()
    events = etl.read_lake_events(batch_env.settings.lake_dir)
    impressions = _impressions(events, batch_env)
    store = feature_store.load_store(batch_env.settings)
    return impressions, build_training_set(store, impressions)


def test_labels_join_later_clicks_and_watches_of_the_same_request(
    etl_state: Any, batch_env: BatchEnv
) -> None:
    events = etl.read_lake_events(batch_env.settings.lake_dir)
    labelled = label_impressions(events)
    assert list(labelled.columns) == list(IMPRESSION_COLUMNS)
    impressions = events[events["event_type"] == "impression"].sort_values("event_time")
    first = impressions.drop_duplicates(["user_id", "item_id", "request_id"])
    closed = first["event_time"] <= events["event_time"].max() - LABEL_WINDOW
    assert len(labelled) == closed.sum() and 0 < (~closed).sum() < len(first) / 10
    assert labelled["clicked"].isin([0, 1]).all() and labelled["clicked"].sum() > 0
    watched = labelled["watch_time_ms"].notna()
    # Watches follow clicks (the few exceptions lost their click to the injected dirt).
    assert watched.any() and (labelled.loc[watched, "clicked"] == 1).mean() > 0.9


def test_training_rows_only_see_features_from_before_their_time(
    training: tuple[pd.DataFrame, pd.DataFrame], batch_env: BatchEnv
) -> None:
    impressions, frame = training
    events = etl.read_lake_events(batch_env.settings.lake_dir)
    assert len(frame) == len(impressions)
    assert (frame["event_time"].to_numpy() == pd.to_datetime(
        impressions["event_time"], utc=True).to_numpy()).all()
    first_feature_time = day_end(batch_env.start)
    leaked_if_later = 0
    for (_, row), (_, imp) in zip(frame.iterrows(), impressions.iterrows(), strict=True):
        as_of = pd.Timestamp(imp["event_time"]).floor("D")  # the newest day end <= event time
        seen = events[(events["user_id"] == row["user_id"]) & (events["event_time"] <= as_of)]
        if as_of < first_feature_time or seen.empty:
            assert pd.isna(row[CHECKED[0]]), (row["user_id"], as_of)
            continue
        expected = reference.windowed(events, F.USER_BATCH, row["user_id"], as_of)
        assert {c: row[c] for c in CHECKED} == {c: expected[c] for c in CHECKED}
        assert list(row[F.USER_HISTORY]) == reference.history(events, row["user_id"], as_of)
        later = reference.windowed(events, F.USER_BATCH, row["user_id"], as_of
                                   + pd.Timedelta(days=1))
        leaked_if_later += any(later[c] != expected[c] for c in CHECKED)
    assert leaked_if_later > 0  # the check above would catch a feature row from the future


def test_a_row_at_a_day_end_sees_that_day_and_a_millisecond_earlier_does_not(
    training: tuple[pd.DataFrame, pd.DataFrame],
) -> None:
    _, frame = training
    at_end, before = frame.iloc[-2], frame.iloc[-1]
    assert at_end["user_impressions_1d"] != before["user_impressions_1d"]


def test_training_frame_has_the_documented_columns_and_snapshots_by_content(
    training: tuple[pd.DataFrame, pd.DataFrame], batch_env: BatchEnv
) -> None:
    _, frame = training
    for column in (*IMPRESSION_COLUMNS, F.USER_HISTORY, "category", "item_age_days",
                   *F.USER_BATCH.feature_names, *F.ITEM_BATCH.feature_names):
        assert column in frame.columns, column
    first = write_training_snapshot(frame, batch_env.settings)
    assert write_training_snapshot(frame.copy(), batch_env.settings) == first
    path = batch_env.settings.data_dir / "training" / first / "part-0.parquet"
    assert pd.read_parquet(path).shape == frame.shape


def _plain(value: Any) -> Any:
    if isinstance(value, (list, np.ndarray)):
        return [str(v) for v in value]
    return None if value is None or pd.isna(value) else value


def test_the_native_join_gives_what_feast_gives(
    training: tuple[pd.DataFrame, pd.DataFrame], batch_env: BatchEnv
) -> None:
    impressions, frame = training
    # Beyond the history: a row past every view's TTL (its entity has rows, none in range)
    # and a user no view has seen.
    late = impressions.iloc[[0, 1]].copy()
    late["event_time"] = pd.to_datetime(late["event_time"], utc=True) + pd.Timedelta(days=30)
    late.iloc[1, late.columns.get_loc("user_id")] = "never-seen-user"
    rows = pd.concat([impressions, late], ignore_index=True)
    store = feature_store.load_store(batch_env.settings)
    native = build_training_set(store, rows)
    feast = build_training_set(store, rows, engine="feast")
    assert native.iloc[: len(frame)].equals(frame)
    assert native[F.USER_BATCH.feature_names[0]].iloc[-2:].isna().all()
    assert list(native.columns) == list(feast.columns)
    for column in native.columns:
        left, right = native[column], feast[column]
        if left.dtype == object:
            assert [_plain(v) for v in left] == [_plain(v) for v in right], column
        else:
            pd.testing.assert_series_equal(left, right, obj=column)


def test_the_native_join_reads_the_folders_the_feature_tables_are_written_to(
    batch_env: BatchEnv,
) -> None:
    # The native join finds a view's offline table through the Feast registry (its
    # FileSource); the batch job writes it under feature_store.offline_dir. One folder.
    store = feature_store.load_store(batch_env.settings)
    views = [v.name for v in store.list_feature_views()]
    assert F.USER_BATCH.name in views
    for view in views:
        assert view_folder(store, view).resolve() == (
            feature_store.offline_dir(batch_env.settings) / view).resolve(), view


def test_impressions_at_the_same_time_all_get_their_features(
    training: tuple[pd.DataFrame, pd.DataFrame], batch_env: BatchEnv
) -> None:
    # Two impressions of one user at one instant (a feed page): both rows get the user's
    # features. Feast's file offline store keeps one entity row per (key, timestamp), so
    # through `engine="feast"` the other would be left with nulls.
    _, frame = training
    seen = frame[frame[F.USER_BATCH.feature_names[0]].notna()].iloc[0]
    rows = pd.DataFrame([seen[list(IMPRESSION_COLUMNS)]] * 2).reset_index(drop=True)
    rows.loc[1, "item_id"] = frame["item_id"].iloc[-1]
    both = build_training_set(feature_store.load_store(batch_env.settings), rows)
    for column in F.USER_BATCH.feature_names:
        assert both[column].iloc[0] == both[column].iloc[1] == seen[column], column
    assert list(both[F.USER_HISTORY].iloc[1]) == list(seen[F.USER_HISTORY])
