"""Shared pieces of the stream tests: a tiny event burst, Feast settings, expected state."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from recsys_core.contracts import split_duplicates, validate_events
from recsys_core.features import ENTITY_KEYS, ITEM_TRENDING, USER_STREAM
from recsys_core.settings import Settings, load_settings
from recsys_pipelines.generator import GeneratorConfig, generate, write_jsonl
from recsys_pipelines.stream.job import JobOptions, options_from_settings
from recsys_pipelines.stream.sql import window_plan
from tests.fixtures.flink import StreamEnv
from tests.integration.stream import reference

SPAN = timedelta(hours=2)  # the burst's event times are squeezed into two hours
TINY = GeneratorConfig(events=3_000, days=1, users=25, items=60, new_users_per_day=0,
                       new_items_per_day=0, categories=4, creators_per_category=3,
                       dirt_rate=0.01, seed=5)
NOT_JSON = "this line is not json"


def burst(cfg: GeneratorConfig = TINY) -> tuple[pd.DataFrame, dict[str, int]]:
    """Raw events (one malformed row per kind of dirt, no duplicates), time-sorted, with
    event times squeezed into :data:`SPAN`; and the malformed counts by reason."""
    data = generate(cfg)
    raw, _ = split_duplicates(data.events)
    times = pd.to_datetime(raw["event_time"], errors="coerce", utc=True, format="ISO8601")
    ok = times.notna()
    t0 = times[ok].min()
    squeezed = t0 + (times[ok] - t0) * (SPAN / timedelta(days=cfg.days))
    raw.loc[ok, "event_time"] = squeezed.dt.strftime("%Y-%m-%dT%H:%M:%S.%f").str[:-3] + "Z"
    raw["_order"] = np.where(ok, raw["event_time"], "")
    raw = raw.sort_values(["_order", "event_id"], kind="stable").drop(columns="_order")
    return raw.reset_index(drop=True), dict(data.dirt.malformed)


def write_files(raw: pd.DataFrame, folder: Path, parts: int, start: int = 0,
                pause_s: float = 0.0) -> list[Path]:
    """Writes ``raw`` as ``parts`` files in order (atomic: hidden name, then rename),
    ``pause_s`` apart so that the source discovers them one at a time."""
    paths = []
    for i, chunk in enumerate(np.array_split(np.arange(len(raw)), parts)):
        if i and pause_s:
            time.sleep(pause_s)
        path = folder / f"events-{start + i:04d}.jsonl"
        write_jsonl(raw.iloc[chunk], path)
        paths.append(path)
    return paths


def append_line(folder: Path, name: str, line: str) -> None:
    tmp = folder / f".{name}.tmp"
    tmp.write_text(line + "\n")
    tmp.rename(folder / name)


def settings_for(env: StreamEnv, root: Path, project: str | None = None) -> Settings:
    """Local-profile settings on the test Redis DB with this session's Feast project."""
    repo = root / "feature_repo"
    repo.mkdir(parents=True, exist_ok=True)
    shutil.copy(env.repo_root / "feature_repo" / "definitions.py", repo / "definitions.py")
    config = {
        "data_dir": str(root / "data"),
        "redis": {"url": env.redis_url, "key_prefix": project or env.key_prefix},
        "feast": {"project": project or env.project, "repo_path": str(repo),
                  "online_store": "redis",
                  "registry_path": str(root / "data" / "feast" / "registry.db")},
        "flink": {"checkpoint_interval_ms": 1000, "max_out_of_orderness_s": 30},
    }
    path = root / "settings.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_settings("local", path)


def job_options(settings: Settings, **overrides: Any) -> JobOptions:
    return options_from_settings(settings, monitor_interval_ms=100, **overrides)


def expected_state(raw: pd.DataFrame, until_ms: int | None) -> dict[str, dict[str, Any]]:
    """What the online store must hold per entity once windows up to ``until_ms`` fired:
    ``{"user_stream": {user_id: {feature: value, "window_end": ms}}, "item_trending": ...}``."""
    valid, _ = validate_events(raw)
    events = reference.clean_events(valid)
    limit = until_ms if until_ms is not None else 2**62
    state: dict[str, dict[str, Any]] = {}
    for group, recent in ((USER_STREAM, True), (ITEM_TRENDING, False)):
        plan = window_plan(group, recent_items=recent)
        key = ENTITY_KEYS[group.entity]
        rows: dict[str, Any] = {}
        for entity in sorted(events[key].unique()):
            end = reference.last_window_end(events, group, entity, plan.size, plan.slide, limit)
            if end is None:
                continue
            values = reference.group_values(events, group, entity, end, recent)
            rows[entity] = {**values, "window_end": end}
        state[group.name] = rows
    return state


