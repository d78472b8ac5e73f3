"""Fixtures of the models' integration tests (until tests/conftest.py lists the plugin)."""

from tests.fixtures.mlflow_store import mlflow_postgres_store, mlflow_sqlite_store  # noqa: F401
