"""Validation splits raw events into typed valid rows and rejected rows with reasons."""

from __future__ import annotations

import pandas as pd
import pytest

from recsys_core.contracts import (
    EVENT_SCHEMA,
    REASON_BAD_TIME,
    REASON_BAD_TYPE,
    REASON_NEGATIVE_WATCH,
    split_duplicates,
    to_table,
    validate_events,
)
from recsys_core.errors import ContractError


def _raw(**overrides: object) -> dict[str, object]:
    row: dict[str, object] = {
        "event_id": "e1", "event_time": "2026-11-01T10:00:00.000Z", "user_id": "u1",
        "item_id": "i1", "event_type": "watch", "watch_time_ms": 1000,
        "item_duration_ms": 2000, "surface": "feed", "device": "ios", "request_id": "r1",
        "model_version": None,
    }
    row.update(overrides)
    return row


def test_each_rule_gives_its_reason() -> None:
    raw = pd.DataFrame([
        _raw(),
        _raw(event_id="e2", user_id=None),
        _raw(event_id="e3", item_id=""),
        _raw(event_id="e4", event_time="soon"),
        _raw(event_id="e5", event_type="purchase"),
        _raw(event_id="e6", watch_time_ms=-5),
    ])
    valid, rejected = validate_events(raw)
    assert list(valid["event_id"]) == ["e1"]
    assert list(rejected["reason"]) == [
        "missing user_id", "missing item_id", REASON_BAD_TIME, REASON_BAD_TYPE,
        REASON_NEGATIVE_WATCH,
    ]
    assert len(valid) + len(rejected) == len(raw)
    assert str(valid["event_time"].dtype) == "datetime64[ms, UTC]"
    to_table(valid, EVENT_SCHEMA)  # the typed rows fit the lake contract


def test_missing_column_is_a_contract_error() -> None:
    with pytest.raises(ContractError, match=r"missing required columns \['user_id'\]"):
        validate_events(pd.DataFrame([_raw()]).drop(columns="user_id"))


def test_duplicates_keep_first() -> None:
    frame = pd.DataFrame([_raw(), _raw(), _raw(event_id="e2")])
    unique, dups = split_duplicates(frame)
    assert list(unique["event_id"]) == ["e1", "e2"] and len(dups) == 1


@pytest.mark.parametrize("overrides, reason", [
    ({"user_id": "../../etc/passwd"}, "user_id is not an id"),
    ({"user_id": "u1\r\nX-Injected: 1"}, "user_id is not an id"),
    ({"user_id": "u\x001"}, "user_id is not an id"),
    ({"item_id": "i" * 20_000}, "item_id is not an id"),
    ({"event_id": "e 1"}, "event_id is not an id"),
    ({"request_id": "<script>"}, "request_id is not an id"),
    ({"surface": "evil<script>"}, "surface not in feed|search|related|notification"),
    ({"surface": "x" * 1_000_000}, "surface not in"),
    ({"device": "toaster"}, "device not in ios|android|web|tv"),
])
def test_hostile_fields_are_rejected_with_a_reason(overrides: dict[str, object],
                                                   reason: str) -> None:
    """The probe's served impressions (hostile ids, surfaces, devices) passed the ETL as clean
    events; every event is now held to the id charset and the contract's vocabularies."""
    valid, rejected = validate_events(pd.DataFrame([_raw(), _raw(**{"event_id": "e2",
                                                                    **overrides})]))
    assert list(valid["event_id"]) == ["e1"]
    assert len(rejected) == 1 and rejected["reason"][0].startswith(reason), rejected["reason"]


def test_optional_fields_may_be_null() -> None:
    valid, rejected = validate_events(pd.DataFrame([
        _raw(surface=None, device=None, request_id=None, model_version=None),
        _raw(event_id="p_1a2b", user_id="p_0123456789abcdef01234567", model_version="12",
             request_id="9f8e7d-3", item_id="ml-imp:m1@2"),
    ]))
    assert rejected.empty and len(valid) == 2
