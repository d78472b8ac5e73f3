"""The stream job's pseudonym SQL equals the Python pseudonym (evaluated by Flink)."""

from __future__ import annotations

from typing import Any

import pytest

from recsys_core.privacy import pseudonym_sql, pseudonymize

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KEY = "test-key-with-'quote"
IDS = ["u1", "u42", "user-ü", "p_already_a_pseudonym"]


def test_flink_sql_pseudonym_equals_python(flink_jvm: Any) -> None:
    values = ", ".join("('" + i.replace("'", "''") + "')" for i in IDS)
    table = flink_jvm.execute_sql(
        f"SELECT user_id, {pseudonym_sql('user_id', KEY)} AS pseudonym "
        f"FROM (VALUES {values}) AS t(user_id)")
    with table.collect() as rows:  # four rows: the per-record cost does not matter here
        got = {row[0]: row[1] for row in rows}
    assert got == {i: pseudonymize(i, KEY) for i in IDS}
    assert got["p_already_a_pseudonym"] == "p_already_a_pseudonym"
