"""The fast materialization writes Feast's bytes, and only what changed (real Redis, DB 1)."""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import pyarrow as pa
import pytest
import redis

from recsys_core import features as F
from recsys_core import online_layout
from recsys_pipelines import feature_store
from recsys_pipelines.batch_features import day_end
from recsys_pipelines.materialize import latest_rows, view_specs
from tests.fixtures.feast_store import BatchEnv

pytestmark = pytest.mark.integration
SAMPLE = 25


def test_fast_materialization_equals_feasts_own_on_a_sample(features_state: Any,
                                                             batch_env: BatchEnv) -> None:
    """The features flow materialized with the fast writer; Feast's own conversion and Redis
    writer (what ``store.materialize`` calls) rewrite a sample of rows: same bytes."""
    from feast.infra.online_stores.redis import RedisOnlineStore
    from feast.utils import _convert_arrow_to_proto

    assert features_state.is_completed()
    settings = batch_env.settings
    store = feature_store.load_store(settings)
    client = redis.Redis.from_url(settings.redis.url)
    end = day_end(batch_env.end).to_pydatetime()
    start = day_end(batch_env.start).to_pydatetime()
    for spec in view_specs(store, F.BATCH_VIEWS):
        table = latest_rows(feature_store.offline_dir(settings) / spec.name, spec.join_key,
                            start, end)
        rows = np.linspace(0, table.num_rows - 1, SAMPLE).astype(int)
        sample = table.take(rows)
        # As Feast's offline store hands rows to its writer: timestamps in ns (Feast reads a
        # millisecond column's integers as nanoseconds).
        at = sample.schema.get_field_index(F.WINDOW_END)
        sample = sample.set_column(at, F.WINDOW_END, sample.column(at).cast(
            pa.timestamp("ns", tz="UTC")))
        ids = [str(i) for i in sample.column(spec.join_key).to_pylist()]
        keys = [online_layout.entity_key(spec.join_key, i, store.config.project, 3) for i in ids]
        fields = [online_layout.timestamp_field(spec.name).encode()] + [
            online_layout.feature_field(spec.name, name) for name, _ in spec.features]
        fast = [client.hmget(k, fields) for k in keys]
        assert all(all(v is not None for v in row) for row in fast), spec.name
        for key in keys:
            client.hdel(key, *fields)
        view = store.get_feature_view(spec.name)
        data = _convert_arrow_to_proto(sample, view, {spec.join_key: view.entity_columns[0]
                                                      .dtype.to_value_type()})
        RedisOnlineStore().online_write_batch(store.config, view, data, None)
        feast = [client.hmget(k, fields) for k in keys]
        assert feast == fast, spec.name


def test_a_second_run_writes_only_what_changed(features_state: Any, batch_env: BatchEnv) -> None:
    assert features_state.is_completed()
    settings = batch_env.settings
    window = (day_end(batch_env.start).to_pydatetime(), day_end(batch_env.end).to_pydatetime())
    again = feature_store.materialize(settings, *window, views=["item_batch"])
    assert again.rows > 0 and again.written == 0  # nothing changed since the flow's run
    client = redis.Redis.from_url(settings.redis.url)
    marker = f"{settings.redis.key_prefix}:materialized:item_batch:{settings.feast.project}"
    saved = cast(bytes, client.get(marker))
    client.set(marker, b"someone-else")  # Redis no longer holds that run: write everything
    full = feature_store.materialize(settings, *window, views=["item_batch"])
    assert full.written == full.rows == again.rows
    assert cast(bytes, client.get(marker)) != saved
