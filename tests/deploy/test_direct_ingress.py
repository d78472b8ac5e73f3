"""The RayService's direct ingress wiring: replicas serve HTTP on their own port behind a Service.

Checked on the rendered chart (default: on) and with ``serving.directIngress.enabled=false``
(proxy only). The variable names must be ones the installed Ray reads.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

from recsys_platform.serving.ingress import DIRECT_INGRESS_ENV, DRAINING_ENV
from tests.deploy.conftest import KUBERNETES_VERSION, Manifest, by_kind, helm_template, one
from tests.deploy.crd import CrdSchema

MIN_PORT_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"
MAX_PORT_ENV = "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"


def _groups(service: Manifest) -> tuple[dict[str, Any], dict[str, Any]]:
    cluster = service["spec"]["rayClusterConfig"]
    return cluster["headGroupSpec"], cluster["workerGroupSpecs"][0]


def _env(group: dict[str, Any]) -> dict[str, str]:
    container = group["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _probe_urls(command: str) -> list[tuple[int, str]]:
    """The (port, path) each step of a ``bash -c`` probe fetches, in order."""
    steps = command.split(" && ")
    urls = [re.search(r"http://localhost:(\d+)(/\S*)", step) for step in steps]
    assert all(urls), command
    return [(int(u.group(1)), u.group(2)) for u in urls if u]


def test_ray_reads_the_variables_the_chart_sets() -> None:
    from ray.serve._private import constants

    source = inspect.getsource(constants)
    for name in (DIRECT_INGRESS_ENV, DRAINING_ENV, MIN_PORT_ENV, MAX_PORT_ENV):
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
        assert int(_env(workers)[MAX_PORT_ENV]) > port, name  # Ray's range must hold the port
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


def test_ray_pods_start_with_the_serve_variables_of_serve_up(
        rendered: dict[str, list[Manifest]]) -> None:
    """The admission gate + Retry-After middlewares and the same-loop setting: the chart's Ray
    pods carry what ``recsys serve up`` gives a local head (``direct_ingress_env``)."""
    from ray.serve._private import constants

    from recsys_platform.serving.ingress import direct_ingress_env

    expected = direct_ingress_env(True)
    source = inspect.getsource(constants)
    for objects in rendered.values():
        for group in _groups(one(objects, "RayService")):
            env = _env(group)
            assert {k: env.get(k) for k in expected} == expected
    assert all(f'"{name}"' in source for name in expected)  # names Ray reads


def test_direct_ingress_can_be_turned_off(helm: Path) -> None:
    objects = helm_template(helm, [], "--set", "serving.directIngress.enabled=false")
    head, workers = _groups(one(objects, "RayService"))
    for group in (head, workers):
        assert _env(group)[DIRECT_INGRESS_ENV] == "0"
    assert "recsys-serve-direct" not in {s["metadata"]["name"] for s in by_kind(objects, "Service")}
    assert "ports" not in workers["template"]["spec"]["containers"][0]


def test_worker_readiness_waits_for_the_replica_and_keeps_kuberays_checks(
        rendered: dict[str, list[Manifest]]) -> None:
    # A readinessProbe set here replaces the whole probe KubeRay would inject (raylet health,
    # plus the Serve proxy's health on RayService workers), so the chart runs those too.
    for name, objects in rendered.items():
        ray_service = one(objects, "RayService")
        head, workers = _groups(ray_service)
        container = workers["template"]["spec"]["containers"][0]
        probe = container["readinessProbe"]
        shell, flag, command = probe["exec"]["command"]
        assert (shell, flag) == ("bash", "-c"), name
        direct = int(_env(workers)[MIN_PORT_ENV])
        proxy = yaml.safe_load(ray_service["spec"]["serveConfigV2"])["http_options"]["port"]
        assert _probe_urls(command) == [
            (52365, "/api/local_raylet_healthz"),  # KubeRay: raylet (dashboard agent's port)
            (proxy, "/-/healthz"),                 # KubeRay: this pod's Serve proxy
            (direct, "/-/healthz"),                # the replica's own server (not draining)
            (direct, "/readyz"),                   # the app: a bundle is loaded
        ], name
        assert "dashboard-agent-listen-port" not in workers["rayStartParams"], name
        # the checks after the first fail on an HTTP error, not only on a missing "success"
        assert command.endswith(f"-O /dev/null http://localhost:{direct}/readyz"), name
        assert probe["failureThreshold"] == 1, name  # out of the endpoints at once, as KubeRay
        # KubeRay keeps injecting the liveness probe (raylet) and the head's probes
        assert "livenessProbe" not in container, name
        assert "readinessProbe" not in head["template"]["spec"]["containers"][0], name


def test_probe_paths_exist_in_ray_and_the_app() -> None:
    from ray.dashboard.modules.reporter import healthz_agent
    from ray.serve._private import replica

    from recsys_platform.serving import app

    assert '"/api/local_raylet_healthz"' in inspect.getsource(healthz_agent)
    assert '"/-/healthz"' in inspect.getsource(replica)  # the direct-ingress server answers it
    assert '@api.get("/readyz")' in inspect.getsource(app)


def test_no_readiness_override_without_direct_ingress(helm: Path,
                                                      crds: dict[str, CrdSchema]) -> None:
    objects = helm_template(helm, [], "--set", "serving.directIngress.enabled=false")
    ray_service = one(objects, "RayService")
    crds["RayService"].validate(ray_service)
    for obj in by_kind(objects, "Service"):
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    for group in _groups(ray_service):
        container = group["template"]["spec"]["containers"][0]
        assert "readinessProbe" not in container  # KubeRay's own probe applies
        assert "livenessProbe" not in container
