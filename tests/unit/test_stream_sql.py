"""The stream job's SQL text and sink logic that need no Flink: pseudonyms, dedupe, lateness,
distinct recent items."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np

from recsys_core.features import HISTORY_LENGTH
from recsys_core.privacy import pseudonym_sql
from recsys_core.settings import Settings
from recsys_pipelines.batch_features import _recent_distinct
from recsys_pipelines.stream import sql
from recsys_pipelines.stream.job import options_from_settings
from recsys_pipelines.stream.sink import items_until, merge_recent


def test_user_id_is_pseudonymized_at_parse_time_only_when_enabled(tmp_path: Path) -> None:
    off = options_from_settings(Settings(data_dir=tmp_path))
    assert off.pseudonym_key is None
    assert "SHA2" not in sql.parsed_view_sql(None, off.pseudonym_key)
    on = options_from_settings(Settings(data_dir=tmp_path,
                                        privacy={"pseudonymize": True, "key": "k1"}))
    assert on.pseudonym_key == "k1"
    assert f"{pseudonym_sql('user_id', 'k1')} AS user_id" in sql.parsed_view_sql(None, "k1")


def test_late_split_bounds_rows_by_watermark_minus_allowed_lateness() -> None:
    on_time, applied, late = sql.split_views_sql(timedelta(minutes=5))
    assert "rowtime > CURRENT_WATERMARK(rowtime)" in on_time
    assert "rowtime > TIMESTAMPADD(SECOND, -300, CURRENT_WATERMARK(rowtime))" in applied
    assert "rowtime <= TIMESTAMPADD(SECOND, -300, CURRENT_WATERMARK(rowtime))" in late
    assert sql.UNIQUE_VIEW in on_time and sql.UNIQUE_VIEW in late  # after the dedupe
    assert "PARTITION BY event_id" in sql.unique_query()


def test_recent_items_are_distinct_newest_first_like_batch_user_history() -> None:
    rng = np.random.default_rng(7)
    # (ms, event_id, item): repeated items, equal times broken by event_id (as strings).
    entries = [(int(ms), f"e{i}", f"i{item}") for i, (ms, item) in
               enumerate(zip(rng.integers(0, 50, 200), rng.integers(0, 40, 200), strict=True))]
    ordered = sorted(entries, key=lambda e: (e[0], e[1]))
    batch = _recent_distinct(np.array([e[2] for e in ordered], dtype=object), len(ordered),
                             HISTORY_LENGTH)
    kept: list[tuple[int, str, str]] = []
    for start in range(0, len(entries), 17):  # arrival in batches, in any order
        kept = merge_recent(kept, entries[start:start + 17])
    assert items_until(kept, 10**9) == batch
    assert len(set(batch)) == len(batch) == HISTORY_LENGTH
