"""Id hashing: the one place that maps string ids into embedding buckets, and its salts.

Ids are hashed into fixed bucket spaces ``1..buckets-1`` (bucket 0 is reserved: padding and
"unknown"), so a new id needs no vocabulary. Each id kind has its own salt, so a user and an
item with the same string do not share a bucket by construction. The hash is pandas'
``hash_array`` (SipHash with a fixed key): the same in every process and every run.

Training encodes frames (:func:`hash_ids`, :func:`hash_lists`); serving encodes one request's
few plain values (:func:`hash_strings`); both give the same buckets (tests/model checks it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

USER_SALT = "u:"
ITEM_SALT = "i:"  # item ids, in the catalog and in histories alike
CREATOR_SALT = "c:"
TAG_SALT = "t:"


def hash_ids(values: Any, buckets: int, salt: str = "") -> np.ndarray:
    """Stable hash of string ids into ``1..buckets-1`` (0 for null/empty). Same in every process."""
    arr = pd.Series(values, dtype=object)
    missing = arr.isna().to_numpy() | (arr.astype(str) == "").to_numpy()
    keyed = (salt + arr.astype(str)).to_numpy(dtype=object)
    hashed = pd.util.hash_array(keyed).astype(np.uint64) % np.uint64(buckets - 1)
    out = hashed.astype(np.int64) + 1
    out[missing] = 0
    return out


def hash_lists(lists: pd.Series, width: int, buckets: int, salt: str) -> np.ndarray:
    """Hashes list<string> cells into a (n, width) int matrix padded with 0, first entries kept."""
    n = len(lists)
    out = np.zeros((n, width), dtype=np.int64)
    cells = [list(v)[:width] if isinstance(v, list | tuple | np.ndarray) else [] for v in lists]
    lengths = np.fromiter((len(c) for c in cells), dtype=np.int64, count=n)
    if lengths.sum() == 0:
        return out
    flat = [x for c in cells for x in c]
    codes = hash_ids(flat, buckets, salt)
    rows = np.repeat(np.arange(n), lengths)
    cols = np.concatenate([np.arange(k) for k in lengths]) if n else np.zeros(0, np.int64)
    out[rows, cols] = codes
    return out


def _missing(value: Any) -> bool:
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))


def hash_strings(values: Sequence[Any], buckets: int, salt: str) -> np.ndarray:
    """:func:`hash_ids` for a few plain values, without a pandas Series.

    ``categorize=False`` skips pandas' factorization (131 us -> 12 us per call) and gives the
    same hashes.
    """
    out = np.zeros(len(values), dtype=np.int64)
    present = [i for i, v in enumerate(values) if not _missing(v)]
    if present:
        keyed = np.array([salt + str(values[i]) for i in present], dtype=object)
        hashed = pd.util.hash_array(keyed, categorize=False) % np.uint64(buckets - 1)
        out[present] = hashed.astype(np.int64) + 1
    return out
