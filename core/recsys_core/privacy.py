"""Pseudonymous user ids: a keyed hash applied before events reach the lake or the stream.

The same key maps a raw id to the same pseudonym everywhere (ETL, stream job, serving), so
features and training join as before, while the lake never holds a raw id. Rotating the key
re-identifies nobody: old pseudonyms simply stop matching.

The hash is SHA-256 over ``key | user_id`` (not HMAC) because the stream job must compute the
same value inside Flink SQL (``SHA2``), keeping Python out of the per-row path; for a
pseudonym (no message authentication) a secret-prefixed SHA-256 is as hard to invert.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd

from recsys_core.atomic import atomic_write_text

PREFIX = "p_"


def pseudonymize(user_id: str, key: str) -> str:
    """The pseudonym of one raw user id (idempotent: a pseudonym maps to itself)."""
    if user_id.startswith(PREFIX):
        return user_id
    digest = hashlib.sha256(f"{key}|{user_id}".encode()).hexdigest()
    return PREFIX + digest[:24]


def pseudonym_sql(column: str, key: str) -> str:
    """The same pseudonym as a Flink SQL expression over ``column`` (idempotent as well)."""
    quoted = key.replace("'", "''")
    return (f"CASE WHEN {column} IS NULL OR {column} = '' "
            f"OR SUBSTRING({column}, 1, {len(PREFIX)}) = '{PREFIX}' "
            f"THEN {column} ELSE CONCAT('{PREFIX}', "
            f"SUBSTRING(SHA2(CONCAT('{quoted}|', {column}), 256), 1, 24)) END")


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


# The forget list: users removed by ``recsys privacy forget``. It holds a tombstone, a hash of
# the pseudonym, rather than the pseudonym itself, so that nothing the pipelines write or read
# still names the user; training sets drop rows whose user maps to a tombstone.
FORGET_LIST = "privacy/forgotten.json"
AUDIT_LOG = "privacy/audit.jsonl"


def tombstone(user_id: str, key: str) -> str:
    """The forget-list entry of a raw id or pseudonym (the same for both)."""
    digest = hashlib.sha256(f"forget|{pseudonymize(user_id, key)}".encode()).hexdigest()
    return "t_" + digest[:32]


def read_forget_list(path: Path) -> set[str]:
    """The tombstones of forgotten users (empty when nobody was forgotten)."""
    if not path.is_file():
        return set()
    return set(json.loads(path.read_text())["tombstones"])


def add_to_forget_list(path: Path, entry: str) -> None:
    """Adds one tombstone, atomically (temp file, then rename)."""
    entries = sorted(read_forget_list(path) | {entry})
    atomic_write_text(path, json.dumps({"tombstones": entries}, indent=1))


def forgotten_mask(user_ids: pd.Series, key: str, entries: set[str]) -> pd.Series:
    """True for each row whose user (raw id or pseudonym) is on the forget list."""
    if not entries or user_ids.empty:
        return pd.Series(False, index=user_ids.index)
    hits = {u for u in user_ids.dropna().unique()
            if isinstance(u, str) and u and tombstone(u, key) in entries}
    return user_ids.isin(hits)
