"""Keyed pseudonyms are stable, key-dependent, idempotent and keep nulls."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from recsys_core.privacy import pseudonymize, pseudonymize_series


def test_pseudonyms() -> None:
    a = pseudonymize("u1", "k1")
    assert a == pseudonymize("u1", "k1") and a != pseudonymize("u1", "k2")
    assert a != pseudonymize("u2", "k1") and "u1" not in a
    assert pseudonymize(a, "k1") == a
    out = pseudonymize_series(pd.Series(["u1", None, "", "u1"]), "k1")
    assert out[0] == a and out[3] == a and out[1] is None and out[2] == ""


def test_tombstones_match_raw_ids_and_pseudonyms_but_do_not_name_either() -> None:
    from recsys_core.privacy import tombstone

    p = pseudonymize("u1", "k1")
    assert tombstone("u1", "k1") == tombstone(p, "k1") != tombstone("u2", "k1")
    assert "u1" not in tombstone("u1", "k1") and p not in tombstone("u1", "k1")
    assert tombstone("u1", "k1") != tombstone("u1", "k2")


def test_forget_list_round_trip_and_mask(tmp_path: Path) -> None:
    from recsys_core.privacy import (
        add_to_forget_list,
        forgotten_mask,
        read_forget_list,
        tombstone,
    )

    path = tmp_path / "privacy" / "forgotten.json"
    assert read_forget_list(path) == set()
    add_to_forget_list(path, tombstone("u1", "k"))
    add_to_forget_list(path, tombstone("u1", "k"))  # idempotent
    assert read_forget_list(path) == {tombstone("u1", "k")}
    ids = pd.Series(["u1", pseudonymize("u1", "k"), "u2", None])
    assert forgotten_mask(ids, "k", read_forget_list(path)).tolist() == [True, True, False, False]
    assert not forgotten_mask(ids, "k", set()).any()


def test_forget_rewrites_parquet_and_jsonl_without_the_user(tmp_path: Path) -> None:
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from recsys_pipelines.forget import _Matcher, forget_in_jsonl, forget_in_parquet

    match = _Matcher(pseudonymize("u1", "k"), "k")  # named by pseudonym, raw rows still match
    table = pa.table({"user_id": ["u1", "u2", None, pseudonymize("u1", "k")],
                      "n": [1, 2, 3, 4]})
    pq.write_table(table, tmp_path / "a.parquet")
    pq.write_table(pa.table({"item_id": ["i1"]}), tmp_path / "items.parquet")
    assert forget_in_parquet(tmp_path / "a.parquet", match) == 2
    back = pq.read_table(tmp_path / "a.parquet")
    assert back.column("n").to_pylist() == [2, 3] and back.schema == table.schema
    assert forget_in_parquet(tmp_path / "items.parquet", match) == 0
    assert "u1" in match.seen
    lines = [json.dumps({"user_id": u, "x": i}) for i, u in enumerate(["u2", "u1", "u3"])]
    (tmp_path / "s.jsonl").write_text("\n".join(lines) + "\n")
    assert forget_in_jsonl(tmp_path / "s.jsonl", match) == 1
    kept = [json.loads(line)["user_id"] for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert kept == ["u2", "u3"]
    assert not list(tmp_path.glob(".*"))  # no temp files left behind


def test_forget_deletes_the_users_rows_from_feasts_sqlite_online_store(tmp_path: Path) -> None:
    import sqlite3

    import yaml

    from recsys_core.online_layout import serialized_entity_key
    from recsys_core.settings import load_settings
    from recsys_pipelines.forget import forget_online

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(tmp_path), "feast": {
        "project": "proj", "online_store": "sqlite"}}))
    settings = load_settings("local", config)

    def key(uid: str) -> bytes:
        return serialized_entity_key("user_id", uid)

    (tmp_path / "feast").mkdir()
    with sqlite3.connect(tmp_path / "feast" / "online.db") as conn:
        for table in ("proj_user_batch", "proj_user_history", "proj2_user_batch"):
            conn.execute(f"CREATE TABLE {table} (entity_key BLOB, feature_name TEXT)")
            for uid in ("u1", "u2"):
                conn.executemany(f"INSERT INTO {table} VALUES (?, ?)",
                                 [(key(uid), "a"), (key(uid), "b")])
    assert forget_online(settings, {"u1", pseudonymize("u1", "k")}) == 4
    with sqlite3.connect(tmp_path / "feast" / "online.db") as conn:
        left = {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                for t in ("proj_user_batch", "proj_user_history", "proj2_user_batch")}
    assert left == {"proj_user_batch": 2, "proj_user_history": 2, "proj2_user_batch": 4}


def test_forget_drops_the_users_lines_from_stream_side_outputs(tmp_path: Path) -> None:
    import json

    import yaml

    from recsys_core.settings import load_settings
    from recsys_pipelines.forget import _Matcher, forget_in_side_output, side_output_files

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(tmp_path)}))
    settings = load_settings("local", config)
    folder = tmp_path / "flink" / "deadletter" / "2026-11-01--10"
    folder.mkdir(parents=True)
    lines = [{"line": json.dumps({"user_id": "u1", "event_id": "e1"}), "reason": "x"},
             {"line": json.dumps({"user_id": "u12", "event_id": "e2"}), "reason": "x"},
             {"line": '{"user_id": "u1", broken', "reason": "not json"},
             {"line": json.dumps({"user_id": pseudonymize("u1", "k")}), "reason": "x"}]
    part = folder / "part-0-0"
    part.write_text("".join(json.dumps(r) + "\n" for r in lines))
    (folder / ".part-0-1.inprogress").write_text("{}\n")
    assert list(side_output_files(settings)) == [part]
    assert forget_in_side_output(part, _Matcher("u1", "k")) == 3
    assert [json.loads(json.loads(t)["line"])["event_id"]
            for t in part.read_text().splitlines()] == ["e2"]
