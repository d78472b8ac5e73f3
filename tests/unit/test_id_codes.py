"""Id tables sized to the data: frequent training ids get rows, the rest share a hashed tail."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recsys_models.data import EncoderSpec, encode_users
from recsys_models.hashing import ITEM_SALT, IdCodes, build_vocabulary, hash_ids
from recsys_models.scoring import encode_user


def test_without_a_vocabulary_the_rows_are_the_plain_hash() -> None:
    values = np.array(["i1", "i2", None, "", "i99"], dtype=object)
    codes = IdCodes((), rows=1_000, salt=ITEM_SALT)
    np.testing.assert_array_equal(codes.encode(values), hash_ids(values, 1_000, ITEM_SALT))
    np.testing.assert_array_equal(codes.encode_strings(list(values)),
                                  hash_ids(values, 1_000, ITEM_SALT))


def test_vocabulary_ids_get_their_own_rows_and_the_rest_share_the_tail() -> None:
    vocab = tuple(f"i{n}" for n in range(50))
    codes = IdCodes(vocab, rows=1 + 50 + 16, salt=ITEM_SALT)
    assert codes.tail == 16
    known = codes.encode(np.array(vocab, dtype=object))
    np.testing.assert_array_equal(known, np.arange(1, 51))  # most frequent first: rows 1..V
    others = np.array([f"new{n}" for n in range(500)], dtype=object)
    tail = codes.encode(others)
    assert tail.min() >= 51 and tail.max() <= 66 and len(set(tail)) == 16  # all tail rows used
    mixed = ["i3", None, "new7", "", "i0"]
    np.testing.assert_array_equal(codes.encode(np.array(mixed, dtype=object)),
                                  codes.encode_strings(mixed))  # frames and requests agree
    assert codes.encode_strings(mixed)[[1, 3]].tolist() == [0, 0]  # missing: padding row
    lists = codes.encode_lists(pd.Series([["i1", "new7"], [], None]), width=3)
    assert lists.tolist() == [[2, int(codes.encode_strings(["new7"])[0]), 0], [0, 0, 0],
                              [0, 0, 0]]
    with pytest.raises(ValueError, match="cannot hold"):
        IdCodes(vocab, rows=51, salt=ITEM_SALT)


def test_the_vocabulary_is_the_frequent_ids_most_frequent_first() -> None:
    ids = pd.Series(["b"] * 3 + ["a"] * 3 + ["c"] * 5 + ["once", None, ""])
    assert build_vocabulary(ids, cap=10) == ("c", "a", "b")  # ties by id; "once" < min_count
    assert build_vocabulary(ids, cap=2) == ("c", "a")
    assert build_vocabulary(ids, cap=10, min_count=1) == ("c", "a", "b", "once")


def test_a_spec_sizes_its_tables_from_training_rows_and_round_trips() -> None:
    rows = pd.DataFrame({"user_id": ["u1", "u1", "u2", "u2", "u3"],
                         "item_id": ["x", "x", "y", "y", "z"]})
    plain = EncoderSpec(item_buckets=1_000, user_buckets=500)
    assert plain.with_vocabularies(rows) is plain  # no cap: hashed tables as before
    spec = EncoderSpec(item_vocab_cap=10, user_vocab_cap=10, tail_buckets=8).with_vocabularies(
        rows)
    assert spec.item_vocab == ("x", "y") and spec.item_buckets == 1 + 2 + 8
    assert spec.user_vocab == ("u1", "u2") and spec.user_buckets == 1 + 2 + 8
    assert spec.table_sizes() == {"item_table_rows": 11, "item_vocabulary": 2,
                                  "user_table_rows": 11, "user_vocabulary": 2}
    again = EncoderSpec.from_dict(spec.to_dict())
    assert again == spec
    user = {"user_id": "u2", "user_history": ["y", "z", "x"], "user_ctr_7d": 0.2}
    one = encode_user(again, "u2", user["user_history"], user)
    frame = encode_users(pd.DataFrame([user]), spec)
    for key in ("user_hash", "history"):
        np.testing.assert_array_equal(one[key], frame[key])
    assert one["user_hash"].tolist() == [2] and one["history"][0, :3].tolist()[::2] == [2, 1]
