"""A small platform run for the services test, executed in its own process.

It loads the ``services`` settings, points Prefect at ``settings.prefect.api_url`` and runs a
flow on that server whose tasks generate a tiny event set with the platform's generator and
log a run (params, metrics, an artifact) to the MLflow server of ``settings.mlflow``.
Prints one JSON line: the Prefect flow-run id and the MLflow run id.
"""

from __future__ import annotations

import json
import os
import sys

from recsys_platform.settings import load_settings

settings = load_settings("services")
assert settings.prefect.api_url, "the services profile names a Prefect server"
os.environ["PREFECT_API_URL"] = settings.prefect.api_url  # before Prefect reads its settings

from mlflow import MlflowClient  # noqa: E402
from prefect import flow, task  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402

from recsys_pipelines.generator import GeneratorConfig, generate  # noqa: E402


@task(retries=2, retry_delay_seconds=1)
def count_events(events: int) -> dict[str, int]:
    data = generate(GeneratorConfig(events=events, days=2, users=50, items=80, seed=3))
    return {"events": len(data.events), "users": data.events["user_id"].nunique()}


@task(retries=2, retry_delay_seconds=1)
def log_to_mlflow(stats: dict[str, int], flow_run_id: str) -> str:
    client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
    experiment = client.get_experiment_by_name(settings.mlflow.experiment)
    experiment_id = (experiment.experiment_id if experiment
                     else client.create_experiment(settings.mlflow.experiment))
    run = client.create_run(experiment_id, tags={"prefect.flow_run_id": flow_run_id})
    client.log_param(run.info.run_id, "profile", settings.profile)
    for key, value in stats.items():
        client.log_metric(run.info.run_id, key, value)
    client.log_text(run.info.run_id, json.dumps(stats), "stats/summary.json")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


@flow(name="services-smoke")
def services_smoke(events: int = 500) -> str:
    stats = count_events(events)
    return log_to_mlflow(stats, str(flow_run.id))


if __name__ == "__main__":
    state = services_smoke(events=int(sys.argv[1]) if len(sys.argv) > 1 else 500,
                           return_state=True)
    sys.stdout.write(json.dumps({"flow_run_id": str(state.state_details.flow_run_id),
                                 "mlflow_run_id": state.result()}) + "\n")
