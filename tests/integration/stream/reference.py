"""A small pandas reference of the documented feature semantics (the batch side of parity).

``recsys_core.features``: an aggregate at time ``t`` over window ``w`` covers
``t - w < event_time <= t``; ratios use :func:`recsys_core.features.ratio`; the recent
items are the ``HISTORY_LENGTH`` newest distinct items engaged with at or before ``t``, newest
first (ties: newer ``event_id`` first), as the batch ``user_history``.
(The batch engineer's Ray pipeline computes day-end windows only, so the minute windows of
the stream groups are checked against this reference.)
"""

from __future__ import annotations

from datetime import timedelta

import pandas as pd

from recsys_core.features import (
    ENGAGEMENT_TYPES,
    ENTITY_KEYS,
    HISTORY_LENGTH,
    USER_RECENT_ITEMS,
    FeatureGroup,
    ratio,
)


def clean_events(valid: pd.DataFrame) -> pd.DataFrame:
    """Valid events (from ``contracts.validate_events``) with ``ms`` epoch milliseconds."""
    out = valid.copy()
    out["ms"] = out["event_time"].astype("datetime64[ms, UTC]").astype("int64")
    return out


def group_values(events: pd.DataFrame, group: FeatureGroup, entity_id: str,
                 t_ms: int, recent: bool = False) -> dict[str, object]:
    """The features of one entity at time ``t_ms``."""
    key = ENTITY_KEYS[group.entity]
    mine = events[(events[key] == entity_id) & (events["ms"] <= t_ms)]
    values: dict[str, object] = {}
    for agg in group.aggregates:
        w_ms = int(agg.window / timedelta(milliseconds=1))
        rows = mine[(mine["ms"] > t_ms - w_ms) & mine["event_type"].isin(agg.event_types)]
        if agg.kind == "count":
            values[agg.name] = len(rows)
        else:
            values[agg.name] = int(rows[agg.column].fillna(0).sum())
    for r in group.ratios:
        values[r.name] = ratio(values[r.numerator], values[r.denominator])  # type: ignore[arg-type]
    if recent:
        engaged = mine[mine["event_type"].isin(ENGAGEMENT_TYPES)]
        engaged = engaged.sort_values(["ms", "event_id"], ascending=False)
        # Distinct items by their newest engagement, like the batch user_history.
        distinct = engaged.drop_duplicates("item_id", keep="first")
        values[USER_RECENT_ITEMS] = distinct["item_id"].head(HISTORY_LENGTH).tolist()
    return values


def last_window_end(events: pd.DataFrame, group: FeatureGroup, entity_id: str,
                    size: timedelta, slide: timedelta, until_ms: int) -> int | None:
    """The newest HOP window end ``<= until_ms`` whose window holds an event of the entity."""
    key = ENTITY_KEYS[group.entity]
    s_ms, w_ms = int(slide / timedelta(milliseconds=1)), int(size / timedelta(milliseconds=1))
    times = events.loc[events[key] == entity_id, "ms"]
    if times.empty:
        return None
    # Event at ms belongs to windows with end in [ms, ms + size), ends on the slide grid
    # (ms - 1 is the rowtime: start <= ms - 1 < end).
    best = None
    for ms in times:
        last_end = ((ms - 1) // s_ms + 1) * s_ms + w_ms - s_ms  # last window holding it
        end = min(last_end, (until_ms // s_ms) * s_ms)
        first_end = ((ms - 1) // s_ms + 1) * s_ms
        if end >= first_end and (best is None or end > best):
            best = end
    return best
