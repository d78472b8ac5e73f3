"""Impression labelling and snapshot ids (pure logic)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from recsys_pipelines.training_set import (
    IMPRESSION_COLUMNS,
    label_impressions,
    snapshot_id,
    write_training_snapshot,
)
from recsys_platform.settings import load_settings


def _events(rows: list[tuple[str, str, str, str, str, int | None]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["event_id", "event_time", "event_type", "item_id",
                                        "request_id", "watch_time_ms"])
    frame["event_time"] = pd.to_datetime(frame["event_time"], utc=True)
    frame["user_id"] = "u1"
    frame["item_duration_ms"] = pd.array([30_000] * len(frame), dtype="Int64")
    frame["watch_time_ms"] = pd.array(frame["watch_time_ms"], dtype="Int64")
    return frame


def test_impressions_get_the_later_click_and_watch_of_the_same_request_only() -> None:
    events = _events([
        ("e1", "2026-11-01T10:00:00Z", "impression", "i1", "r1", None),
        ("e2", "2026-11-01T10:00:01Z", "click", "i1", "r1", None),
        ("e3", "2026-11-01T10:00:20Z", "watch", "i1", "r1", 19_000),
        ("e4", "2026-11-01T10:00:00Z", "impression", "i2", "r1", None),
        ("e5", "2026-11-01T10:00:01Z", "click", "i2", "r2", None),  # another request
        ("e6", "2026-11-01T12:00:00Z", "impression", "i3", "r3", None),
        ("e7", "2026-11-01T13:30:00Z", "click", "i3", "r3", None),  # after the label window
        ("e8", "2026-11-01T09:00:00Z", "click", "i3", "r3", None),  # before the impression
    ])
    out = label_impressions(events).set_index("item_id")
    assert list(label_impressions(events).columns) == list(IMPRESSION_COLUMNS)
    assert out.loc["i1", "clicked"] == 1 and out.loc["i1", "watch_time_ms"] == 19_000.0
    assert out.loc["i2", "clicked"] == 0 and np.isnan(out.loc["i2", "watch_time_ms"])
    assert out.loc["i3", "clicked"] == 0
    assert out["item_duration_ms"].dtype == np.float64


def test_snapshot_id_is_a_content_hash_and_writing_twice_is_a_no_op(tmp_path: Path) -> None:
    frame = pd.DataFrame({"user_id": ["u1", "u2"], "clicked": [0, 1],
                          "user_history": [["i1"], []]})
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(tmp_path)}))
    settings = load_settings("local", config)
    sid = write_training_snapshot(frame, settings)
    assert sid == snapshot_id(frame.copy()) == write_training_snapshot(frame, settings)
    assert sid != snapshot_id(frame.assign(clicked=[1, 1]))
    back = pd.read_parquet(tmp_path / "training" / sid)
    assert back[["user_id", "clicked"]].equals(frame[["user_id", "clicked"]])
    assert [list(h) for h in back["user_history"]] == [["i1"], []]


@pytest.mark.parametrize("column", ["clicked", "event_time"])
def test_missing_impression_columns_are_named(column: str) -> None:
    from recsys_pipelines.errors import TrainingSetError
    from recsys_pipelines.training_set import build_training_set

    frame = pd.DataFrame({c: [] for c in IMPRESSION_COLUMNS if c != column})
    with pytest.raises(TrainingSetError, match=column):
        build_training_set(None, frame)  # type: ignore[arg-type]
