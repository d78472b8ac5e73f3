"""The RayService's direct ingress wiring: replicas serve HTTP on their own port behind a Service.

Checked on the rendered chart (default: on) and with ``serving.directIngress.enabled=false``
(proxy only). The variable names must be ones the installed Ray reads.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import yaml

from recsys_platform.serving.ingress import DIRECT_INGRESS_ENV, DRAINING_ENV
from tests.deploy.conftest import Manifest, by_kind, helm_template, one

MIN_PORT_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"


def _groups(service: Manifest) -> tuple[dict[str, Any], dict[str, Any]]:
    cluster = service["spec"]["rayClusterConfig"]
    return cluster["headGroupSpec"], cluster["workerGroupSpecs"][0]


def _env(group: dict[str, Any]) -> dict[str, str]:
    container = group["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_ray_reads_the_variables_the_chart_sets() -> None:
    from ray.serve._private import constants

    source = inspect.getsource(constants)
    for name in (DIRECT_INGRESS_ENV, DRAINING_ENV, MIN_PORT_ENV):
        assert f'"{name}"' in source, name


def test_default_chart_serves_through_the_replicas_own_port(
        rendered: dict[str, list[Manifest]]) -> None:
    for name, objects in rendered.items():
        ray_service = one(objects, "RayService")
        head, workers = _groups(ray_service)
        for group in (head, workers):  # the controller (head) and the replicas (workers)
            env = _env(group)
            assert env[DIRECT_INGRESS_ENV] == "1", name
        port = int(_env(workers)[MIN_PORT_ENV])
        container = workers["template"]["spec"]["containers"][0]
        assert {"name": "http-direct", "containerPort": port} in container["ports"], name
        # one replica per worker pod: the replica's CPUs are the whole Ray node's
        config = yaml.safe_load(ray_service["spec"]["serveConfigV2"])
        deployment = config["applications"][0]["deployments"][0]
        assert deployment["ray_actor_options"]["num_cpus"] == int(
            workers["rayStartParams"]["num-cpus"]), name
        assert config["http_options"]["host"] == "0.0.0.0", name  # replicas bind every interface
        service = one(objects, "Service", "recsys-serve-direct")
        selector = service["spec"]["selector"]
        worker_labels = workers["template"]["metadata"]["labels"]
        head_labels = head["template"]["metadata"]["labels"]
        assert selector.items() <= worker_labels.items(), name
        assert not selector.items() <= head_labels.items(), name  # the head runs no replica
        (service_port,) = service["spec"]["ports"]
        assert service_port["port"] == port and service_port["targetPort"] == "http-direct"


def test_direct_ingress_can_be_turned_off(helm: Path) -> None:
    objects = helm_template(helm, [], "--set", "serving.directIngress.enabled=false")
    head, workers = _groups(one(objects, "RayService"))
    for group in (head, workers):
        assert _env(group)[DIRECT_INGRESS_ENV] == "0"
    assert "recsys-serve-direct" not in {s["metadata"]["name"] for s in by_kind(objects, "Service")}
    assert "ports" not in workers["template"]["spec"]["containers"][0]
