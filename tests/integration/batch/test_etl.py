"""The ETL flow on real Prefect (test harness) against a generated landing area with dirt."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest

from recsys_pipelines import etl, sources
from recsys_platform.flows.data import etl_flow
from tests.fixtures.feast_store import BatchEnv, write_test_config

pytestmark = pytest.mark.integration


def _quarantine(lake: Path) -> pd.DataFrame:
    files = sorted((lake / "quarantine" / "events").glob("landing_date=*/part-0.parquet"))
    return pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)


def _lake_rows(lake: Path) -> dict[str, int]:
    return {p.parent.name.removeprefix("date="): pq.read_metadata(p).num_rows
            for p in sorted((lake / "events").glob("date=*/part-0.parquet"))}


def _other_env(batch_env: BatchEnv, tmp_path: Path) -> Path:
    """A settings file with its own data dir (so the session lake is untouched)."""
    return write_test_config(tmp_path / "settings.yaml", tmp_path / "data",
                             tmp_path / "feature_repo", "unused")


def test_etl_flow_completes_and_reports_counts(etl_state: Any, batch_env: BatchEnv) -> None:
    assert etl_state.is_completed(), etl_state.message
    result = etl_state.result()
    assert result["input_rows"] == batch_env.generated.events
    assert result["clean_rows"] == batch_env.generated.clean_events
    assert result["partitions"] == _lake_rows(batch_env.settings.lake_dir)
    assert sum(result["partitions"].values()) == result["clean_rows"]
    assert {s["name"]: s["total"] for s in result["snapshots"]} == {
        "items": batch_env.generated.items, "users": batch_env.generated.users}


def test_quarantine_plus_clean_equals_input_with_a_reason_per_row(
    etl_state: Any, batch_env: BatchEnv
) -> None:
    result = etl_state.result()
    dirt = batch_env.generated.dirt
    quarantined = _quarantine(batch_env.settings.lake_dir)
    assert len(quarantined) == result["quarantined_rows"]
    assert result["quarantined_rows"] + result["clean_rows"] + result["out_of_range_rows"] \
        == result["input_rows"]
    assert result["out_of_range_rows"] == 0
    assert quarantined["reason"].str.len().gt(0).all()
    expected = Counter({**{k: v for k, v in dirt.malformed.items() if v},
                        etl.REASON_DUPLICATE: dirt.duplicates})
    assert Counter(quarantined["reason"]) == expected
    assert result["reasons"] == dict(expected)
    # No clean event id is repeated anywhere in the lake.
    lake = etl.read_lake_events(batch_env.settings.lake_dir)
    assert lake["event_id"].is_unique and len(lake) == result["clean_rows"]


def test_rerunning_the_same_dates_gives_an_identical_lake(
    etl_state: Any, batch_env: BatchEnv
) -> None:
    lake = batch_env.settings.lake_dir
    before = etl.lake_checksums(lake), _lake_rows(lake), len(_quarantine(lake))
    again = etl_flow(start=batch_env.start, end=batch_env.end,
                     config_file=str(batch_env.config_file), return_state=True)
    assert again.is_completed()
    assert (etl.lake_checksums(lake), _lake_rows(lake), len(_quarantine(lake))) == before
    assert again.result()["partitions"] == etl_state.result()["partitions"]


def test_late_events_are_picked_up_by_rerunning_their_date(
    etl_state: Any, batch_env: BatchEnv, tmp_path: Path
) -> None:
    config = _other_env(batch_env, tmp_path)
    landing = str(batch_env.settings.landing_dir)
    day = batch_env.start + timedelta(days=1)
    first = etl_flow(start=day, end=day, landing_dir=landing, lookahead_days=0,
                     config_file=str(config), return_state=True).result()
    rerun = etl_flow(start=day, end=day, landing_dir=landing, lookahead_days=1,
                     config_file=str(config), return_state=True).result()
    # The rows of `day` that landed a day late arrive with the re-run, and only those.
    raw_next = sources.read_landing_partition(batch_env.settings.landing_dir,
                                              day + timedelta(days=1))
    clean_next = etl.clean_batch(raw_next).clean
    late = int((etl.event_dates(clean_next) == day).sum())
    assert late > 0
    assert rerun["partitions"][day.isoformat()] == first["partitions"][day.isoformat()] + late
    session_lake = etl.lake_checksums(batch_env.settings.lake_dir)
    assert etl.lake_checksums(tmp_path / "data" / "lake")[f"date={day}"] \
        == session_lake[f"date={day}"]


def test_a_failing_read_is_retried_and_the_flow_completes(
    etl_state: Any, batch_env: BatchEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = sources.read_landing_day
    calls: Counter[str] = Counter()

    def flaky(landing_dir: Path, day: Any, quarantine_dir: Path | None = None
              ) -> sources.LandingRead:
        calls[day.isoformat()] += 1
        if day == batch_env.start and calls[day.isoformat()] == 1:
            raise OSError("simulated: network file system went away")
        return real(landing_dir, day, quarantine_dir)

    monkeypatch.setattr(sources, "read_landing_day", flaky)
    # The in-process path (on Ray a read task that raises OSError is retried by Ray, in a
    # worker this patch does not reach).
    config = write_test_config(tmp_path / "settings.yaml", tmp_path / "data",
                               tmp_path / "feature_repo", "unused", {"ray": {"etl": False}})
    state = etl_flow(start=batch_env.start, end=batch_env.start,
                     landing_dir=str(batch_env.settings.landing_dir), retry_delay_s=0,
                     config_file=str(config), return_state=True)
    assert state.is_completed(), state.message
    assert calls[batch_env.start.isoformat()] == 2
    assert state.result()["clean_rows"] > 0


def test_an_unreadable_file_is_quarantined_and_the_range_still_processed(
    etl_state: Any, batch_env: BatchEnv, tmp_path: Path
) -> None:
    """Before: a corrupt Parquet file failed the whole range after 3 retries."""
    landing = tmp_path / "landing"
    shutil.copytree(batch_env.settings.landing_dir, landing)
    day, other = batch_env.start, batch_env.start + timedelta(days=1)
    broken = sources.landing_partition(landing, day) / "zz-corrupt.parquet"
    broken.write_bytes(b"not parquet at all")
    (tmp_path / "ref").mkdir()
    good = etl_flow(start=other, end=other, landing_dir=str(batch_env.settings.landing_dir),
                    lookahead_days=0, config_file=str(_other_env(batch_env, tmp_path / "ref")),
                    return_state=True).result()
    state = etl_flow(start=day, end=other, landing_dir=str(landing), lookahead_days=0,
                     retry_delay_s=0, config_file=str(_other_env(batch_env, tmp_path)),
                     return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    [moved] = result["quarantined_files"]
    assert moved["source"] == str(broken) and "unreadable Parquet" in moved["reason"]
    assert not broken.exists() and Path(moved["path"]).read_bytes() == b"not parquet at all"
    note = json.loads(Path(moved["path"] + ".reason.json").read_text())
    assert note["reason"] == moved["reason"]
    assert "files" in Path(moved["path"]).parts and f"landing_date={day}" in moved["path"]
    # Both days were processed: the other day exactly as in a run without the bad file.
    assert result["partitions"][other.isoformat()] == good["partitions"][other.isoformat()]
    assert result["partitions"][day.isoformat()] > 0


def test_a_jsonl_landing_file_keeps_good_lines_and_quarantines_bad_ones(
    etl_state: Any, batch_env: BatchEnv, tmp_path: Path
) -> None:
    """Before: a JSON-lines file in a landing partition was skipped whole."""
    landing = tmp_path / "landing"
    day = batch_env.start
    folder = sources.landing_partition(landing, day)
    folder.mkdir(parents=True)
    event = {"event_id": "jl-1", "event_time": f"{day}T10:00:00.000Z", "user_id": "u1",
             "item_id": "i1", "event_type": "click", "surface": "feed", "device": "ios"}
    lines = [json.dumps(event).encode(), b"garbage {", b"", b"[1, 2]",
             json.dumps({**event, "event_id": "jl-2", "watch_time_ms": "long"}).encode(),
             b"\xff\xfe{}", json.dumps({**event, "event_id": "jl-3", "device": "toaster"}).encode()]
    (folder / "events.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    result = etl_flow(start=day, end=day, landing_dir=str(landing), lookahead_days=0,
                      config_file=str(_other_env(batch_env, tmp_path)), return_state=True).result()
    assert result["input_rows"] == 6 and result["clean_rows"] == 1
    assert result["quarantined_rows"] == 5 and result["quarantined_files"] == []
    lake = tmp_path / "data" / "lake"
    assert list(etl.read_lake_events(lake)["event_id"]) == ["jl-1"]
    reasons = list(_quarantine(lake)["reason"])
    assert reasons[:4] == [
        "events.jsonl line 2: not JSON (Expecting value)",
        "events.jsonl line 4: not a JSON object (a JSON list)",
        "events.jsonl line 5: watch_time_ms is a JSON str, not an integer",
        "events.jsonl line 6: not UTF-8",
    ]
    assert reasons[4].startswith("device not in")
    assert (folder / "events.jsonl").exists()  # the landing file itself stays


def test_cli_exit_status_says_files_were_quarantined(
    etl_state: Any, batch_env: BatchEnv, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from recsys_platform.cli import app

    landing = tmp_path / "landing"
    folder = sources.landing_partition(landing, batch_env.start)
    folder.mkdir(parents=True)
    (folder / "bad.parquet").write_bytes(b"PAR1 truncated")
    config = _other_env(batch_env, tmp_path)
    out = CliRunner().invoke(app, [
        "--config", str(config), "etl", "run", "--start", str(batch_env.start),
        "--end", str(batch_env.start), "--landing", str(landing), "--lookahead-days", "0"])
    assert out.exit_code == 3, out.output
    assert "bad.parquet" in out.output and "quarantined" in out.output


def test_catalog_is_read_incrementally_by_updated_at(
    etl_state: Any, batch_env: BatchEnv
) -> None:
    marks = json.loads((batch_env.settings.lake_dir / "catalog" / "_watermarks.json").read_text())
    assert set(marks) == {"items", "users"}
    again = etl_flow(start=batch_env.end, end=batch_env.end,
                     config_file=str(batch_env.config_file), return_state=True).result()
    assert [s["read"] for s in again["snapshots"]] == [0, 0]  # nothing changed since
