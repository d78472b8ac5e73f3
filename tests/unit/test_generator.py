"""Synthetic generator: deterministic, counted dirt that the validators catch exactly."""

from __future__ import annotations

import hashlib
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from recsys_core.contracts import EVENT_TYPES, split_duplicates, validate_events
from recsys_pipelines.generator import (
    MALFORMED_KINDS,
    GeneratorConfig,
    expected_clicks,
    generate,
    write_generated,
)

SMALL = GeneratorConfig(events=30_000, days=5, users=300, items=600, new_users_per_day=10,
                        new_items_per_day=20, dirt_rate=0.01, seed=3)


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    write_generated(generate(SMALL), tmp_path / "a", jsonl_dir=tmp_path / "a" / "stream")
    write_generated(generate(SMALL), tmp_path / "b", jsonl_dir=tmp_path / "b" / "stream")
    a, b = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert a == b and len(a) >= SMALL.days + 3


def test_other_seed_differs() -> None:
    a = generate(SMALL).events
    b = generate(GeneratorConfig(**{**SMALL.__dict__, "seed": 4})).events
    assert not a["item_id"].equals(b["item_id"])


def test_validation_catches_exactly_the_injected_dirt() -> None:
    data = generate(SMALL)
    dirt = data.dirt
    assert dirt.duplicates > 0 and dirt.late > 0 and dirt.malformed_total > 0
    valid, rejected = validate_events(data.events)
    counts = rejected["reason"].value_counts().to_dict()
    assert counts == {k: v for k, v in dirt.malformed.items() if v}
    assert set(counts) == set(MALFORMED_KINDS)
    unique, dups = split_duplicates(valid)
    assert len(dups) == dirt.duplicates
    landed = pd.to_datetime(unique["landing_date"])
    late = unique["event_time"].dt.tz_localize(None).dt.normalize() < landed
    assert int(late.sum()) == dirt.late
    assert len(unique) + len(dups) + len(rejected) == len(data.events)


def test_clean_data_has_no_dirt_and_all_event_types() -> None:
    data = generate(GeneratorConfig(**{**SMALL.__dict__, "dirt_rate": 0.0}))
    valid, rejected = validate_events(data.events)
    assert rejected.empty and split_duplicates(valid)[1].empty
    assert set(valid["event_type"]) == set(EVENT_TYPES)


def test_ground_truth_drives_clicks() -> None:
    data = generate(GeneratorConfig(**{**SMALL.__dict__, "dirt_rate": 0.0}))
    ev = data.events
    users = ev["user_id"].str.slice(1).astype(int).to_numpy()
    items = ev["item_id"].str.slice(1).astype(int).to_numpy()
    match = np.einsum("nd,nd->n", data.user_factors[users], data.item_factors[items])
    clicked = (ev["event_type"] == "click").to_numpy()
    shown = (ev["event_type"] == "impression").to_numpy()
    assert match[clicked].mean() > match[shown].mean() + 0.5


def test_cold_start_entities_arrive_daily() -> None:
    data = generate(SMALL)
    start = pd.Timestamp(SMALL.start, tz="UTC")
    assert (data.items["published_at"] >= start).sum() == SMALL.new_items_per_day * SMALL.days
    assert (data.users["signup_at"] >= start).sum() == SMALL.new_users_per_day * SMALL.days


def test_layout_is_partitioned_by_date(tmp_path: Path) -> None:
    result = write_generated(generate(SMALL), tmp_path)
    days = sorted(p.name for p in (tmp_path / "events").iterdir())
    assert days[0] == f"date={date(2026, 11, 1).isoformat()}"
    total = sum(pq.read_metadata(p).num_rows for p in (tmp_path / "events").rglob("*.parquet"))
    assert total == result.events


@pytest.mark.slow
def test_one_million_events_is_fast() -> None:
    import time

    t0 = time.perf_counter()
    data = generate(GeneratorConfig(events=1_000_000, users=20_000, items=50_000, dirt_rate=0.01))
    elapsed = time.perf_counter() - t0
    print(f"generated {len(data.events):,} events in {elapsed:.1f}s")
    assert 800_000 <= len(data.events) <= 1_200_000


def test_expected_clicks_follow_the_impression_policy_and_the_latent_match() -> None:
    cfg = GeneratorConfig(events=5_000, days=2, users=50, items=200, seed=5)
    data = generate(cfg)
    items = np.arange(len(data.items))
    scores = expected_clicks(data, cfg, np.arange(5), items)
    assert scores.shape == (5, len(items)) and np.all(scores > 0) and np.all(scores < 1)
    # The policy's half of the slots per item sums to 0.5 (popularity) + 0.5 (categories).
    category = data.items["category"].str.slice(3).astype(int).to_numpy()
    for u in range(5):
        favourite = np.isin(category, data.user_categories[u])
        others = ~favourite & (data.popularity_prior < np.median(data.popularity_prior))
        # an unpopular item of a favourite category beats an unpopular item of another one
        assert np.median(scores[u, favourite]) > np.median(scores[u, others])


def test_category_share_sets_how_personalized_the_impressions_are() -> None:
    def favourite_share(share: float) -> float:
        cfg = GeneratorConfig(events=20_000, days=2, users=100, items=400, categories=20,
                              category_share=share, seed=5)
        data = generate(cfg)
        shown = data.events[data.events["event_type"] == "impression"]
        user = shown["user_id"].str.slice(1).astype(int).to_numpy()
        item = shown["item_id"].str.slice(1).astype(int).to_numpy()
        category = data.items["category"].str.slice(3).astype(int).to_numpy()[item]
        fav = data.user_categories[user]
        return float(((category == fav[:, 0]) | (category == fav[:, 1])).mean())

    # the popularity slots land in a favourite category ~10% of the time (2 of 20)
    assert 0.5 < favourite_share(0.5) < 0.6
    assert 0.8 < favourite_share(0.8) < 0.87
