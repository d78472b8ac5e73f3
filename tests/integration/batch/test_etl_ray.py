"""The ETL on Ray writes the same lake and quarantine, with the same counts, as in-process."""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from recsys_pipelines import sources
from recsys_pipelines.generator import GeneratorConfig, generate, write_generated
from recsys_platform.flows.data import etl_flow
from tests.fixtures.feast_store import write_test_config

pytestmark = pytest.mark.integration

DIRTY = GeneratorConfig(events=4_000, days=4, users=60, items=120, dirt_rate=0.03, seed=5)


def _files(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (the lake: partitions, quarantine, moved files)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.endswith(".json")}


def _run(tmp_path: Path, name: str, landing: Path, on_ray: bool) -> tuple[dict[str, Any], Path]:
    root = tmp_path / name
    shutil.copytree(landing, root / "landing")
    config = write_test_config(root / "settings.yaml", root / "data", root / "feature_repo",
                               "unused", {"ray": {"etl": on_ray}})
    end = DIRTY.start + timedelta(days=DIRTY.days - 1)
    result = etl_flow(start=DIRTY.start + timedelta(days=1), end=end,
                      landing_dir=str(root / "landing"), config_file=str(config))
    return result, root


def test_etl_on_ray_equals_the_in_process_etl(prefect_harness: None, ray_cluster: Any,
                                               tmp_path: Path) -> None:
    generated = write_generated(generate(DIRTY), tmp_path / "landing")
    assert generated.dirt.duplicates > 0 and generated.dirt.late > 0
    day = DIRTY.start + timedelta(days=2)
    folder = sources.landing_partition(tmp_path / "landing", day)
    (folder / "zz-corrupt.parquet").write_bytes(b"not parquet at all")
    good = {"event_id": "jl-1", "event_time": f"{day}T10:00:00.000Z", "user_id": "u1",
            "item_id": "i1", "event_type": "click", "surface": "feed", "device": "ios"}
    (folder / "events.jsonl").write_bytes(b"\n".join([
        json.dumps(good).encode(), b"garbage {", json.dumps(good).encode(),  # a duplicate
        json.dumps({**good, "event_id": "jl-2", "watch_time_ms": "long"}).encode()]) + b"\n")

    local, local_root = _run(tmp_path, "inproc", tmp_path / "landing", on_ray=False)
    ray, ray_root = _run(tmp_path, "on-ray", tmp_path / "landing", on_ray=True)

    assert local["quarantined_rows"] > 0 and local["duplicates"] > 0
    assert local["out_of_range_rows"] > 0  # the first day's events: read late rows only
    def where(result: dict[str, Any], root: Path) -> list[str]:  # run folders: same length
        return [json.dumps(f).replace(str(root), "<run>") for f in result.pop(
            "quarantined_files")]

    moved = where(ray, ray_root)
    assert moved == where(local, local_root) and len(moved) == 1
    assert ray == local  # every count, reason and partition size
    lake = _files(local_root / "data" / "lake")
    assert _files(ray_root / "data" / "lake") == lake  # byte-identical partitions
    assert any(p.startswith("quarantine/events/") for p in lake)
    assert any(p.startswith("quarantine/files/") for p in lake)
