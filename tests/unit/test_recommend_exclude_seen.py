"""`recsys recommend --exclude-seen`: which items count as seen for each user."""

from __future__ import annotations

import pandas as pd
import pytest

from recsys_core.settings import load_settings
from recsys_pipelines import feature_store
from recsys_platform.commands.models import _seen_items


def test_seen_items_merge_the_file_history_with_the_online_store(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    online = pd.DataFrame({"user_id": ["u1", "u2"], "user_history": [["i1", "i2"], None],
                           "user_recent_items": [["i9"], None]})
    asked: list[tuple[str, list[str], tuple[str, ...]]] = []

    def fake_online(store: object, entity: str, ids: list[str],
                    views: tuple[str, ...]) -> pd.DataFrame:
        asked.append((entity, ids, views))
        return online

    monkeypatch.setattr(feature_store, "load_store", lambda settings: object())
    monkeypatch.setattr(feature_store, "online_features", fake_online)
    users = pd.DataFrame({"user_id": ["u1", "u2"], "user_history": [["i5"], []]})
    seen = _seen_items(load_settings("local"), users)
    assert seen == {"u1": {"i1", "i2", "i5", "i9"}, "u2": set()}  # u2: unknown online
    assert asked == [("user", ["u1", "u2"], ("user_history", "user_stream"))]
