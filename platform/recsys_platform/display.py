"""Numbers a person can read: epoch milliseconds as UTC times, millisecond lags as durations.

Pure functions for the CLI's tables (``recsys stream status``, the demo). Counters stay counts.
"""

from __future__ import annotations

from datetime import UTC, datetime

_UNITS = (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000))


def utc_time(epoch_ms: int) -> str:
    """``1796160300000`` -> ``"2026-12-01 21:25:00 UTC"`` (seconds resolution)."""
    moment = datetime.fromtimestamp(epoch_ms / 1000, tz=UTC)
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC"


def duration(ms: int) -> str:
    """A lag or an age in the two largest units: ``"850 ms"``, ``"12.3 s"``, ``"4m 05s"``,
    ``"2h 10m"``, ``"3d 04h"``; negative values (clocks that disagree) keep their sign."""
    if ms < 0:
        return "-" + duration(-ms)
    if ms < 1_000:
        return f"{ms} ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f} s"
    parts: list[str] = []
    rest = ms
    for unit, size in _UNITS:
        count, rest = divmod(rest, size)
        if count or parts:
            parts.append(f"{count:02d}{unit}" if parts else f"{count}{unit}")
        if len(parts) == 2:
            break
    return " ".join(parts)


def stream_metric(key: str, value: int) -> tuple[str, str]:
    """One stream counter from Redis as ``(label, text)``.

    ``<view>:last_window_end_ms`` and ``<view>:last_write_ms`` are epoch times, shown in UTC;
    ``<view>:event_time_lag_ms`` is a duration; the other keys are counts.

    Example:
        >>> stream_metric("item_trending:event_time_lag_ms", 125_000)
        ('item_trending:event_time_lag', '2m 05s')
    """
    if key.endswith("_lag_ms"):
        return key.removesuffix("_ms"), duration(value)
    if key.endswith("_ms"):
        return key.removesuffix("_ms"), utc_time(value)
    return key, f"{value:,}"
