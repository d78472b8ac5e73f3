"""MovieLens ml-latest-small imports with the documented counts."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys_pipelines.movielens import load_movielens, summarize
from recsys_platform.contracts import validate_events
from recsys_platform.errors import DatasetNotFoundError


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
