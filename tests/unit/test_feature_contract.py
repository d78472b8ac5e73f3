"""One feature contract: the Feast repository, the offline tables and serving all hold exactly
the views, features and services that ``recsys_core.features`` declares."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path
from types import ModuleType

from recsys_core import features as F


def _feast_repo(repo_root: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("_contract_repo",
                                                  repo_root / "feature_repo" / "definitions.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_feast_repository_declares_exactly_the_contracts_views_and_services(
    repo_root: Path,
) -> None:
    repo = _feast_repo(repo_root)
    assert {name: {f.name for f in view.schema} for name, view in repo.VIEWS.items()} == {
        name: set(features) for name, features in F.VIEW_FEATURES.items()}
    services = {v.name: v for v in vars(repo).values() if type(v).__name__ == "FeatureService"}
    assert {name: tuple(p.name for p in s.feature_view_projections)
            for name, s in services.items()} == F.FEATURE_SERVICES


def test_the_offline_tables_have_the_contracts_columns() -> None:
    from recsys_pipelines.batch_features import view_schemas

    keys = {F.USER_KEY, F.ITEM_KEY, F.WINDOW_END}
    assert {name: set(schema.names) - keys for name, schema in view_schemas().items()} == {
        name: set(features) for name, features in F.VIEW_FEATURES.items()}


def test_serving_reads_the_views_of_the_bundles_service() -> None:
    from recsys_platform.serving.online_features import ITEM_VIEWS, USER_VIEWS

    assert set(USER_VIEWS) | set(ITEM_VIEWS) == set(F.FEATURE_SERVICES[F.RECOMMENDER_V1])
    assert all(F.VIEW_ENTITY[v] == "user" for v in USER_VIEWS)
    assert all(F.VIEW_ENTITY[v] == "item" for v in ITEM_VIEWS)


def test_view_names_are_literals_only_in_the_contract(repo_root: Path) -> None:
    """``git grep`` finds a quoted view name only in the contract module and in tests."""
    names = "|".join(F.VIEW_FEATURES)
    out = subprocess.run(["git", "grep", "-lE", f"[\"']({names})[\"']", "--", "core", "platform",
                          "pipelines", "models", "feature_repo", "benchmarks"],
                         cwd=repo_root, capture_output=True, text=True)
    assert out.returncode in (0, 1), out.stderr
    assert out.stdout.split() in ([], ["core/recsys_core/features.py"]), out.stdout


class _Registry:
    """The Feast registry's ``get_feature_service`` over the repository's real services."""

    def __init__(self, repo: ModuleType, missing: str | None = None) -> None:
        self.services = {v.name: v for v in vars(repo).values()
                         if type(v).__name__ == "FeatureService" and v.name != missing}

    def get_feature_service(self, name: str) -> object:
        return self.services[name]


class _Bundle:
    def __init__(self, service: str) -> None:
        self.version, self.feature_service = "7", service


def test_a_replica_reads_the_registered_views_of_its_service(repo_root: Path) -> None:
    from recsys_platform.serving.online_features import registered_views

    registry = _Registry(_feast_repo(repo_root))
    assert registered_views(registry, F.RECOMMENDER_V1, "user") == (
        F.USER_BATCH.name, F.USER_STREAM.name, F.USER_HISTORY_VIEW)
    assert registered_views(registry, F.RECOMMENDER_V1, "item") == (
        F.ITEM_BATCH.name, F.ITEM_TRENDING.name, F.ITEM_METADATA_VIEW)


def test_a_bundle_whose_service_is_missing_or_another_is_rejected_with_the_reason(
    repo_root: Path,
) -> None:
    import pytest

    from recsys_platform.serving.online_features import (
        FeatureServiceError,
        check_feature_service,
    )

    repo = _feast_repo(repo_root)
    check_feature_service(_Bundle(F.RECOMMENDER_V1), _Registry(repo), F.RECOMMENDER_V1)
    with pytest.raises(FeatureServiceError, match="not in the Feast registry"):
        check_feature_service(_Bundle(F.RECOMMENDER_V1),
                              _Registry(repo, missing=F.RECOMMENDER_V1), F.RECOMMENDER_V1)
    with pytest.raises(FeatureServiceError, match="this replica reads 'recommender_v1'"):
        check_feature_service(_Bundle(F.RETRIEVAL_V1), _Registry(repo), F.RECOMMENDER_V1)
