"""Every rendered object is valid: built-ins against Kubernetes' schemas, custom resources
against the operators' real CRDs (with defaults, int-or-string, preserve-unknown-fields)."""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest

from tests.deploy.conftest import KUBERNETES_VERSION, VALUES_FILES, Manifest
from tests.deploy.crd import CrdSchema

CUSTOM_KINDS = {"RayService", "RayJob", "FlinkDeployment"}


@pytest.mark.parametrize("name", sorted(VALUES_FILES))
def test_builtin_objects_validate_strictly(rendered: dict[str, list[Manifest]],
                                           name: str) -> None:
    builtins = [o for o in rendered[name] if o["kind"] not in CUSTOM_KINDS]
    assert builtins
    for obj in builtins:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {path}: {exc.message}")


@pytest.mark.parametrize("name", sorted(VALUES_FILES))
def test_custom_resources_validate_against_crds(rendered: dict[str, list[Manifest]],
                                                crds: dict[str, CrdSchema], name: str) -> None:
    custom = [o for o in rendered[name] if o["kind"] in CUSTOM_KINDS]
    assert {o["kind"] for o in custom} == CUSTOM_KINDS
    for obj in custom:
        crds[obj["kind"]].validate(obj)


def test_crd_defaults_are_applied(rendered: dict[str, list[Manifest]],
                                  crds: dict[str, CrdSchema]) -> None:
    rayjob = copy.deepcopy(next(o for o in rendered["default"] if o["kind"] == "RayJob"))
    del rayjob["spec"]["submissionMode"]
    defaulted = crds["RayJob"].validate(rayjob)
    assert defaulted["spec"]["submissionMode"] == "K8sJobMode"  # the CRD's default
    assert "submissionMode" not in rayjob["spec"]  # the input is left alone


def test_crd_int_or_string_accepts_both(rendered: dict[str, list[Manifest]],
                                        crds: dict[str, CrdSchema]) -> None:
    service = copy.deepcopy(next(o for o in rendered["default"] if o["kind"] == "RayService"))
    for target in (8000, "serve"):
        service["spec"]["serveService"] = {
            "spec": {"ports": [{"name": "serve", "port": 8000, "targetPort": target}]}}
        defaulted = crds["RayService"].validate(service)
        assert defaulted["spec"]["serveService"]["spec"]["ports"][0]["protocol"] == "TCP"


def test_crd_preserve_unknown_fields_keeps_free_form_maps(
        rendered: dict[str, list[Manifest]], crds: dict[str, CrdSchema]) -> None:
    flink = copy.deepcopy(next(o for o in rendered["default"] if o["kind"] == "FlinkDeployment"))
    flink["spec"]["flinkConfiguration"]["any.flink.option"] = "42"
    crds["FlinkDeployment"].validate(flink)
