"""The serving tests stand on the batch pipeline's session fixtures."""

from tests.fixtures.feast_store import batch_env  # noqa: F401
from tests.fixtures.prefect_harness import prefect_harness  # noqa: F401
from tests.integration.batch.conftest import etl_state, features_state  # noqa: F401
