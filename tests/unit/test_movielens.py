"""MovieLens ml-latest-small imports with the documented counts."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from recsys_core.contracts import validate_events
from recsys_core.errors import DatasetNotFoundError
from recsys_pipelines.movielens import load_movielens, summarize, training_rows


def test_counts_match_the_dataset(movielens_dir: Path) -> None:
    data = load_movielens(movielens_dir)
    summary = summarize(data)
    assert summary["interactions"] == 100_836
    assert summary["users"] == 610
    assert summary["items"] == 9_742
    assert summary["events"] == 100_836 + summary["positives"]
    assert data.items["item_id"].is_unique
    assert set(data.interactions["item_id"]) <= set(data.items["item_id"])


def test_events_fit_the_contract(movielens_dir: Path) -> None:
    data = load_movielens(movielens_dir)
    raw = data.events.assign(event_time=data.events["event_time"].dt.strftime("%Y-%m-%dT%H:%M:%SZ"))
    valid, rejected = validate_events(raw)
    assert rejected.empty and len(valid) == len(data.events)
    toy = data.items.set_index("item_id").loc["1"]  # MovieLens's own movieId
    assert toy["category"] == "Adventure" and "Animation" in list(toy["tags"])
    assert toy["published_at"].year == 1995


def test_missing_folder_says_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="ratings.csv"):
        load_movielens(tmp_path)


def test_training_rows_have_point_in_time_histories_of_positives(tmp_path: Path) -> None:
    t = pd.Timestamp("2020-01-01", tz="UTC")
    interactions = pd.DataFrame({
        "user_id": ["1"] * 4 + ["2"], "item_id": ["10", "11", "12", "13", "10"],
        "rating": [5.0, 2.0, 4.0, 4.5, 4.0],
        "event_time": [t, t + pd.Timedelta(1, "s"), t + pd.Timedelta(1, "s"),
                       t + pd.Timedelta(2, "s"), t],
    })
    interactions["positive"] = interactions["rating"] >= 4.0
    items = pd.DataFrame({"item_id": ["10", "11", "12", "13"], "category": "Drama",
                          "creator_id": "unknown", "tags": [["Drama"]] * 4,
                          "duration_ms": pd.array([None] * 4, dtype="Int64"),
                          "published_at": t - pd.Timedelta(days=2)})
    interactions.to_parquet(tmp_path / "interactions.parquet")
    items.to_parquet(tmp_path / "items.parquet")
    rows = training_rows(tmp_path)
    history = {(u, i): h for u, i, h in zip(rows["user_id"], rows["item_id"],
                                            rows["user_history"], strict=True)}
    assert history[("1", "10")] == [] and history[("2", "10")] == []
    # 11 and 12 share a second: neither sees the other; 13 sees both positives, newest first
    assert history[("1", "11")] == ["10"] and history[("1", "12")] == ["10"]
    assert history[("1", "13")] == ["12", "10"]
    assert dict(zip(rows["item_id"] + "/" + rows["user_id"], rows["clicked"], strict=True)) \
        == {"10/1": 1, "10/2": 1, "11/1": 0, "12/1": 1, "13/1": 1}
    assert (rows["item_age_days"] >= 2).all() and rows["watch_time_ms"].isna().all()
