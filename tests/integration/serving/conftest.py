"""Serving tests run in the mode ``recsys serve up`` deploys by default: direct ingress.

The variables must be in the environment before the session's Ray cluster starts (every Ray
process reads them at import), so they are set when pytest collects this directory. Replicas
stop after 1 s instead of Ray's 30 s draining period (no load balancer in front of them here).
``RECSYS_TEST_DIRECT_INGRESS=0`` runs the same tests through Serve's proxy instead.
"""

from __future__ import annotations

import os

from recsys_platform.serving.ingress import direct_ingress_env
from tests.integration.serving.env import serving_env  # noqa: F401  (the session's serving app)

DIRECT_INGRESS = os.environ.get("RECSYS_TEST_DIRECT_INGRESS", "1") == "1"
for _name, _value in direct_ingress_env(DIRECT_INGRESS, draining_s=1).items():
    os.environ.setdefault(_name, _value)
