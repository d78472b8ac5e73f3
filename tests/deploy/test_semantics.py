"""What the schemas cannot see: code paths exist, images are pinned, pods are locked down."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from recsys_core.settings import load_settings
from tests.conftest import REPO_ROOT
from tests.deploy.conftest import VALUES_FILES, Manifest, by_kind, one

SOURCE_ROOTS = ("platform", "pipelines", "models")
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}


def module_file(module: str) -> Path | None:
    """The repository file of a dotted module name, or None."""
    parts = module.split(".")
    for root in SOURCE_ROOTS:
        base = REPO_ROOT / root / Path(*parts)
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


def defines_top_level(path: Path, name: str) -> bool:
    for node in ast.parse(path.read_text()).body:
        targets: list[Any] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        elif isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name == name:
            return True
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return True
    return False


def pod_specs(obj: Manifest) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod spec) of every pod template an object creates, built-in or custom."""
    spec = obj.get("spec", {})
    kind = obj["kind"]
    if kind in WORKLOAD_KINDS:
        yield kind, spec["template"]["spec"]
    elif kind == "RayService":
        yield from _ray_cluster_pods("rayClusterConfig", spec["rayClusterConfig"])
    elif kind == "RayJob":
        yield from _ray_cluster_pods("rayClusterSpec", spec["rayClusterSpec"])
        if "submitterPodTemplate" in spec:
            yield "submitterPodTemplate", spec["submitterPodTemplate"]["spec"]
    elif kind == "FlinkDeployment":
        yield "podTemplate", spec["podTemplate"]["spec"]


