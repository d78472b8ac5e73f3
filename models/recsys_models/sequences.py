"""Engagement sequences: the point-in-time history each training row and each query sees.

The user tower reads a user's recent engagement sequence (newest first, at most
``history_length`` distinct items). Training builds one next-item example from every
engagement in the lake: the input is what the user had engaged with strictly before that
engagement's time, the target is the engaged item. Nothing at or after the row's time ever
enters its input (:func:`pit_histories`), which is also what serving has online (the stream's
recent items, then the batch history).

Example:
    >>> rows[USER_HISTORY] = pit_histories(rows, engaged=rows["clicked"] == 1, length=20)
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def _recent_distinct(items: np.ndarray, stop: int, length: int) -> list[str]:
    """The last ``length`` distinct items of ``items[:stop]``, newest first."""
    out: list[str] = []
    seen: set[str] = set()
    for pos in range(stop - 1, -1, -1):
        item = items[pos]
        if item in seen:
            continue
        seen.add(item)
        out.append(item)
        if len(out) == length:
            break
    return out


def pit_histories(rows: pd.DataFrame, engaged: pd.Series | np.ndarray, length: int,
                  events: pd.DataFrame | None = None) -> list[list[str]]:
    """Each row's history: the user's last ``length`` distinct engaged items before its time.

    Args:
        rows: ``user_id``, ``event_time`` (any order).
        engaged: Boolean mask over ``rows``: which rows are engagements (clicks, long
            watches, likes; MovieLens: ratings >= 4). Ignored when ``events`` is given.
        length: The most items kept (the encoder spec's ``history_length``).
        events: Optional engagement events (``user_id``, ``item_id``, ``event_time``) to
            read the histories from instead of the engaged rows of ``rows``.

    Returns:
        One list per row, newest first; an engagement at exactly the row's time is not in it.
    """
    if events is None:
        mask = np.asarray(engaged, dtype=bool)
        events = rows.loc[mask, ["user_id", "item_id", "event_time"]]
    times = pd.to_datetime(events["event_time"], utc=True).to_numpy()
    order = np.lexsort((times, events["user_id"].to_numpy()))
    ev_users = events["user_id"].to_numpy()[order]
    ev_times = times[order]
    ev_items = events["item_id"].astype(str).to_numpy()[order]
    spans: dict[object, tuple[int, int]] = {}
    if len(ev_users):
        change = np.flatnonzero(ev_users[1:] != ev_users[:-1]) + 1
        starts = np.concatenate([[0], change])
        ends = np.concatenate([change, [len(ev_users)]])
        spans = {ev_users[s]: (int(s), int(e)) for s, e in zip(starts, ends, strict=True)}
    row_times = pd.to_datetime(rows["event_time"], utc=True).to_numpy()
    out: list[list[str]] = []
    for user, t in zip(rows["user_id"].to_numpy(), row_times, strict=True):
        span = spans.get(user)
        if span is None:
            out.append([])
            continue
        lo, hi = span
        stop = int(np.searchsorted(ev_times[lo:hi], t, side="left"))
        out.append(_recent_distinct(ev_items[lo:hi], stop, length))
    return out


def engaged_mask(rows: pd.DataFrame) -> np.ndarray:
    """Which snapshot rows are engagements: clicked (MovieLens: rated >= 4)."""
    return pd.to_numeric(rows["clicked"], errors="coerce").fillna(0).to_numpy() > 0
