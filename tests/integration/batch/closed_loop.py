"""A small, private platform environment for the closed-loop tests (label join, forget).

Each test module gets its own data dir, Feast repository and project, so that what it adds to
the landing area (served impressions, later clicks) or removes (a forgotten user) never touches
the session's shared ``batch_env``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from recsys_core.contracts import RAW_EVENT_SCHEMA
from recsys_pipelines.etl import atomic_write_table
from recsys_pipelines.generator import GeneratedData, GeneratorConfig, generate, write_generated
from tests.fixtures.feast_store import FeastEnv, make_feast_env

TINY = GeneratorConfig(events=2_500, days=2, users=30, items=60, new_users_per_day=2,
                       new_items_per_day=4, categories=4, creators_per_category=3,
                       dirt_rate=0.02, seed=5)


@dataclass(frozen=True)
class LoopEnv(FeastEnv):
    data: GeneratedData

    @property
    def landing(self) -> Path:
        return self.settings.landing_dir


def make_env(root: Path, repo_root: Path, overrides: dict[str, Any],
             edit: Any = None, jsonl: bool = False) -> LoopEnv:
    """Generates :data:`TINY` (optionally edited in memory) into a fresh landing area."""
    data = generate(TINY)
    if edit is not None:
        data = edit(data)
    env = make_feast_env(root, repo_root, "recsys_loop", overrides)
    settings = env.settings
    stream = Path(settings.path(settings.flink.stream_dir)) if jsonl else None
    write_generated(data, settings.landing_dir, jsonl_dir=stream)
    return LoopEnv(env.root, env.config_file, settings, env.project, data)


def land_events(landing: Path, name: str, rows: list[dict[str, Any]]) -> None:
    """Writes raw events (the producer's contract) into their landing-day partitions."""
    by_day: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_day.setdefault(row["event_time"][:10], []).append(
            {f: row.get(f) for f in RAW_EVENT_SCHEMA.names})
    for day, day_rows in by_day.items():
        table = pa.Table.from_pylist(day_rows, schema=RAW_EVENT_SCHEMA)
        atomic_write_table(table, landing / "events" / f"date={day}" / f"{name}.parquet")


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@contextmanager
def served_at(moment: datetime) -> Iterator[None]:
    """Makes the serving impression logger stamp its rows with ``moment``."""
    from recsys_platform.serving import impressions

    class Clock(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> datetime:  # type: ignore[override]
            return moment

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(impressions, "datetime", Clock)
        yield


def day_range(env: LoopEnv, extra_days: int = 0) -> tuple[date, date]:
    first = TINY.start
    return first, date.fromordinal(first.toordinal() + TINY.days - 1 + extra_days)
