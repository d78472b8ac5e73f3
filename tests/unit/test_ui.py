"""`recsys ui`: which server each profile's stores get, on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys_core.settings import load_settings
from recsys_platform.ui import mlflow_ui, prefect_ui


def test_local_mlflow_ui_serves_the_demo_store_on_loopback(tmp_path: Path) -> None:
    s = load_settings("local").model_copy(update={"data_dir": tmp_path})
    ui = mlflow_ui(s, port=5055)
    assert ui.url == "http://127.0.0.1:5055" and ui.health_url.endswith("/health")
    assert ui.argv is not None and ui.argv[1] == "server"
    args = dict(zip(ui.argv[2::2], ui.argv[3::2], strict=False))
    assert args["--backend-store-uri"] == f"sqlite:///{tmp_path.resolve().as_posix()}/mlflow.db"
    assert args["--artifacts-destination"] == f"{tmp_path.resolve().as_posix()}/mlartifacts"
    assert args["--host"] == "127.0.0.1" and args["--allowed-hosts"].startswith("127.0.0.1:5055")


def test_a_profile_with_servers_is_its_own_ui() -> None:
    s = load_settings("services", secrets=False)  # no privacy key needed to name the URLs
    assert mlflow_ui(s).argv is None and mlflow_ui(s).url == "http://127.0.0.1:5000"
    assert prefect_ui(s).argv is None and prefect_ui(s).url == "http://127.0.0.1:4200"


def test_local_prefect_ui_reads_the_ephemeral_api_database(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    ui = prefect_ui(load_settings("local"), port=4255)
    assert ui.argv is not None and ui.argv[1:3] == ["server", "start"]
    assert ui.store == str(tmp_path / "prefect.db") and ui.url == "http://127.0.0.1:4255"
    assert ui.env["PREFECT_UI_API_URL"] == "http://127.0.0.1:4255/api"
