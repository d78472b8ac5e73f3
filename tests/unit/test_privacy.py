"""Keyed pseudonyms are stable, key-dependent, idempotent and keep nulls."""

from __future__ import annotations

import pandas as pd

from recsys_platform.privacy import pseudonymize, pseudonymize_series


def test_pseudonyms() -> None:
    a = pseudonymize("u1", "k1")
    assert a == pseudonymize("u1", "k1") and a != pseudonymize("u1", "k2")
    assert a != pseudonymize("u2", "k1") and "u1" not in a
    assert pseudonymize(a, "k1") == a
    out = pseudonymize_series(pd.Series(["u1", None, "", "u1"]), "k1")
    assert out[0] == a and out[3] == a and out[1] is None and out[2] == ""
