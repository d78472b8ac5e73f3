"""Pseudonymous user ids: a keyed hash applied before events reach the lake or the stream.

The same key maps a raw id to the same pseudonym everywhere (ETL, stream job, serving), so
features and training join as before, while the lake never holds a raw id. Rotating the key
re-identifies nobody: old pseudonyms simply stop matching.
"""

from __future__ import annotations

import hashlib
import hmac

import pandas as pd

PREFIX = "p_"


def pseudonymize(user_id: str, key: str) -> str:
    """The pseudonym of one raw user id (idempotent: a pseudonym maps to itself)."""
    if user_id.startswith(PREFIX):
        return user_id
    digest = hmac.new(key.encode(), user_id.encode(), hashlib.sha256).hexdigest()
    return PREFIX + digest[:24]


def pseudonymize_series(user_ids: pd.Series, key: str) -> pd.Series:
    """Vectorised over a column; nulls stay null (validation rejects them later)."""
    cache: dict[str, str] = {}

    def one(value: object) -> object:
        if not isinstance(value, str) or not value:
            return value
        if value not in cache:
            cache[value] = pseudonymize(value, key)
        return cache[value]

    return user_ids.map(one)
