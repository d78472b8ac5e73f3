"""Independent, slow reference of the feature semantics in ``recsys_core.features``.

Computed straight from lake events with the documented window ``(t - w, t]``, one entity at a
time, so that the batch pipeline (Ray Data + cumulative sums) is checked against the
definition rather than against itself.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from recsys_core import features as F


def windowed(events: pd.DataFrame, group: F.FeatureGroup, entity_id: str,
             t: pd.Timestamp) -> dict[str, Any]:
    key = F.ENTITY_KEYS[group.entity]
    mine = events[events[key] == entity_id]
    values: dict[str, Any] = {}
    for agg in group.aggregates:
        hit = mine[(mine["event_time"] > t - agg.window) & (mine["event_time"] <= t)
                   & mine["event_type"].isin(agg.event_types)]
        if agg.kind == "count":
            values[agg.name] = len(hit)
        else:
            values[agg.name] = int(hit[agg.column].fillna(0).sum())
    for r in group.ratios:
        values[r.name] = F.ratio(values[r.numerator], values[r.denominator])
    return values


def history(events: pd.DataFrame, user_id: str, t: pd.Timestamp) -> list[str]:
    mine = events[(events["user_id"] == user_id) & (events["event_time"] <= t)
                  & events["event_type"].isin(F.ENGAGEMENT_TYPES)]
    ordered = mine.sort_values(["event_time", "event_id"], ascending=False)
    return list(dict.fromkeys(ordered["item_id"]))[: F.HISTORY_LENGTH]


def top_categories(events: pd.DataFrame, items: pd.DataFrame, user_id: str,
                   t: pd.Timestamp) -> list[str]:
    mine = events[(events["user_id"] == user_id) & (events["event_time"] <= t)
                  & (events["event_time"] > t - pd.Timedelta(days=30))
                  & events["event_type"].isin(F.ENGAGEMENT_TYPES)]
    cats = mine["item_id"].map(items.set_index("item_id")["category"]).value_counts()
    ranked = sorted(cats.items(), key=lambda kv: (-kv[1], kv[0]))
    return [c for c, _ in ranked[: F.TOP_CATEGORIES]]