def _ray_cluster_pods(where: str, cluster: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    yield f"{where}.head", cluster["headGroupSpec"]["template"]["spec"]
    for group in cluster.get("workerGroupSpecs", []):
        yield f"{where}.{group['groupName']}", group["template"]["spec"]


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


VALUES_NAMES = sorted(VALUES_FILES)


def test_serve_config_parses_and_import_path_exists(rendered: dict[str, list[Manifest]]) -> None:
    for objects in rendered.values():
        config = yaml.safe_load(one(objects, "RayService")["spec"]["serveConfigV2"])
        apps = config["applications"]
        assert apps, "serveConfigV2 has no application"
        for app in apps:
            module, _, attr = app["import_path"].partition(":")
            assert module == "recsys_platform.serving.app"
            path = module_file(module)
            assert path is not None, f"import path {app['import_path']}: no file for {module}"
            assert defines_top_level(path, attr), f"{path} defines no top-level {attr!r}"


def test_committed_serve_config_is_the_local_profile() -> None:
    """``serve_config.yaml`` (``serve run``) carries serving/deployment.py's rendering of the
    local profile."""
    from recsys_platform.serving.deployment import DEPLOYMENT_NAME, deployment_options

    path = REPO_ROOT / "platform" / "recsys_platform" / "serving" / "serve_config.yaml"
    deployment = yaml.safe_load(path.read_text())["applications"][0]["deployments"][0]
    expected = deployment_options(load_settings("local", secrets=False).serving)
    assert deployment == {"name": DEPLOYMENT_NAME, **expected}


def test_ray_version_matches_installed_ray(rendered: dict[str, list[Manifest]]) -> None:
    ray_version = metadata.version("ray")
    for objects in rendered.values():
        assert one(objects, "RayService")["spec"]["rayClusterConfig"]["rayVersion"] == ray_version
        assert one(objects, "RayJob")["spec"]["rayClusterSpec"]["rayVersion"] == ray_version


def test_train_job_entrypoint(rendered: dict[str, list[Manifest]]) -> None:
    job = one(rendered["prod"], "RayJob")
    assert job["spec"]["entrypoint"] == "recsys train --workers 4"
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 4


def test_flink_job_module_exists_and_jar_matches_pyflink(
        rendered: dict[str, list[Manifest]]) -> None:
    flink_version = metadata.version("apache-flink")
    for objects in rendered.values():
        job = one(objects, "FlinkDeployment")["spec"]["job"]
        assert job["entryClass"] == "org.apache.flink.client.python.PythonDriver"
        flag, module, *rest = job["args"]
        assert flag == "-pym" and rest == ["--profile", "k8s"]
        assert module_file(module) == REPO_ROOT / "pipelines/recsys_pipelines/stream/job.py", (
            f"Flink job module {module} has no file in the repository")
        assert job["jarURI"].endswith(f"/flink-python-{flink_version}.jar")


def test_prod_stream_upgrades_through_savepoints(rendered: dict[str, list[Manifest]]) -> None:
    spec = one(rendered["prod"], "FlinkDeployment")["spec"]
    assert spec["job"]["upgradeMode"] == "savepoint"
    assert spec["flinkConfiguration"]["execution.checkpointing.savepoint-dir"].startswith("s3://")
    assert spec["flinkConfiguration"]["high-availability.type"] == "kubernetes"


def _images(objects: list[Manifest]) -> Iterator[tuple[str, str]]:
    for obj in objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "FlinkDeployment":
            yield where, obj["spec"]["image"]
        for pod_where, pod in pod_specs(obj):
            for container in containers(pod):
                if "image" in container:
                    yield f"{where} {pod_where} {container['name']}", container["image"]


@pytest.mark.parametrize("name", VALUES_NAMES)
def test_every_image_tag_is_pinned(rendered: dict[str, list[Manifest]], name: str) -> None:
    images = list(_images(rendered[name]))
    assert len(images) >= 5
    for where, image in images:
        reference = image.split("@", 1)[0]
        repository, _, tag = reference.rpartition(":")
        assert repository and "/" not in tag, f"{where}: image {image!r} has no tag"
        assert tag not in {"latest", "stable", "main", ""}, f"{where}: image {image!r} floats"


def _effective(pod: dict[str, Any], container: dict[str, Any], key: str) -> Any:
    return container.get("securityContext", {}).get(key, pod.get("securityContext", {}).get(key))


@pytest.mark.parametrize("name", VALUES_NAMES)
def test_every_container_has_limits_and_runs_as_non_root(
        rendered: dict[str, list[Manifest]], name: str) -> None:
    checked = 0
    for obj in rendered[name]:
        for where, pod in pod_specs(obj):
            label = f"{obj['kind']}/{obj['metadata']['name']} {where}"
            assert pod.get("securityContext", {}).get("runAsNonRoot") is True, label
            for container in containers(pod):
                cname = f"{label} {container['name']}"
                checked += 1
                assert _effective(pod, container, "runAsNonRoot") is True, cname
                assert _effective(pod, container, "runAsUser") not in (0, None), cname
                context = container.get("securityContext", {})
                assert context.get("allowPrivilegeEscalation") is False, cname
                assert context.get("capabilities", {}).get("drop") == ["ALL"], cname
                if obj["kind"] == "FlinkDeployment":
                    continue  # the operator sizes Flink containers from spec.*Manager.resource
                resources = container.get("resources", {})
                for part in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(resources.get(part, {})), f"{cname}: {part}"
        if obj["kind"] == "FlinkDeployment":
            for manager in ("jobManager", "taskManager"):
                assert {"cpu", "memory"} <= set(obj["spec"][manager]["resource"]), manager
        if obj["kind"] == "RayService":
            options = obj["spec"]["rayClusterConfig"]["autoscalerOptions"]
            assert {"cpu", "memory"} <= set(options["resources"]["limits"])
            assert options["securityContext"]["runAsNonRoot"] is True
    assert checked >= 8


@pytest.mark.parametrize("name", VALUES_NAMES)
def test_no_secret_values_in_the_chart(rendered: dict[str, list[Manifest]], name: str) -> None:
    assert not by_kind(rendered[name], "Secret"), "the chart must not ship Secrets"
    for obj in rendered[name]:
        for _, pod in pod_specs(obj):
            for container in containers(pod):
                for env in container.get("env", []):
                    sensitive = any(w in env["name"] for w in ("PASSWORD", "SECRET", "TOKEN",
                                                               "API_KEY", "BACKEND_STORE_URI"))
                    assert not (sensitive and "value" in env), f"{env['name']} is a literal"
    mlflow = one(rendered[name], "Deployment", "recsys-mlflow")["spec"]["template"]["spec"]
    env = {e["name"]: e for e in mlflow["containers"][0]["env"]}
    assert "secretKeyRef" in env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]


