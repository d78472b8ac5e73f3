"""Impression labelling and snapshot ids (pure logic)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from recsys_core.settings import load_settings
from recsys_pipelines.training_set import (
    IMPRESSION_COLUMNS,
    label_impressions,
    snapshot_id,
    write_training_snapshot,
)


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


def test_impressions_wait_until_their_label_window_has_closed() -> None:
    from datetime import UTC, datetime, timedelta

    from recsys_pipelines.training_set import join_labels

    events = _events([
        ("e1", "2026-11-01T10:00:00Z", "impression", "i1", "r1", None),
        ("e2", "2026-11-01T10:30:00Z", "click", "i1", "r1", None),
        ("e3", "2026-11-01T11:00:00Z", "impression", "i2", "r2", None),  # window still open
        ("e4", "2026-11-01T11:10:00Z", "click", "i2", "r2", None),
        ("e5", "2026-11-01T11:20:00Z", "impression", "i3", "r3", None),
    ])
    joined = join_labels(events, timedelta(hours=1))  # as_of: the newest event, 11:20
    assert joined.impressions["item_id"].tolist() == ["i1"] and joined.pending == 2
    assert joined.impressions["clicked"].tolist() == [1]
    assert joined.as_of == pd.Timestamp("2026-11-01T11:20:00Z")
    later = join_labels(events, timedelta(hours=1), as_of=datetime(2026, 11, 1, 12, 30, tzinfo=UTC))
    assert later.impressions["item_id"].tolist() == ["i1", "i2", "i3"] and later.pending == 0
    assert later.impressions["clicked"].tolist() == [1, 1, 0]
    # Events after an explicit as_of are ignored: the same as_of gives the same rows.
    early = join_labels(events, timedelta(minutes=20), as_of=datetime(2026, 11, 1, 10, 25,
                                                                      tzinfo=UTC))
    assert early.impressions["clicked"].tolist() == [0] and early.pending == 0
    short = label_impressions(events, timedelta(minutes=5))
    assert short["item_id"].tolist() == ["i1", "i2"] and short["clicked"].tolist() == [0, 0]


def test_forgotten_users_are_left_out_of_new_snapshots(tmp_path: Path) -> None:
    from recsys_core.privacy import FORGET_LIST, add_to_forget_list, pseudonymize, tombstone

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(tmp_path)}))
    settings = load_settings("local", config)
    key = settings.privacy.key
    frame = pd.DataFrame({"user_id": ["u1", pseudonymize("u2", key), "u3"], "clicked": [0, 1, 1]})
    add_to_forget_list(tmp_path / FORGET_LIST, tombstone("u2", key))
    sid = write_training_snapshot(frame, settings)
    assert pd.read_parquet(tmp_path / "training" / sid)["user_id"].tolist() == ["u1", "u3"]


def test_training_rows_take_the_user_features_and_history_as_served(tmp_path: Path) -> None:
    """Rows of a request logged with its features get the served values (stream features
    included), the others keep the point-in-time join's; the snapshot's metadata counts both."""
    import json

    import pyarrow.parquet as pq

    from recsys_core.contracts import SERVED_SCHEMA
    from recsys_pipelines.training_set import (
        SOURCE_METADATA,
        attach_served_features,
        read_served_features,
    )

    served_at = pd.Timestamp("2026-11-01T10:00:00Z")
    rows = [{"request_id": "r1", "user_id": "u1", "item_id": i, "position": n, "score": 1.0,
             "source": "retrieval", "bundle_version": "3", "served_at": served_at,
             "user_features": json.dumps({"user_ctr_7d": 0.25, "user_clicks_10m": 4}),
             "user_history": json.dumps(["i9", "i8"])} for n, i in enumerate(["i1", "i2"])]
    rows.append({**rows[0], "request_id": "r0", "user_features": None, "user_history": None})
    folder = tmp_path / "landing" / "served" / "date=2026-11-01"
    folder.mkdir(parents=True)
    pq.write_table(pa_table(rows, SERVED_SCHEMA), folder / "served-1.parquet")
    served = read_served_features(tmp_path / "landing")
    assert list(served["request_id"]) == ["r1"]  # one row per logged request, with features

    frame = pd.DataFrame({"request_id": ["r1", "r1", "r2"], "user_id": ["u1", "u1", "u2"],
                          "item_id": ["i1", "i2", "i3"], "user_ctr_7d": [0.1, 0.1, 0.5],
                          "user_history": [["i7"], ["i7"], ["i6"]]})
    out = attach_served_features(frame, served)
    assert list(out["features_source"]) == ["served", "served", "point_in_time"]
    assert list(out["user_ctr_7d"]) == [0.25, 0.25, 0.5]
    assert out["user_clicks_10m"].iloc[:2].tolist() == [4.0, 4.0]
    assert np.isnan(out["user_clicks_10m"].iloc[2])  # a stream feature: served rows only
    assert list(out["user_history"]) == [["i9", "i8"], ["i9", "i8"], ["i6"]]

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(tmp_path)}))
    sid = write_training_snapshot(out.drop(columns="request_id"), load_settings("local", config))
    meta = pq.read_schema(tmp_path / "training" / sid / "part-0.parquet").metadata
    assert json.loads(meta[SOURCE_METADATA]) == {"served": 2, "point_in_time": 1}


def pa_table(rows: list[dict[str, object]], schema: object) -> object:
    import pyarrow as pa

    assert isinstance(schema, pa.Schema)
    return pa.Table.from_pylist(rows, schema=schema)
