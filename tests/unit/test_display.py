"""The CLI's readable numbers: epoch ms as UTC times, ms lags as durations, counts as counts."""

from __future__ import annotations

import pytest

from recsys_platform.display import duration, stream_metric, utc_time


def test_epoch_ms_is_a_utc_timestamp() -> None:
    assert utc_time(1_796_160_300_000) == "2026-12-01 21:25:00 UTC"


@pytest.mark.parametrize(("ms", "text"), [
    (0, "0 ms"), (850, "850 ms"), (12_345, "12.3 s"), (125_000, "2m 05s"),
    (7_830_000, "2h 10m"), (3 * 86_400_000 + 4 * 3_600_000 + 59_000, "3d 04h"),
    (-2_000, "-2.0 s"),
])
def test_durations_use_the_two_largest_units(ms: int, text: str) -> None:
    assert duration(ms) == text


def test_stream_metrics_by_kind_of_key() -> None:
    assert stream_metric("item_trending:last_window_end_ms", 1_796_160_300_000) == (
        "item_trending:last_window_end", "2026-12-01 21:25:00 UTC")
    assert stream_metric("user_stream:event_time_lag_ms", 90_500) == (
        "user_stream:event_time_lag", "1m 30s")
    assert stream_metric("user_stream:rows_written", 12_345) == (
        "user_stream:rows_written", "12,345")
