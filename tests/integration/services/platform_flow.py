"""A small platform flow for the services test, executed in its own process.

It loads the ``services`` settings, points Prefect at ``settings.prefect.api_url`` and runs a
flow on that server whose task generates a tiny event set with the platform's generator.
Prints one JSON line: the flow-run id and the flow's result.
"""

from __future__ import annotations

import json
import os
import sys

from recsys_core.settings import load_settings

settings = load_settings("services")
assert settings.prefect.api_url, "the services profile names a Prefect server"
os.environ["PREFECT_API_URL"] = settings.prefect.api_url  # before Prefect reads its settings

from prefect import flow, task  # noqa: E402

from recsys_pipelines.generator import GeneratorConfig, generate  # noqa: E402


@task(retries=2, retry_delay_seconds=1)
def summarize_events(events: int) -> dict[str, int]:
    data = generate(GeneratorConfig(events=events, days=2, users=50, items=80, seed=3))
    return {"events": len(data.events), "users": int(data.events["user_id"].nunique())}


@flow(name="services-smoke")
def services_smoke(events: int = 500) -> dict[str, int]:
    return summarize_events(events)


if __name__ == "__main__":
    state = services_smoke(events=int(sys.argv[1]) if len(sys.argv) > 1 else 500,
                           return_state=True)
    sys.stdout.write(json.dumps({"flow_run_id": str(state.state_details.flow_run_id),
                                 "stats": state.result()}) + "\n")
