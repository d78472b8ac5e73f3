"""The analysis on files, without services: the real impression logger writes the served log
and impression events, clicks land as raw events, the ETL's cleaning writes the lake, and
:func:`evaluate` labels the experiment's impressions per arm (and scores shadow rankings)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from recsys_core.settings import Settings
from recsys_pipelines.etl import clean_batch, write_event_partition
from recsys_platform.experiments.analysis import evaluate
from recsys_platform.experiments.definition import Experiment, assign
from recsys_platform.serving.impressions import ImpressionLogger

WINDOW = timedelta(seconds=60)


def _settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, labels={"window_s": 60})  # type: ignore[arg-type]


def _lake(settings: Settings, clicks: list[dict[str, object]]) -> None:
    """Clicks land as a producer's file; the ETL's read, cleaning and partition write."""
    import pyarrow as pa

    from recsys_core.contracts import RAW_EVENT_SCHEMA
    from recsys_pipelines.etl import atomic_write_table
    from recsys_pipelines.sources import read_landing_day

    day = datetime.now(UTC).date()
    atomic_write_table(pa.Table.from_pylist(clicks, schema=RAW_EVENT_SCHEMA),
                       settings.landing_dir / "events" / f"date={day}" / "clicks.parquet")
    batch = clean_batch(read_landing_day(settings.landing_dir, day).frame)
    assert batch.quarantine.empty, batch.quarantine
    write_event_partition(batch.clean, settings.lake_dir, day)


def _click(user: str, request_id: str, item: str, at: datetime) -> dict[str, object]:
    return {"event_id": f"c-{request_id}-{item}", "user_id": user, "item_id": item,
            "event_time": at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "event_type": "click", "watch_time_ms": None, "item_duration_ms": None,
            "surface": "feed", "device": "ios", "request_id": request_id,
            "model_version": None}


def test_split_arms_are_labelled_from_the_lake(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    start = datetime.now(UTC) - timedelta(minutes=10)
    exp = Experiment.new("2", "split", share=0.5, control_version="1", now=start)
    log = ImpressionLogger(settings.landing_dir)
    rng = np.random.default_rng(0)
    clicks = []
    for n in range(200):
        user = f"u{n}"
        arm = assign(exp.salt, user, 0.5)
        version, rate = ("2", 0.4) if arm == "treatment" else ("1", 0.1)
        items = [(f"i{(n + j) % 50}", 1.0 - j / 10, "retrieval") for j in range(5)]
        log.log(f"r{n}", user, items, version, "feed", "ios", experiment_id=exp.id, arm=arm,
                latency_ms=3.0)
        clicks += [_click(user, f"r{n}", item, datetime.now(UTC) + timedelta(seconds=5))
                   for item, _, _ in items if rng.random() < rate]
    log.log("other", "u0", [("i1", 1.0, "popular")], "1", "feed", "ios")  # no experiment
    log.flush()
    _lake(settings, clicks)

    report = evaluate(settings, exp, as_of=datetime.now(UTC) + WINDOW + timedelta(seconds=10))
    assert report.control is not None and report.treatment is not None
    assert report.control.impressions + report.treatment.impressions == 1000
    assert report.pending == 0
    assert 0.3 < report.treatment.value < 0.5 and 0.05 < report.control.value < 0.15
    assert report.comparison is not None and report.comparison.ci_low > 0
    assert report.srm is not None and not report.srm.mismatch
    assert report.control.p99_latency_ms == 3.0 and report.control.fallback_rate == 0.0
    # as of now the label windows are still open: everything is pending, nothing decided on
    early = evaluate(settings, exp, as_of=datetime.now(UTC))
    assert early.pending == 1000 and early.control is None


def test_shadow_rankings_are_scored_against_the_clicks(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    start = datetime.now(UTC) - timedelta(minutes=10)
    exp = Experiment.new("2", "shadow", control_version="1", now=start)
    served = ImpressionLogger(settings.landing_dir)
    shadow = ImpressionLogger(settings.landing_dir, folder="shadow", events=False)
    clicks = []
    for n in range(20):
        items = [f"i{j}" for j in range(5)]
        served.log(f"r{n}", f"u{n}", [(i, 1.0, "retrieval") for i in items], "1", "feed", "ios",
                   experiment_id=exp.id, arm="control")
        # the treatment ranks the served list reversed, so a click on position 0 is its 5th
        shadow.log(f"r{n}", f"u{n}", [(i, 1.0, "retrieval") for i in reversed(items)], "2",
                   "feed", "ios", experiment_id=exp.id, arm="treatment")
        clicks.append(_click(f"u{n}", f"r{n}", "i0", datetime.now(UTC)))
    served.flush()
    shadow.flush()
    assert not list((settings.landing_dir / "events").rglob("shadow-*"))
    _lake(settings, clicks)

    report = evaluate(settings, exp, as_of=datetime.now(UTC) + WINDOW + timedelta(seconds=10))
    assert report.shadow["shadow_requests"] == 20 and report.shadow["clicks"] == 20
    assert report.shadow["control_mrr"] == 1.0
    assert report.shadow["treatment_mrr"] == pytest.approx(1 / 5)
    assert report.shadow["treatment_hit_rate"] == 1
    assert report.shadow["overlap"] == 1.0
    assert report.comparison is None  # nothing to compare online: nobody saw the treatment