@pytest.mark.parametrize("name", VALUES_NAMES)
def test_service_names_match_the_configmap_addresses(
        rendered: dict[str, list[Manifest]], name: str) -> None:
    data = one(rendered[name], "ConfigMap", "recsys-config")["data"]
    services = {s["metadata"]["name"]: s for s in by_kind(rendered[name], "Service")}
    for key in ("RECSYS_REDIS__URL", "RECSYS_MLFLOW__TRACKING_URI"):
        url = urlparse(data[key])
        assert url.hostname in services, f"{key}={data[key]}: no Service {url.hostname}"
        ports = {p["port"] for p in services[url.hostname]["spec"]["ports"]}
        assert url.port in ports, f"{key}={data[key]}: Service ports {ports}"


@pytest.mark.parametrize("name", VALUES_NAMES)
def test_rbac_is_namespaced_and_least(rendered: dict[str, list[Manifest]], name: str) -> None:
    objects = rendered[name]
    assert not by_kind(objects, "ClusterRole") and not by_kind(objects, "ClusterRoleBinding")
    for role in by_kind(objects, "Role"):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"], role
            assert "secrets" not in rule["resources"], role
    accounts = {a["metadata"]["name"]: a for a in by_kind(objects, "ServiceAccount")}
    bound = {b["subjects"][0]["name"] for b in by_kind(objects, "RoleBinding")}
    for obj in objects:
        for where, pod in pod_specs(obj):
            account = pod.get("serviceAccountName") or obj["spec"].get("serviceAccount")
            assert account in accounts, f"{obj['kind']} {where}: no ServiceAccount {account}"
            if account not in bound:
                assert accounts[account]["automountServiceAccountToken"] is False, account
    if flink := [o for o in objects if o["kind"] == "FlinkDeployment"]:
        assert flink[0]["spec"]["serviceAccount"] in bound


@pytest.mark.parametrize("name", VALUES_NAMES)
def test_network_policies_guard_stateful_services(
        rendered: dict[str, list[Manifest]], name: str) -> None:
    policies = {p["metadata"]["name"]: p for p in by_kind(rendered[name], "NetworkPolicy")}
    assert {"recsys-redis", "recsys-mlflow", "recsys-postgresql"} <= set(policies)
    for policy in policies.values():
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        if policy["metadata"]["name"] == "recsys-prefect-worker":
            assert policy["spec"]["ingress"] == []  # no ingress at all
            continue
        sources = policy["spec"]["ingress"][0]["from"]
        assert sources and all(s.get("podSelector", {}).get("matchLabels") for s in sources[:1])
    redis_clients = set()
    for obj in rendered[name]:
        labels = _pod_labels(obj)
        if labels.get("recsys.io/redis-client") == "true":
            redis_clients.add(obj["kind"])
    assert {"RayService", "FlinkDeployment"} <= redis_clients


def _pod_labels(obj: Manifest) -> dict[str, str]:
    spec = obj.get("spec", {})
    if obj["kind"] in WORKLOAD_KINDS:
        return dict(spec["template"]["metadata"].get("labels", {}))
    if obj["kind"] == "RayService":
        head = spec["rayClusterConfig"]["headGroupSpec"]["template"]
        return dict(head.get("metadata", {}).get("labels", {}))
    if obj["kind"] == "FlinkDeployment":
        return dict(spec["podTemplate"].get("metadata", {}).get("labels", {}))
    return {}


def test_default_deployment_options_are_the_k8s_profile(
        rendered: dict[str, list[Manifest]]) -> None:
    """The chart's Serve deployment = serving/deployment.py's rendering of the k8s profile
    (the replica's CPUs aside: direct ingress pins one replica per 1-CPU pod)."""
    from recsys_platform.serving.deployment import DEPLOYMENT_NAME, deployment_options

    expected = deployment_options(load_settings("k8s", secrets=False).serving)
    expected.pop("ray_actor_options")
    config = yaml.safe_load(one(rendered["default"], "RayService")["spec"]["serveConfigV2"])
    deployment = config["applications"][0]["deployments"][0]
    deployment.pop("ray_actor_options", None)
    assert deployment == {"name": DEPLOYMENT_NAME, **expected}
