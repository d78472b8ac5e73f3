"""The validators can fail: a wrong enum, an unknown key and a wrong type are each rejected,
by the CRD schemas, by Kubernetes' own schemas and by the chart's values.schema.json."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from tests.deploy.conftest import KUBERNETES_VERSION, Manifest, helm_run, one
from tests.deploy.crd import CrdSchema, CrdValidationError

Mutation = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Mutation:
    def mutate(obj: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        node: Any = obj
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        node[leaf] = value
    return mutate


CRD_CASES = {
    "flink wrong enum": ("FlinkDeployment", _set("spec.job.upgradeMode", "on-friday"),
                         "upgradeMode"),
    "flink wrong flinkVersion": ("FlinkDeployment", _set("spec.flinkVersion", "v2_3"),
                                 "flinkVersion"),
    "rayservice unknown key": ("RayService", _set("spec.serveConfigv2", "applications: []"),
                               "serveConfigv2"),
    "rayservice unknown key in pod": (
        "RayService",
        _set("spec.rayClusterConfig.headGroupSpec.template.spec.containers.0.resourcez", {}),
        "resourcez"),
    "rayjob wrong type": ("RayJob", _set("spec.shutdownAfterJobFinishes", "yes"),
                          "shutdownAfterJobFinishes"),
    "rayjob wrong type replicas": (
        "RayJob", _set("spec.rayClusterSpec.workerGroupSpecs.0.replicas", "two"), "replicas"),
}


@pytest.mark.parametrize("case", sorted(CRD_CASES))
def test_crd_validation_rejects(rendered: dict[str, list[Manifest]],
                                crds: dict[str, CrdSchema], case: str) -> None:
    kind, mutate, where = CRD_CASES[case]
    obj = copy.deepcopy(one(rendered["prod"], kind))
    crds[kind].validate(obj)  # valid before the mutation
    mutate(obj)
    with pytest.raises(CrdValidationError, match=where):
        crds[kind].validate(obj)


BUILTIN_CASES = {
    "unknown key": _set("spec.template.spec.containers.0.resourcez", {}),
    "unknown top-level key": _set("spec.replicaz", 2),
    "wrong type": _set("spec.replicas", "two"),
}


@pytest.mark.parametrize("case", sorted(BUILTIN_CASES))
def test_builtin_validation_rejects(rendered: dict[str, list[Manifest]], case: str) -> None:
    obj = copy.deepcopy(one(rendered["default"], "Deployment", "recsys-mlflow"))
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    BUILTIN_CASES[case](obj)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


VALUES_CASES = {
    "wrong enum": (["--set", "stream.upgradeMode=on-friday"], "upgradeMode"),
    "unknown key": (["--set", "mlflow.replicaz=2"], "replicaz"),
    "wrong type": (["--set-string", "serving.workers.replicas=two"], "replicas"),
    "floating image tag": (["--set", "images.platform.tag=latest"], "tag"),
}


@pytest.mark.parametrize("case", sorted(VALUES_CASES))
def test_values_schema_rejects(helm: Path, case: str) -> None:
    args, where = VALUES_CASES[case]
    for command in (["template", "recsys", "."], ["lint", "--strict", "."]):
        done = helm_run(helm, *command, *args)
        assert done.returncode != 0, f"helm {command[0]} accepted {args}"
        assert where in done.stdout + done.stderr
