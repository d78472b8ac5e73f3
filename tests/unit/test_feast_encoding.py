"""The column encoder of the fast materializer writes Feast's bytes, edge values included."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime

import pyarrow as pa
import pytest

from recsys_core import online_layout as layout

COLUMNS = {
    "INT64": pa.array([0, 1, -1, 127, 128, 300, 2**40, -(2**63), 2**63 - 1, None, 300],
                      pa.int64()),
    "DOUBLE": pa.array([0.0, -0.0, 1.5, -2.25, 1e300, 5e-324, None, 1.5], pa.float64()),
    "STRING": pa.array(["", "a", "usér_ü", "x" * 200, None, "a"], pa.string()),
    "STRING_LIST": pa.array([[], ["a"], ["", "b"], ["ü" * 100] * 3, None, ["a", None]],
                            pa.list_(pa.string())),
    "UNIX_TIMESTAMP": pa.array([datetime(2026, 11, 1, tzinfo=UTC), datetime(1969, 12, 31, 23,
                                59, 59, 500_000, tzinfo=UTC), datetime(2026, 11, 1,
                                tzinfo=UTC)], pa.timestamp("ms", tz="UTC")),
}


@pytest.mark.parametrize("value_type", sorted(COLUMNS))
def test_every_value_is_serialized_as_feasts_type_map_does(value_type: str) -> None:
    column = COLUMNS[value_type]
    fast = layout.encode_column(column, value_type, check=False)
    assert fast == layout._feast_encoding(layout._python_values(column, value_type), value_type)


def test_wrap_is_applied_to_every_value_the_same_way() -> None:
    column = COLUMNS["STRING_LIST"]
    wrapped = layout.encode_column(column, "STRING_LIST", wrap=lambda b: b"<" + b + b">")
    assert wrapped == [b"<" + b + b">" for b in layout.encode_column(column, "STRING_LIST")]


def test_a_writer_with_a_prepared_key_encoder_does_not_import_feast() -> None:
    """Importing Feast costs seconds of CPU per Ray worker; the writing path must not."""
    code = ("import sys, pyarrow as pa; from recsys_pipelines import materialize; "
            "from recsys_core import online_layout as layout; "
            "k = layout.EntityKeyEncoder(b'head', b'proj'); k('item-1'); "
            "layout.encode_column(pa.array([1, 2]), 'INT64', check=False); "
            "print(any(m == 'feast' or m.startswith('feast.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_the_key_encoder_equals_feasts_key() -> None:
    encode = layout.entity_key_encoder("item_id", "proj", 3)
    assert encode("item-7") == layout.entity_key("item_id", "item-7", "proj", 3)
