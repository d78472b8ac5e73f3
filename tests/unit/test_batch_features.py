"""Pure batch-feature logic: day buckets, sliding windows, history, schemas vs definitions."""

from __future__ import annotations

from datetime import date

import numpy as np
import pandas as pd

from recsys_core import features as F
from recsys_pipelines import batch_features as bf


def test_an_event_at_exactly_midnight_belongs_to_the_day_it_ends() -> None:
    times = pd.Series(pd.to_datetime(["2026-11-02T00:00:00Z", "2026-11-02T00:00:00.001Z",
                                      "2026-11-01T00:00:00.001Z"], utc=True,
                                     format="ISO8601"))
    b = bf.bucket_of(times)
    nov1 = (date(2026, 11, 1) - bf.EPOCH).days
    assert list(b) == [nov1, nov1 + 1, nov1]
    assert bf.day_end(date(2026, 11, 1)) == pd.Timestamp("2026-11-02", tz="UTC")


def test_windows_sum_the_last_w_day_buckets_and_ratios_follow_the_definition() -> None:
    nov = (date(2026, 11, 1) - bf.EPOCH).days
    bases = {bf._base(a).name for a in F.USER_BATCH.aggregates}
    clicks, imps = bf._Base(("click",), "count", None).name, bf._Base(("impression",), "count",
                                                                       None).name
    daily = pd.DataFrame({"user_id": ["u1", "u1", "u1", "u2"],
                          "_day": [nov - 8, nov - 1, nov, nov]})
    for name in bases:
        daily[name] = 0
    daily[imps] = [10, 4, 2, 5]
    daily[clicks] = [1, 1, 1, 0]
    out = bf.windowed_features(daily, "user_id", F.USER_BATCH, [date(2026, 11, 1)])
    u1 = out.set_index("user_id").loc["u1"]
    assert (u1["user_impressions_1d"], u1["user_impressions_7d"], u1["user_impressions_30d"]) \
        == (2, 6, 16)
    assert u1["user_ctr_7d"] == F.ratio(2, 6)
    u2 = out.set_index("user_id").loc["u2"]
    assert u2["user_ctr_1d"] == 0.0 and u2["user_clicks_30d"] == 0
    assert out["window_end"].eq(pd.Timestamp("2026-11-02", tz="UTC")).all()


def test_no_row_before_an_entitys_first_event() -> None:
    nov = (date(2026, 11, 1) - bf.EPOCH).days
    daily = pd.DataFrame({"user_id": ["u1"], "_day": [nov + 1]})
    for a in F.USER_BATCH.aggregates:
        daily[bf._base(a).name] = 1
    out = bf.windowed_features(daily, "user_id", F.USER_BATCH,
                               [date(2026, 11, 1), date(2026, 11, 2)])
    assert list(out["window_end"]) == [pd.Timestamp("2026-11-03", tz="UTC")]


def test_history_is_distinct_newest_first_and_capped() -> None:
    items = np.array([f"i{n % 25}" for n in range(60)], dtype=object)
    recent = bf._recent_distinct(items, 60, F.HISTORY_LENGTH)
    assert len(recent) == F.HISTORY_LENGTH and recent[0] == "i9" and len(set(recent)) == 20
    assert bf._recent_distinct(items, 3, F.HISTORY_LENGTH) == ["i2", "i1", "i0"]


def test_offline_schemas_carry_every_defined_feature() -> None:
    schemas = bf.view_schemas()
    for group in (*F.BATCH_GROUPS, *F.STREAM_GROUPS):
        assert set(group.feature_names) <= set(schemas[group.name].names)
        assert F.WINDOW_END in schemas[group.name].names
    assert F.USER_RECENT_ITEMS in schemas[F.USER_STREAM.name].names
    assert {F.USER_HISTORY, F.USER_TOP_CATEGORIES} <= set(schemas["user_history"].names)
    assert {*F.ITEM_METADATA, F.ITEM_AGE_DAYS} <= set(schemas["item_metadata"].names)
