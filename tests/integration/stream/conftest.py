"""Makes the Flink session fixtures visible here until tests/conftest.py registers
``tests.fixtures.flink`` in ``pytest_plugins`` (a non-root conftest may not)."""

from __future__ import annotations

from tests.fixtures.flink import flink_jvm, stream_env

__all__ = ["flink_jvm", "stream_env"]
