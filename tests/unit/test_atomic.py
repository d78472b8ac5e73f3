"""Atomic writes: the target is replaced whole or not at all, and no temp file stays behind."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys_core.atomic import atomic_path, atomic_write_lines, atomic_write_text
from recsys_pipelines.etl import atomic_write_table


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_write_text_creates_folder_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "marks.json"
    atomic_write_text(target, '{"x": 1}')
    assert target.read_text() == '{"x": 1}'
    assert _names(target.parent) == ["marks.json"]


def test_write_replaces_the_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "events.jsonl"
    atomic_write_lines(target, [f"line {n}\n" for n in range(100)])
    atomic_write_lines(target, ["short\n", "no newline at the end"])
    assert target.read_text() == "short\nno newline at the end"
    atomic_write_text(target, "")
    assert target.read_text() == ""
    assert _names(tmp_path) == ["events.jsonl"]


def test_lines_stream_into_a_hidden_temp_while_the_old_file_stays_visible(
        tmp_path: Path) -> None:
    target = tmp_path / "served.jsonl"
    target.write_text("old\n")
    seen: list[tuple[list[str], str]] = []

    def lines() -> Iterator[str]:
        for n in range(3):
            yield f"new {n}\n"
            # What a folder-listing reader (the Flink file source) sees mid-write.
            visible = [p for p in _names(tmp_path) if not p.startswith(".")]
            seen.append((visible, target.read_text()))

    atomic_write_lines(target, lines())
    assert seen == [(["served.jsonl"], "old\n")] * 3
    assert target.read_text() == "new 0\nnew 1\nnew 2\n"
    assert _names(tmp_path) == ["served.jsonl"]


def test_failure_mid_write_keeps_the_old_file_and_removes_the_temp(tmp_path: Path) -> None:
    target = tmp_path / "forgotten.json"
    atomic_write_text(target, "old")

    def lines() -> Iterator[str]:
        yield "partial\n"
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write_lines(target, lines())
    assert target.read_text() == "old"
    assert _names(tmp_path) == ["forgotten.json"]

    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert _names(tmp_path) == ["forgotten.json"]


def test_failure_before_the_first_write_creates_nothing(tmp_path: Path) -> None:
    target = tmp_path / "new.txt"
    with pytest.raises(ValueError), atomic_path(target):
        raise ValueError("before writing")
    assert _names(tmp_path) == []


def test_parquet_through_a_library_keeps_the_same_contract(tmp_path: Path) -> None:
    target = tmp_path / "date=2024-01-01" / "part-0.parquet"
    atomic_write_table(pa.table({"x": [1, 2]}), target)
    with pytest.raises(OSError), atomic_path(target) as tmp:
        pq.write_table(pa.table({"x": [3]}), tmp)
        assert tmp.name.startswith(".") and tmp.parent == target.parent
        raise OSError("lost the connection before the rename")
    assert pq.read_table(target).column("x").to_pylist() == [1, 2]
    assert _names(target.parent) == ["part-0.parquet"]
