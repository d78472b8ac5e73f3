"""Every workload has a NetworkPolicy, each client only the labels it needs, roots read-only,
and serving's admin endpoints apart from its public port.

Before: NetworkPolicies existed only for Redis, MLflow and PostgreSQL; every Ray pod carried
all three client labels; the Ray head's dashboard (its Jobs API runs arbitrary code), serving,
Feast and the Prefect worker took ingress from anywhere; Ray pods had writable roots; /docs
and /metrics answered on the public port.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.deploy.conftest import VALUES_FILES, Manifest, by_kind, one
from tests.deploy.test_semantics import containers, pod_specs

VALUES_NAMES = sorted(VALUES_FILES)
CLIENT = "recsys.io/{}-client"


def _policies(objects: list[Manifest]) -> dict[str, Manifest]:
    return {p["metadata"]["name"]: p for p in by_kind(objects, "NetworkPolicy")}


def _pod_templates(obj: Manifest) -> list[dict[str, Any]]:
    spec = obj.get("spec", {})
    if obj["kind"] == "RayService":
        cluster = spec["rayClusterConfig"]
    elif obj["kind"] == "RayJob":
        cluster = spec["rayClusterSpec"]
    else:
        return []
    return [cluster["headGroupSpec"]["template"],
            *[g["template"] for g in cluster.get("workerGroupSpecs", [])]]


def _ports(rule: dict[str, Any]) -> set[int]:
    return {p["port"] for p in rule.get("ports", [])}


@pytest.mark.parametrize("name", VALUES_NAMES)
def test_ray_serving_feast_and_the_prefect_worker_have_policies(
        rendered: dict[str, list[Manifest]], name: str) -> None:
    policies = _policies(rendered[name])
    assert {"recsys-ray-serve", "recsys-ray-train", "recsys-prefect-worker"} <= set(policies)
    if by_kind(rendered[name], "Deployment") and any(
            d["metadata"]["name"] == "recsys-feast" for d in by_kind(rendered[name], "Deployment")):
        feast = policies["recsys-feast"]["spec"]["ingress"]
        assert feast[0]["from"] == [{"podSelector": {"matchLabels": {
            CLIENT.format("feast"): "true"}}}]
    assert policies["recsys-prefect-worker"]["spec"]["ingress"] == []


@pytest.mark.parametrize("name", VALUES_NAMES)
def test_the_ray_dashboard_is_reachable_only_from_its_cluster_and_the_operator(
        rendered: dict[str, list[Manifest]], name: str) -> None:
    for policy_name in ("recsys-ray-serve", "recsys-ray-train"):
        rules = _policies(rendered[name])[policy_name]["spec"]["ingress"]
        cluster = policy_name.removeprefix("recsys-ray-")
        for rule in rules:
            selectors = [s.get("podSelector", {}).get("matchLabels", {}) for s in rule["from"]]
            if {"recsys.io/ray-cluster": cluster} in selectors:
                assert len(rule["from"]) == 1  # intra-cluster: only the cluster's own pods
                continue
            assert rule.get("ports"), rule  # everyone else: named ports only
            if 8265 in _ports(rule):  # the dashboard / Jobs API
                for source in rule["from"]:
                    labels = source.get("podSelector", {}).get("matchLabels", {})
                    assert labels in ({"app.kubernetes.io/name": "kuberay-operator"},
                                      {"recsys.io/ray-train-client": "true"}), source
    serve_rules = _policies(rendered[name])["recsys-ray-serve"]["spec"]["ingress"]
    public = [r for r in serve_rules if {"podSelector": {"matchLabels": {
        CLIENT.format("serve"): "true"}}} in r["from"]]
    assert len(public) == 1 and _ports(public[0]) == {8000, 30000}  # HTTP only, no admin port


@pytest.mark.parametrize("name", VALUES_NAMES)
def test_each_workload_carries_only_the_client_labels_it_needs(
        rendered: dict[str, list[Manifest]], name: str) -> None:
    expected = {"RayService": {"redis", "mlflow", "postgresql"},
                "RayJob": {"mlflow", "postgresql"},
                "FlinkDeployment": {"redis", "postgresql"}}
    seen = set()
    for obj in rendered[name]:
        templates = _pod_templates(obj)
        if obj["kind"] == "FlinkDeployment":
            templates = [obj["spec"]["podTemplate"]]
        for template in templates:
            labels = template.get("metadata", {}).get("labels", {})
            clients = {k.removeprefix("recsys.io/").removesuffix("-client") for k in labels
                       if k.endswith("-client")}
            assert clients == expected[obj["kind"]], (obj["kind"], labels)
            seen.add(obj["kind"])
    assert seen == set(expected)


@pytest.mark.parametrize("name", VALUES_NAMES)
def test_root_file_systems_are_read_only_except_flinks(
        rendered: dict[str, list[Manifest]], name: str) -> None:
    checked = 0
    for obj in rendered[name]:
        for where, pod in pod_specs(obj):
            for container in containers(pod):
                if obj["kind"] == "FlinkDeployment":
                    continue  # the Flink image writes its logs and configuration in place
                context = container.get("securityContext", {})
                assert context.get("readOnlyRootFilesystem") is True, (obj["kind"], where)
                checked += 1
    assert checked >= 8
    ray = one(rendered[name], "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]
    mounts = {m["mountPath"] for m in ray["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert {"/tmp", "/data"} <= mounts  # Ray's session, HOME and the platform's data_dir


@pytest.mark.parametrize("name", VALUES_NAMES)
def test_serving_admin_endpoints_are_on_their_own_port(
        rendered: dict[str, list[Manifest]], name: str) -> None:
    service = one(rendered[name], "RayService")["spec"]["rayClusterConfig"]
    worker = service["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in worker["env"]}
    assert env["RECSYS_SERVING__ADMIN_PORT"] == "9090"
    assert {"name": "admin", "containerPort": 9090} in worker["ports"]
    direct = one(rendered[name], "Service", "recsys-serve-direct")
    assert [p["port"] for p in direct["spec"]["ports"]] == [30000]  # public: no admin port
    admin = [r for r in _policies(rendered[name])["recsys-ray-serve"]["spec"]["ingress"]
             if 9090 in _ports(r)]
    if name == "prod":
        assert admin and admin[0]["from"][0]["namespaceSelector"]["matchLabels"] == {
            "kubernetes.io/metadata.name": "monitoring"}
    else:
        assert admin == []  # nobody outside the cluster until adminFrom names a scraper
