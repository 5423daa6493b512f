"""helm lint --strict, helm template with every representative value file, offline
validation of every manifest against the Kubernetes schemas, and values.schema.json."""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest

from tests.charts.helm import (
    CI_DIR,
    KUBE_VERSION,
    HelmError,
    ci_values,
    find,
    lint,
    notes,
    render,
    require_helm,
    template,
)

CI_NAMES = sorted(path.name.removesuffix("-values.yaml") for path in CI_DIR.glob("*-values.yaml"))
#: Renders checked against the Kubernetes schemas: defaults, pair mode, every ci/ file.
RENDERS = [((), ()), ((), ("mode=pair",)), *[((name,), ()) for name in CI_NAMES]]
#: Custom resources: no schema ships with kubernetes-validate (checked in test_policies.py).
CRD_KINDS = {"ServiceMonitor"}


def test_ci_value_files_cover_the_issue_scenarios() -> None:
    assert CI_NAMES == ["cpu-only", "gpu-pair", "model-image", "multi-host-nccl"]


@pytest.mark.parametrize("name", [None, *CI_NAMES])
def test_lint_strict(name: str | None) -> None:
    report = lint(require_helm(), None if name is None else ci_values(name))
    assert "1 chart(s) linted, 0 chart(s) failed" in report
    assert "[WARNING]" not in report and "[ERROR]" not in report


@pytest.mark.parametrize(("ci_names", "sets"), RENDERS, ids=["default", "pair", *CI_NAMES])
def test_every_manifest_validates_against_kubernetes_schemas(
    ci_names: tuple[str, ...], sets: tuple[str, ...]
) -> None:
    docs = render(*ci_names, sets=sets)
    assert len(docs) >= 10
    checked = 0
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        # strict: unknown fields are errors too; raises ValidationError with the path.
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        checked += 1
    assert checked == len([d for d in docs if d["kind"] not in CRD_KINDS])


def test_strict_validation_catches_a_broken_manifest() -> None:
    deployment = copy.deepcopy(find(render(), "Deployment", "decode"))
    kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 1}}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)
    deployment = copy.deepcopy(find(render(), "Deployment", "decode"))
    deployment["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)


def test_default_render_has_the_disaggregated_stack() -> None:
    kinds = sorted((doc["kind"], doc["metadata"]["name"]) for doc in render())
    assert kinds == [
        ("ConfigMap", "tandem-config"),
        ("Deployment", "tandem-decode"),
        ("Deployment", "tandem-prefill"),
        ("Deployment", "tandem-router"),
        ("NetworkPolicy", "tandem-decode"),
        ("NetworkPolicy", "tandem-prefill"),
        ("NetworkPolicy", "tandem-redis"),
        ("NetworkPolicy", "tandem-router"),
        ("PodDisruptionBudget", "tandem-decode"),
        ("PodDisruptionBudget", "tandem-prefill"),
        ("PodDisruptionBudget", "tandem-router"),
        ("Service", "tandem-decode"),
        ("Service", "tandem-prefill"),
        ("Service", "tandem-redis"),
        ("Service", "tandem-router"),
        ("ServiceAccount", "tandem"),
        ("StatefulSet", "tandem-redis"),
    ]


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("router.replicaCount=two",), "at '/router/replicaCount': got string, want integer"),
        (("engine.kvCacheMemoryGb=lots",), "at '/engine/kvCacheMemoryGb': got string, want number"),
        (("prefill.gpus=true",), "at '/prefill/gpus': got boolean, want integer"),
        (("bogus=1",), "additional properties 'bogus' not allowed"),
        (("router.bogus=1",), "additional properties 'bogus' not allowed"),
        (("decode.probes.startup.bogus=1",), "additional properties 'bogus' not allowed"),
        (("engine.kvTransport=rdma",), "/engine/kvTransport"),
        (("mode=both",), "/mode"),
        (("decode.ports.transfer=70000",), "/decode/ports/transfer"),
    ],
)
def test_schema_rejects_wrong_types_and_unknown_keys(sets: tuple[str, ...], message: str) -> None:
    with pytest.raises(HelmError, match="values don't meet the specifications of the schema") as err:
        template(require_helm(), sets=sets)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("model.source=pvc",), 'model.source is "pvc": set model.pvc.claimName'),
        (("model.source=hostPath",), 'model.source is "hostPath": set model.hostPath.path'),
        (("model.source=image",), 'model.source is "image": set model.image.repository'),
        (("redis.internal.enabled=false",), "redis.internal.enabled is false: set redis.external.host"),
        (("redis.tls=true",), "redis.tls needs an external Redis"),
        (
            ("decode.autoscaling.enabled=true", "decode.autoscaling.kvBlocksUsed=null"),
            "decode.autoscaling.enabled: set at least one of",
        ),
        (
            ("router.autoscaling.enabled=true", "router.autoscaling.minReplicas=5"),
            "router.autoscaling: minReplicas is larger than maxReplicas",
        ),
        (("mode=pair", "decode.ports.grpc=50061"), "prefill.ports and decode.ports must all differ"),
    ],
)
def test_inconsistent_values_fail_with_a_clear_message(sets: tuple[str, ...], message: str) -> None:
    with pytest.raises(HelmError) as err:
        template(require_helm(), sets=sets)
    assert message in str(err.value)


def test_notes_tell_how_to_call_the_router() -> None:
    text = notes(require_helm())
    assert "kubectl -n serving port-forward svc/tandem-router 50051:50051" in text
    assert 'tandem generate "The capital of France is" --target 127.0.0.1:50051' in text
    assert "tandem-router.serving.svc:50051" in text
    assert "--advertise-host" not in text
    lb = notes(require_helm(), sets=("router.service.type=LoadBalancer", "network.addressMode=advertise"))
    assert "kubectl -n serving get svc tandem-router" in lb
    assert "port-forward" not in lb
    assert "--advertise-host" not in lb  # the CLI has the flag: no caveat to print
