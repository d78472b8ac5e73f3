"""The CLI's console logging: the project's INFO, libraries' warnings, everything with -v."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import pytest
import yaml

from recsys_core import logs


@pytest.mark.parametrize(("name", "level", "shown"), [
    ("recsys_pipelines.etl", logging.INFO, True),
    ("recsys_models.registry", logging.DEBUG, False),
    ("__main__", logging.INFO, True),
    ("prefect.task_runs", logging.INFO, False),
    ("ray.data", logging.INFO, False),
    ("mlflow.pyfunc", logging.WARNING, True),
    ("apache_beam.io.filesystems", logging.ERROR, True),
    ("recsys_platformer", logging.INFO, False),  # a prefix is not the package
])
def test_quiet_console_shows_project_info_and_library_warnings(
    name: str, level: int, shown: bool
) -> None:
    assert logs.shows(name, level, verbose=False) is shown


def test_demo_level_keeps_project_warnings_only() -> None:
    demo = logging.WARNING  # `recsys demo`: its tables carry the project's INFO records
    assert not logs.shows("recsys_models.baselines", logging.INFO, False, demo)
    assert logs.shows("recsys_pipelines.etl", logging.WARNING, False, demo)
    assert logs.shows("recsys_models.baselines", logging.INFO, True, demo)  # -v


def test_verbose_shows_every_record() -> None:
    assert logs.shows("ray.data", logging.DEBUG, verbose=True)
    assert logs.shows("prefect.flow_runs", logging.INFO, verbose=True)


def test_quiet_environment_turns_library_output_off_and_keeps_the_users_choice() -> None:
    env = logs.library_environment(verbose=False, environ={"TQDM_DISABLE": "0"})
    assert env["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1"
    assert env["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"
    assert "TQDM_DISABLE" not in env  # set by the user: theirs wins
    config = yaml.safe_load(Path(env["RAY_DATA_LOGGING_CONFIG"]).read_text())
    assert config["handlers"]["console"]["level"] == "ERROR"
    assert config["loggers"]["ray.data"]["handlers"] == ["file", "console"]


def test_verbose_environment_only_fixes_behaviour() -> None:
    env = logs.library_environment(verbose=True, environ={})
    assert env == {"PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                   "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}


@pytest.mark.parametrize(("category", "filename", "hidden"), [
    (DeprecationWarning, "/venv/site-packages/ray/data/context.py", True),
    (FutureWarning, "/venv/site-packages/ray/_private/worker.py", True),
    (DeprecationWarning, "/repo/pipelines/recsys_pipelines/etl.py", False),  # ours: fix it
    (UserWarning, "/venv/site-packages/mlflow/types/utils.py", False),  # not a deprecation
])
def test_only_library_deprecations_are_hidden(category: type[Warning], filename: str,
                                              hidden: bool) -> None:
    assert logs.hides_warning(category, filename, verbose=False) is hidden
    assert not logs.hides_warning(category, filename, verbose=True)


def test_hidden_even_when_a_library_turns_deprecations_on(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "environ", {})  # configure() writes the library variables here
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    with warnings.catch_warnings(record=True) as shown:  # restores showwarning too
        logs.configure(verbose=False)
        warnings.simplefilter("always", DeprecationWarning)  # what Feast does on import
        warnings.warn_explicit("old library API", DeprecationWarning,
                               "/venv/site-packages/ray/data/context.py", 1)
        warnings.warn_explicit("old call in our code", DeprecationWarning,
                               "/repo/pipelines/recsys_pipelines/etl.py", 1)
    assert [str(w.message) for w in shown] == ["old call in our code"]
    assert os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1"


def test_library_prints_become_debug_records(caplog: pytest.LogCaptureFixture,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    log = logging.getLogger("recsys_pipelines.feature_store")
    with caplog.at_level(logging.DEBUG, logger=log.name), logs.library_stdout(log):
        print("Materializing \x1b[1m4\x1b[0m feature views")  # noqa: T201 (a library's print)
        print("")  # noqa: T201
    assert capsys.readouterr().out == ""
    assert [r.getMessage() for r in caplog.records] == ["Materializing 4 feature views"]
