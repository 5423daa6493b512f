"""The rendered Deployments, StatefulSet, ConfigMap and Services: flags, probes, resources,
environment, security, volumes, selectors, and pair mode."""

from __future__ import annotations

import re
from typing import Any

import pytest

from cli.main import build_parser
from cli.options import worker_config_from_args
from engine.worker_config import BUNDLED_MODEL_DIR
from tests.charts.helm import find, names, render

POD_FIELD_ENV = {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace", "POD_IP": "status.podIP"}


def pod_spec(docs: tuple[dict, ...], component: str, kind: str = "Deployment") -> dict:
    return find(docs, kind, component)["spec"]["template"]["spec"]


def container(docs: tuple[dict, ...], component: str, name: str | None = None) -> dict:
    containers = pod_spec(docs, component)["containers"]
    return next(c for c in containers if c["name"] == (name or component))


def env_of(c: dict) -> dict[str, Any]:
    """Container env as {name: value or valueFrom}."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


def flags(c: dict) -> dict[str, str]:
    """``--flag=value`` arguments as a dict (the subcommand under "")."""
    out = {"": c["args"][0]}
    for arg in c["args"][1:]:
        key, _, value = arg.partition("=")
        out[key] = value
    return out


def test_worker_flags_use_pod_identity_and_configmap_settings() -> None:
    decode = flags(container(render(), "decode"))
    assert decode == {
        "": "decode",
        "--model": "$(TANDEM_MODEL)",
        "--device": "$(TANDEM_DEVICE)",
        "--dtype": "$(TANDEM_DTYPE)",
        "--block-size": "$(TANDEM_BLOCK_SIZE)",
        "--kv-cache-memory-gb": "$(TANDEM_KV_CACHE_MEMORY_GB)",
        "--host": "$(POD_IP)",
        "--port": "50062",
        "--metrics-port": "9092",
        "--transfer-port": "50071",
        "--redis-url": "$(TANDEM_REDIS_URL)",
        "--redis-prefix": "$(TANDEM_REDIS_PREFIX)",
        "--worker-id": "$(POD_NAME)",
        "--kv-transport": "$(TANDEM_KV_TRANSPORT)",
        "--lease-ms": "$(TANDEM_LEASE_MS)",
        "--max-num-seqs": "$(TANDEM_MAX_NUM_SEQS)",
        "--max-num-batched-tokens": "$(TANDEM_MAX_NUM_BATCHED_TOKENS)",
        "--max-queue-len": "$(TANDEM_MAX_QUEUE_LEN)",
        "--seed": "$(TANDEM_SEED)",
    }
    prefill = flags(container(render(), "prefill"))
    assert (prefill[""], prefill["--port"], prefill["--metrics-port"]) == ("prefill", "50061", "9091")
    assert "--transfer-port" not in prefill


def test_router_flags() -> None:
    router = container(render(), "router")
    assert router["command"] == ["tandem"]
    assert flags(router) == {
        "": "router",
        "--model": "$(TANDEM_MODEL)",
        "--host": "0.0.0.0",
        "--port": "50051",
        "--metrics-port": "9090",
        "--redis-url": "$(TANDEM_REDIS_URL)",
        "--redis-prefix": "$(TANDEM_REDIS_PREFIX)",
        "--routing": "$(TANDEM_ROUTING)",
        "--max-queue-len": "$(TANDEM_ROUTER_MAX_QUEUE_LEN)",
        "--lease-ms": "$(TANDEM_LEASE_MS)",
    }


def test_every_flag_variable_is_defined_in_the_configmap_or_env() -> None:
    docs = render("gpu-pair")
    data = find(docs, "ConfigMap", "config")["data"]
    for component, name in [("router", "router"), ("pair", "prefill"), ("pair", "decode")]:
        c = container(docs, component, name)
        assert c["envFrom"] == [{"configMapRef": {"name": "tandem-config"}}]
        defined = set(data) | set(env_of(c))
        for arg in c["args"]:
            if "$(" in arg:
                variable = arg.split("$(", 1)[1].split(")", 1)[0]
                assert variable in defined, (name, arg)


def test_configmap_holds_model_and_engine_settings() -> None:
    assert find(render(), "ConfigMap", "config")["data"] == {
        "TANDEM_MODEL": "/opt/tandem/app/models/tandem-tiny",
        "TANDEM_DEVICE": "auto",
        "TANDEM_DTYPE": "auto",
        "TANDEM_BLOCK_SIZE": "16",
        "TANDEM_KV_CACHE_MEMORY_GB": "0.25",
        "TANDEM_KV_TRANSPORT": "auto",
        "TANDEM_LEASE_MS": "30000",
        "TANDEM_MAX_NUM_SEQS": "64",
        "TANDEM_MAX_NUM_BATCHED_TOKENS": "2048",
        "TANDEM_MAX_QUEUE_LEN": "256",
        "TANDEM_SEED": "0",
        "TANDEM_REDIS_PREFIX": "tandem",
        "TANDEM_ROUTING": "least-loaded",
        "TANDEM_ROUTER_MAX_QUEUE_LEN": "1024",
    }
    data = find(render("multi-host-nccl"), "ConfigMap", "config")["data"]
    assert (data["TANDEM_MODEL"], data["TANDEM_KV_TRANSPORT"], data["TANDEM_MAX_NUM_BATCHED_TOKENS"]) == (
        "/models/Llama-3.1-8B-Instruct",
        "nccl",
        "8192",
    )


def test_optional_engine_flags_appear_only_when_set() -> None:
    docs = render(sets=("engine.numKvBlocks=4096", "model.maxModelLen=2048"))
    decode = flags(container(docs, "decode"))
    assert decode["--num-kv-blocks"] == "$(TANDEM_NUM_KV_BLOCKS)"
    assert "--kv-cache-memory-gb" not in decode
    assert decode["--max-model-len"] == "$(TANDEM_MAX_MODEL_LEN)"
    assert flags(container(docs, "router"))["--max-model-len"] == "$(TANDEM_MAX_MODEL_LEN)"
    data = find(docs, "ConfigMap", "config")["data"]
    assert (data["TANDEM_NUM_KV_BLOCKS"], data["TANDEM_MAX_MODEL_LEN"]) == ("4096", "2048")


def test_advertise_mode_binds_wildcard_and_advertises_pod_ip() -> None:
    decode = flags(container(render(sets=("network.addressMode=advertise",)), "decode"))
    assert (decode["--host"], decode["--advertise-host"]) == ("0.0.0.0", "$(POD_IP)")
    assert "--advertise-host" not in flags(container(render(), "decode"))


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_advertise_mode_args_parse_with_the_cli(role: str) -> None:
    """The worker's rendered args, with the kubelet's $(VAR) expansion done, parse with ``tandem``."""
    docs = render(sets=("network.addressMode=advertise",))
    env = {
        **find(docs, "ConfigMap", "config")["data"],
        "TANDEM_MODEL": str(BUNDLED_MODEL_DIR),  # the image's path, here
        "TANDEM_REDIS_URL": "redis://redis:6379/0",
        "POD_IP": "10.0.0.9",
        "POD_NAME": "pod-0",
    }
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in container(docs, role)["args"]]
    config = worker_config_from_args(build_parser().parse_args(args), role)  # type: ignore[arg-type]
    assert (config.host, config.advertise_host) == ("0.0.0.0", "10.0.0.9")
    assert config.advertised("0.0.0.0:7001") == "10.0.0.9:7001"


@pytest.mark.parametrize(
    ("ci_names", "component", "name", "port"),
    [
        ((), "router", "router", 50051),
        ((), "prefill", "prefill", 50061),
        ((), "decode", "decode", 50062),
        (("gpu-pair",), "pair", "prefill", 50061),
        (("gpu-pair",), "pair", "decode", 50062),
    ],
)
def test_native_grpc_probes(ci_names: tuple[str, ...], component: str, name: str, port: int) -> None:
    c = container(render(*ci_names), component, name)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": port}, probe
    if component != "router":  # model loading: 15 minutes before the first failure counts
        assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] == 900


def test_graceful_termination() -> None:
    docs = render()
    for component, grace in [("router", 30), ("prefill", 60), ("decode", 120)]:
        assert pod_spec(docs, component)["terminationGracePeriodSeconds"] == grace
        assert container(docs, component)["lifecycle"] == {"preStop": {"exec": {"command": ["sleep", "5"]}}}
    assert "lifecycle" not in container(render(sets=("decode.preStopSleepSeconds=0",)), "decode")


def test_gpu_requests_and_resources() -> None:
    docs = render()
    assert container(docs, "decode")["resources"] == {
        "requests": {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": 1},
        "limits": {"memory": "16Gi", "nvidia.com/gpu": 1},
    }
    assert container(docs, "router")["resources"] == {
        "requests": {"cpu": "500m", "memory": "512Mi"},
        "limits": {"memory": "2Gi"},
    }
    cpu = render("cpu-only")
    assert container(cpu, "prefill")["resources"] == {
        "requests": {"cpu": "1", "memory": "1Gi"},
        "limits": {"memory": "2Gi"},
    }
    assert (
        container(render(sets=("prefill.gpus=4",)), "prefill")["resources"]["limits"]["nvidia.com/gpu"] == 4
    )


def test_scheduling_per_pool() -> None:
    docs = render("multi-host-nccl")
    spec = pod_spec(docs, "prefill")
    assert spec["nodeSelector"] == {"node.kubernetes.io/instance-type": "p5.48xlarge"}
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert spec["runtimeClassName"] == "nvidia"
    # labelSelector filled in with the pool's selector labels.
    assert spec["topologySpreadConstraints"] == [
        {
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "DoNotSchedule",
            "labelSelector": {
                "matchLabels": {
                    "app.kubernetes.io/name": "tandem",
                    "app.kubernetes.io/instance": "tandem",
                    "app.kubernetes.io/component": "prefill",
                }
            },
        }
    ]
    decode = pod_spec(docs, "decode")
    assert "topologySpreadConstraints" not in decode
    term = decode["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    assert term["podAffinityTerm"]["labelSelector"] == {
        "matchLabels": {"app.kubernetes.io/component": "decode"}
    }
    assert "nodeSelector" not in pod_spec(docs, "router")


def test_replicas_per_pool_and_omitted_under_autoscaling() -> None:
    docs = render("cpu-only")
    assert find(docs, "Deployment", "prefill")["spec"]["replicas"] == 2
    assert find(docs, "Deployment", "router")["spec"]["replicas"] == 1
    assert "replicas" not in find(docs, "Deployment", "decode")["spec"]  # the HPA owns it


def test_redis_url_and_password_from_secret() -> None:
    env = env_of(container(render("multi-host-nccl"), "decode"))
    assert env["REDIS_PASSWORD"] == {"secretKeyRef": {"name": "tandem-redis", "key": "password"}}
    assert env["TANDEM_REDIS_URL"] == "rediss://:$(REDIS_PASSWORD)@redis.data.svc.cluster.local:6380/0"
    names_in_order = [e["name"] for e in container(render("multi-host-nccl"), "decode")["env"]]
    assert names_in_order.index("REDIS_PASSWORD") < names_in_order.index("TANDEM_REDIS_URL")

    plain = env_of(container(render(), "router"))
    assert plain["TANDEM_REDIS_URL"] == "redis://tandem-redis:6379/0"
    assert "REDIS_PASSWORD" not in plain

    user = env_of(
        container(
            render("multi-host-nccl", sets=("redis.auth.username=tandem", "redis.db=3")),
            "router",
        )
    )
    assert user["TANDEM_REDIS_URL"] == "rediss://tandem:$(REDIS_PASSWORD)@redis.data.svc.cluster.local:6380/3"


def test_external_redis_renders_no_redis_workload() -> None:
    docs = render("multi-host-nccl")
    assert "tandem-redis" not in names(docs, "StatefulSet") + names(docs, "Service") + names(docs, "Secret")


def test_internal_redis_with_generated_password() -> None:
    docs = render("model-image")
    secret = find(docs, "Secret", "redis")
    assert list(secret["data"]) == ["redis-password"]
    assert len(secret["data"]["redis-password"]) == 44  # base64 of 32 characters
    redis = find(docs, "StatefulSet", "redis")
    c = redis["spec"]["template"]["spec"]["containers"][0]
    assert c["args"][-2:] == ["--requirepass", "$(REDIS_PASSWORD)"]
    assert env_of(c)["REDIS_PASSWORD"] == {"secretKeyRef": {"name": "tandem-redis", "key": "redis-password"}}
    assert redis["spec"]["volumeClaimTemplates"][0]["spec"]["resources"] == {"requests": {"storage": "2Gi"}}
    assert (
        env_of(container(docs, "prefill"))["TANDEM_REDIS_URL"]
        == "redis://:$(REDIS_PASSWORD)@tandem-redis:6379/0"
    )


def test_given_password_is_stored_in_the_secret() -> None:
    docs = render(sets=("redis.auth.enabled=true", "redis.auth.password=s3cret"))
    assert find(docs, "Secret", "redis")["data"] == {"redis-password": "czNjcmV0"}


def test_otel_environment() -> None:
    env = env_of(container(render("multi-host-nccl"), "prefill"))
    otel = {k: v for k, v in env.items() if k.startswith("OTEL_")}
    assert otel == {
        "OTEL_SERVICE_NAME": "tandem-prefill",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector.observability:4318",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.05",
        "OTEL_RESOURCE_ATTRIBUTES": "k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE),"
        "service.instance.id=$(POD_NAME),service.namespace=tandem,tandem.role=prefill",
    }
    pair = env_of(container(render("gpu-pair"), "pair", "decode"))
    assert pair["OTEL_SERVICE_NAME"] == "tandem-decode"
    assert pair["OTEL_RESOURCE_ATTRIBUTES"].endswith(",tandem.role=decode,deployment.environment=lab")
    assert not [k for k in env_of(container(render(), "router")) if k.startswith("OTEL_")]


@pytest.mark.parametrize("component", ["router", "prefill", "decode"])
def test_downward_api_env(component: str) -> None:
    env = env_of(container(render(), component))
    for name, path in POD_FIELD_ENV.items():
        assert env[name] == {"fieldRef": {"fieldPath": path}}


@pytest.mark.parametrize(
    ("ci_names", "kind", "component"),
    [
        ((), "Deployment", "router"),
        ((), "Deployment", "prefill"),
        ((), "Deployment", "decode"),
        ((), "StatefulSet", "redis"),
        (("gpu-pair",), "Deployment", "pair"),
        (("model-image",), "Deployment", "router"),
    ],
)
def test_pods_are_non_root_and_read_only(ci_names: tuple[str, ...], kind: str, component: str) -> None:
    spec = pod_spec(render(*ci_names), component, kind)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] > 0
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    for c in spec["containers"] + spec.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]}
        writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
        assert writable <= {"/tmp", "/dev/shm", "/data", "/models"}, writable


def test_volumes_tmp_shm_and_bundled_model() -> None:
    spec = pod_spec(render(), "decode")
    assert spec["volumes"] == [
        {"name": "tmp", "emptyDir": {"sizeLimit": "2Gi"}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
    ]
    assert spec["containers"][0]["volumeMounts"] == [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    assert [v["name"] for v in pod_spec(render("cpu-only"), "decode")["volumes"]] == ["tmp"]


def test_model_from_pvc_and_hostpath() -> None:
    docs = render("multi-host-nccl")
    for component in ("router", "prefill", "decode"):
        spec = pod_spec(docs, component)
        assert {
            "name": "model",
            "persistentVolumeClaim": {"claimName": "llm-models", "readOnly": True},
        } in spec["volumes"]
        assert {"name": "model", "mountPath": "/models", "readOnly": True} in spec["containers"][0][
            "volumeMounts"
        ]
    pair = pod_spec(render("gpu-pair"), "pair")
    assert {"name": "model", "hostPath": {"path": "/var/lib/tandem/models", "type": "Directory"}} in pair[
        "volumes"
    ]


def test_model_copied_from_image_by_init_container() -> None:
    docs = render("model-image")
    spec = pod_spec(docs, "prefill")
    (init,) = spec["initContainers"]
    assert init["image"] == "registry.example.com/models/tandem-tiny:1"
    assert init["command"] == ["sh", "-c", "cp -R /model/. /models/"]
    assert init["volumeMounts"] == [{"name": "model", "mountPath": "/models"}]
    assert {"name": "model", "emptyDir": {"sizeLimit": "2Gi"}} in spec["volumes"]
    assert find(docs, "ConfigMap", "config")["data"]["TANDEM_MODEL"] == "/models"
    assert "initContainers" not in pod_spec(render(), "prefill")


def test_pair_mode_puts_prefill_and_decode_in_one_pod() -> None:
    docs = render("gpu-pair")
    assert names(docs, "Deployment") == ["tandem-pair", "tandem-router"]
    spec = pod_spec(docs, "pair")
    assert [c["name"] for c in spec["containers"]] == ["prefill", "decode"]
    assert spec["shareProcessNamespace"] is True
    assert "hostIPC" not in spec  # containers of a pod share its IPC namespace already
    prefill, decode = (flags(c) for c in spec["containers"])
    assert (prefill["--worker-id"], decode["--worker-id"]) == ("$(POD_NAME)-prefill", "$(POD_NAME)-decode")
    assert (prefill["--device"], decode["--device"]) == ("cuda:0", "cuda:1")
    assert (prefill["--port"], decode["--port"], decode["--transfer-port"]) == ("50061", "50062", "50071")
    assert find(docs, "ConfigMap", "config")["data"]["TANDEM_KV_TRANSPORT"] == "cuda_ipc"
    # One DRA claim shared by both containers, so each sees both GPUs.
    assert spec["resourceClaims"] == [{"name": "gpus", "resourceClaimTemplateName": "tandem-pair-gpus"}]
    for c in spec["containers"]:
        assert c["resources"]["claims"] == [{"name": "gpus"}]
        assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    template = find(docs, "ResourceClaimTemplate", "pair-gpus")
    assert template["spec"]["spec"]["devices"]["requests"] == [
        {
            "name": "gpus",
            "exactly": {"deviceClassName": "gpu.nvidia.com", "allocationMode": "ExactCount", "count": 2},
        }
    ]
    ports = [p["name"] for c in spec["containers"] for p in c["ports"]]
    assert ports == ["grpc-prefill", "metrics-prefill", "grpc-decode", "metrics-decode", "transfer"]


def test_pair_mode_without_claim_requests_gpus_per_container() -> None:
    spec = pod_spec(render(sets=("mode=pair",)), "pair")
    assert [c["resources"]["limits"]["nvidia.com/gpu"] for c in spec["containers"]] == [1, 1]
    assert "resourceClaims" not in spec


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("ci_names", [(), ("gpu-pair",), ("multi-host-nccl",)])
def test_selectors_match_pod_labels_and_only_their_pool(ci_names: tuple[str, ...]) -> None:
    docs = render(*ci_names)
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in workloads}
    for workload in workloads:
        selector = workload["spec"]["selector"]["matchLabels"]
        matched = [name for name, labels in pods.items() if labels_match(selector, labels)]
        assert matched == [workload["metadata"]["name"]]


@pytest.mark.parametrize("ci_names", [(), ("gpu-pair",)])
def test_services_select_the_right_pods_and_ports(ci_names: tuple[str, ...]) -> None:
    docs = render(*ci_names)
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    for service in (d for d in docs if d["kind"] == "Service"):
        selected = [
            w
            for w in workloads
            if labels_match(service["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
        ]
        assert [w["metadata"]["name"] for w in selected] == [service["metadata"]["name"]]
        container_ports = {
            p["name"]: p["containerPort"]
            for c in selected[0]["spec"]["template"]["spec"]["containers"]
            for p in c["ports"]
        }
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in container_ports, (service["metadata"]["name"], port)


def test_service_types() -> None:
    docs = render()
    router = find(docs, "Service", "router")["spec"]
    assert router["type"] == "ClusterIP"
    assert [(p["name"], p["port"]) for p in router["ports"]] == [("grpc", 50051), ("metrics", 9090)]
    for component in ("prefill", "decode"):
        assert find(docs, "Service", component)["spec"]["clusterIP"] == "None"
    assert [p["port"] for p in find(docs, "Service", "decode")["spec"]["ports"]] == [50062, 9092, 50071]
    lb = find(render("multi-host-nccl"), "Service", "router")
    assert lb["spec"]["type"] == "LoadBalancer"
    assert lb["metadata"]["annotations"] == {"service.beta.kubernetes.io/aws-load-balancer-internal": "true"}


def test_image_tag_follows_variant() -> None:
    assert container(render(), "router")["image"] == "ghcr.io/tandem-serving/tandem:0.1.0-cuda"
    assert container(render("cpu-only"), "decode")["image"] == "ghcr.io/tandem-serving/tandem:0.1.0-cpu"
    assert (
        container(render(sets=("image.tag=dev",)), "decode")["image"] == "ghcr.io/tandem-serving/tandem:dev"
    )


def test_config_checksum_changes_with_the_configmap() -> None:
    def checksum(docs: tuple[dict, ...]) -> str:
        return str(
            find(docs, "Deployment", "decode")["spec"]["template"]["metadata"]["annotations"][
                "checksum/config"
            ]
        )

    assert checksum(render()) != checksum(render(sets=("engine.maxNumSeqs=32",)))
    assert len(checksum(render())) == 64
