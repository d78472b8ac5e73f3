"""Session fixtures of the batch pipeline tests: one ETL run and one feature run, shared.

``batch_env`` and ``prefect_harness`` come from ``tests/fixtures`` (imported here until the
lead lists those modules in the root ``pytest_plugins``).
"""

from __future__ import annotations

from typing import Any

import pytest

from recsys_pipelines.flows import etl_flow, features_flow
from tests.fixtures.feast_store import BatchEnv, batch_env  # noqa: F401
from tests.fixtures.prefect_harness import prefect_harness  # noqa: F401


@pytest.fixture(scope="session")
def etl_state(batch_env: BatchEnv, prefect_harness: None) -> Any:  # noqa: F811
    """The final state of one ETL flow run over every generated day."""
    return etl_flow(start=batch_env.start, end=batch_env.end,
                    config_file=str(batch_env.config_file), return_state=True)


@pytest.fixture(scope="session")
def features_state(batch_env: BatchEnv, etl_state: Any, ray_cluster: Any) -> Any:  # noqa: F811
    """The final state of one features flow run (compute, apply, materialize to Redis DB 1)."""
    assert etl_state.is_completed()
    return features_flow(start=batch_env.start, end=batch_env.end,
                         config_file=str(batch_env.config_file), return_state=True)
