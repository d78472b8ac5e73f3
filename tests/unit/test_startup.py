"""A replica's Feast imports without typeguard's instrumentation (serving/startup.py)."""

from __future__ import annotations

import subprocess
import sys

import typeguard

from recsys_platform.serving.startup import _unchecked, import_feast_unchecked

CHECK = """
import typeguard
from recsys_platform.serving.startup import import_feast_unchecked
real = typeguard.typechecked
assert import_feast_unchecked()
assert typeguard.typechecked is real  # put back
from feast import FeatureView, FeatureStore
from feast.repo_config import RepoConfig
assert FeatureStore.__init__.__code__.co_filename.endswith("feature_store.py")
assert import_feast_unchecked() is False  # once per process
"""


def test_feast_imports_unchecked_and_typeguard_is_restored() -> None:
    """In a fresh process (Feast is imported here already): the imports succeed, Feast's
    classes are its own, and ``typechecked`` is typeguard's again afterwards."""
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_stand_in_decorator_returns_what_it_decorates() -> None:
    def f(x: int) -> int:
        return x

    assert _unchecked(f) is f and _unchecked()(f) is f
    assert typeguard.typechecked is not _unchecked


def test_a_process_that_imported_feast_is_left_alone() -> None:
    import feast  # noqa: F401

    assert import_feast_unchecked() is False
