"""``recsys recommend --history snapshot``: batch top-K from the registry's champion, the users'
histories read from the training snapshot (no online store), MovieLens-style ``userId`` input."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from typer.testing import CliRunner

from tests.integration.serving.env import ServingEnv


def test_recommend_from_the_snapshot_writes_k_unseen_items_per_user(
    serving_env: ServingEnv, tmp_path: Path
) -> None:
    from recsys_models.data import snapshot_dir
    from recsys_platform.cli import app

    settings = serving_env.settings
    snapshot = serving_env.outcome.split.snapshot_id
    rows = pd.read_parquet(snapshot_dir(settings.data_dir, snapshot))
    rows["user_id"] = rows["user_id"].astype(str)
    users = [serving_env.known_user, *sorted(set(rows["user_id"]) - {serving_env.known_user})[:4]]
    pd.DataFrame({"userId": users * 2}).to_csv(tmp_path / "users.csv", index=False)  # repeats

    out = tmp_path / "top5.csv"
    result = CliRunner().invoke(app, [
        "--config", str(serving_env.config_file), "recommend", "--users",
        str(tmp_path / "users.csv"), "--history", "snapshot", "--snapshot", snapshot,
        "--exclude-seen", "--k", "5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"for {len(users)} users" in result.output

    recs = pd.read_csv(out, dtype={"user_id": str, "item_id": str})
    assert set(recs["user_id"]) == set(users)
    for user, ranks in recs.groupby("user_id")["rank"]:
        assert list(ranks) == [1, 2, 3, 4, 5], user  # each user once, k items
    engaged = rows[rows["clicked"] == 1].groupby("user_id")["item_id"].agg(
        lambda s: set(s.astype(str)))
    for user, items in recs.groupby("user_id")["item_id"]:
        assert not set(items) & engaged.get(user, set()), user  # --exclude-seen