def online_state(store: Any, view: str, ids: list[str]) -> dict[str, dict[str, Any]]:
    """Values and window ends read back through Feast's ``get_online_features``."""
    fv = store.get_feature_view(view)
    key = ENTITY_KEYS["user" if view == USER_STREAM.name else "item"]
    refs = [f"{view}:{f.name}" for f in fv.features]
    response = store.get_online_features(features=refs, entity_rows=[{key: i} for i in ids])
    table = response.to_dict(include_event_timestamps=True)
    out: dict[str, dict[str, Any]] = {}
    for i, entity in enumerate(table[key]):
        row: dict[str, Any] = {}
        for f in fv.features:
            value = table[f.name][i]
            row[f.name] = list(value) if isinstance(value, list | tuple | np.ndarray) else value
        ts = table[f"{fv.features[0].name}__ts"][i]
        row["window_end"] = None if ts is None else int(ts) * 1000  # Feast gives seconds
        out[entity] = row
    return out


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def parts_of(raw: pd.DataFrame, parts: int) -> list[pd.DataFrame]:
    return [raw.iloc[chunk] for chunk in np.array_split(np.arange(len(raw)), parts)]


def wait_consumed(redis_url: str, metrics_key: str, part: pd.DataFrame,
                  out_of_orderness_ms: int = 30_000) -> None:
    """Waits until the job wrote the item windows that ``part`` closes."""
    import redis

    from recsys_pipelines.stream.status import wait_for_window

    slide_ms = 5 * 60_000
    closed = (max_event_ms(part) - out_of_orderness_ms) // slide_ms * slide_ms
    client = redis.Redis.from_url(redis_url)
    try:
        assert wait_for_window(client, metrics_key, "item_trending", closed, 60), \
            "timed out waiting for the job to consume a file"
    finally:
        client.close()


def valid_rows(part: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``part`` that pass the event contract (as raw lines)."""
    valid, _ = validate_events(part)
    return part[part["event_id"].isin(set(valid["event_id"]))]


def write_files_paced(raw: pd.DataFrame, folder: Path, parts: int, redis_url: str,
                      metrics_key: str, duplicates: bool = False) -> list[Path]:
    """Writes the files in order, each once the job consumed the previous one. Flink's file
    source does not read pending files in order, so a producer must not run ahead of it.

    With ``duplicates``, every file after the first also repeats its own valid lines (on-time
    duplicates) and the valid lines of the previous file (a replay, behind the watermark):
    the job must count none of them twice and send none of them to the late files."""
    paths = []
    chunks = parts_of(raw, parts)
    for i, part in enumerate(chunks):
        path = folder / f"events-{i:04d}.jsonl"
        lines = part
        if duplicates and i:
            lines = pd.concat([part, valid_rows(part), valid_rows(chunks[i - 1])])
        write_jsonl(lines, path)
        paths.append(path)
        if i < len(chunks) - 1:
            wait_consumed(redis_url, metrics_key, part)
    return paths


def metric(redis_url: str, metrics_key: str, name: str) -> int:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        value = client.hget(metrics_key, name)
        return int(value) if value is not None else 0  # type: ignore[arg-type]
    finally:
        client.close()


def wait_running(checkpoint_dir: Path, timeout_s: float = 60) -> None:
    """Waits for the job's first completed checkpoint: every task is running, the source
    included (files present before it first lists the folder arrive in no fixed order)."""
    from recsys_pipelines.stream.checkpoints import completed_checkpoints

    before = set(completed_checkpoints(checkpoint_dir)) if checkpoint_dir.is_dir() else set()
    wait_until(lambda: bool(set(completed_checkpoints(checkpoint_dir)) - before), timeout_s,
               "the job's first checkpoint")


def side_output_lines(folder: Path) -> list[dict[str, Any]]:
    """Committed lines of a side-output folder (in-progress hidden part files excluded)."""
    if not folder.is_dir():
        return []
    lines = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.name.startswith((".", "_")):
            lines += [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return lines


def max_event_ms(raw: pd.DataFrame) -> int:
    valid, _ = validate_events(raw)
    return int(reference.clean_events(valid)["ms"].max())
