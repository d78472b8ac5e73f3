"""Batch features through real Ray, real Feast and the real Redis (database 1)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

from recsys_core import features as F
from recsys_pipelines import etl, feature_store
from recsys_pipelines.batch_features import day_end, read_catalog
from tests.fixtures.feast_store import BatchEnv
from tests.integration.batch import reference

pytestmark = pytest.mark.integration
SAMPLE = 8


def _sample(ids: pd.Series, n: int = SAMPLE) -> list[str]:
    unique = np.sort(ids.unique())
    return [str(i) for i in unique[np.linspace(0, unique.size - 1, n).astype(int)]]


def test_features_flow_completes_and_reports_counts(features_state: Any) -> None:
    assert features_state.is_completed(), features_state.message
    result = features_state.result()
    assert set(result["rows"]) == {"user_batch", "item_batch", "user_history", "item_metadata"}
    assert all(n > 0 for n in result["rows"].values())
    assert result["online"]["rows"] > 0


def test_online_user_features_equal_the_lake(features_state: Any, batch_env: BatchEnv) -> None:
    events = etl.read_lake_events(batch_env.settings.lake_dir)
    items = read_catalog(batch_env.settings.lake_dir)
    t = day_end(batch_env.end)
    users = _sample(events["user_id"])
    store = feature_store.load_store(batch_env.settings)
    online = feature_store.online_features(store, "user", users, ("user_batch", "user_history"))
    assert len(online) == len(users)
    for _, row in online.iterrows():
        user = row[F.USER_KEY]
        expected = reference.windowed(events, F.USER_BATCH, user, t)
        got = {name: row[name] for name in F.USER_BATCH.feature_names}
        assert got == pytest.approx(expected, rel=1e-12), user
        assert list(row[F.USER_HISTORY]) == reference.history(events, user, t)
        assert list(row[F.USER_TOP_CATEGORIES]) == reference.top_categories(events, items,
                                                                             user, t)


def test_online_item_features_equal_the_lake(features_state: Any, batch_env: BatchEnv) -> None:
    events = etl.read_lake_events(batch_env.settings.lake_dir)
    catalog = read_catalog(batch_env.settings.lake_dir).set_index(F.ITEM_KEY)
    t = day_end(batch_env.end)
    item_ids = _sample(events["item_id"])
    store = feature_store.load_store(batch_env.settings)
    online = feature_store.online_features(store, "item", item_ids,
                                           ("item_batch", "item_metadata"))
    for _, row in online.iterrows():
        item = row[F.ITEM_KEY]
        expected = reference.windowed(events, F.ITEM_BATCH, item, t)
        assert {n: row[n] for n in F.ITEM_BATCH.feature_names} == pytest.approx(expected), item
        meta = catalog.loc[item]
        assert row["category"] == meta["category"] and row["creator_id"] == meta["creator_id"]
        assert list(row["tags"]) == list(meta["tags"])
        assert row["duration_ms"] == meta["duration_ms"]
        age = (t - meta["published_at"]).total_seconds() / 86_400
        assert row[F.ITEM_AGE_DAYS] == pytest.approx(age)


def test_an_unknown_entity_has_no_online_values(features_state: Any, batch_env: BatchEnv) -> None:
    store = feature_store.load_store(batch_env.settings)
    online = feature_store.online_features(store, "user", ["u-never-seen"], ("user_batch",))
    assert online[F.USER_BATCH.feature_names].isna().all(axis=None)


def test_feasts_own_cli_reads_the_generated_repository(
    features_state: Any, batch_env: BatchEnv
) -> None:
    import subprocess
    import sys
    from pathlib import Path

    feast = Path(sys.executable).parent / "feast"
    repo = feature_store.repo_path(batch_env.settings)
    out = subprocess.run([str(feast), "-c", str(repo), "feature-views", "list"],
                         capture_output=True, text=True, timeout=120, check=True)
    for view in ("user_batch", "item_batch", "user_history", "item_metadata", "user_stream",
                 "item_trending"):
        assert view in out.stdout


def test_the_hourly_materialize_flow_completes(
    features_state: Any, batch_env: BatchEnv, prefect_harness: None
) -> None:
    from recsys_platform.flows.data import materialize_flow

    end = (day_end(batch_env.end) + pd.Timedelta(hours=1)).to_pydatetime()
    state = materialize_flow(end=end, config_file=str(batch_env.config_file), return_state=True)
    assert state.is_completed(), state.message
    assert state.result()["views"] == list(F.BATCH_VIEWS)
