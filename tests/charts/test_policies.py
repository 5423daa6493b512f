"""NetworkPolicies, PodDisruptionBudgets, HorizontalPodAutoscalers and the ServiceMonitor."""

from __future__ import annotations

import pytest

from tests.charts.helm import find, names, render

RELEASE_LABELS = {"app.kubernetes.io/name": "tandem", "app.kubernetes.io/instance": "tandem"}


def selector(component: str) -> dict[str, str]:
    return {**RELEASE_LABELS, "app.kubernetes.io/component": component}


def ingress(docs: tuple[dict, ...], component: str) -> list[dict]:
    policy = find(docs, "NetworkPolicy", component)
    assert policy["spec"]["podSelector"] == {"matchLabels": selector(component)}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    return list(policy["spec"]["ingress"])


def tcp(*ports: int) -> list[dict]:
    return [{"port": port, "protocol": "TCP"} for port in ports]


ROUTER_PEER = [{"podSelector": {"matchLabels": selector("router")}}]
PREFILL_PEER = [{"podSelector": {"matchLabels": {**RELEASE_LABELS, "tandem.dev/prefill": "true"}}}]
WORKER_PEER = [{"podSelector": {"matchLabels": {**RELEASE_LABELS, "tandem.dev/worker": "true"}}}]


def test_only_the_router_reaches_worker_grpc_and_only_prefill_reaches_transfer() -> None:
    docs = render(sets=("engine.kvTransport=tcp",))
    assert ingress(docs, "prefill") == [
        {"from": ROUTER_PEER, "ports": tcp(50061)},
        {"ports": tcp(9091)},
    ]
    assert ingress(docs, "decode") == [
        {"from": ROUTER_PEER, "ports": tcp(50062)},
        {"ports": tcp(9092)},
        {"from": PREFILL_PEER, "ports": tcp(50071)},
    ]
    assert ingress(docs, "router") == [{"ports": tcp(50051)}, {"ports": tcp(9090)}]


@pytest.mark.parametrize(
    ("sets", "workers_open"),
    [
        ((), True),  # auto transport, device auto: nccl is possible across hosts
        (("engine.device=cpu",), False),  # auto on CPU is always tcp
        (("engine.kvTransport=tcp",), False),
        (("engine.kvTransport=nccl", "engine.device=cpu"), True),
    ],
)
def test_workers_reach_each_other_only_when_nccl_can_be_chosen(
    sets: tuple[str, ...], workers_open: bool
) -> None:
    docs = render(sets=sets)
    for component in ("prefill", "decode"):
        assert ({"from": WORKER_PEER} in ingress(docs, component)) is workers_open


def test_peer_labels_select_the_intended_pods() -> None:
    docs = render()
    pods = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
    }

    def selected(peer: list[dict]) -> list[str]:
        wanted = peer[0]["podSelector"]["matchLabels"]
        return sorted(
            name for name, labels in pods.items() if all(labels.get(k) == v for k, v in wanted.items())
        )

    assert selected(ROUTER_PEER) == ["tandem-router"]
    assert selected(PREFILL_PEER) == ["tandem-prefill"]
    assert selected(WORKER_PEER) == ["tandem-decode", "tandem-prefill"]
    redis_peer = ingress(docs, "redis")[0]["from"]
    assert selected(redis_peer) == ["tandem-decode", "tandem-prefill", "tandem-redis", "tandem-router"]


def test_only_tandem_pods_reach_redis() -> None:
    assert ingress(render(), "redis") == [
        {"from": [{"podSelector": {"matchLabels": RELEASE_LABELS}}], "ports": tcp(6379)},
    ]
    assert "tandem-redis" not in names(render("multi-host-nccl"), "NetworkPolicy")


def test_nccl_opens_every_port_between_workers_and_configured_sources() -> None:
    docs = render("multi-host-nccl")
    monitoring = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    gateway = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}}}]
    assert ingress(docs, "prefill") == [
        {"from": ROUTER_PEER, "ports": tcp(50061)},
        {"from": monitoring, "ports": tcp(9091)},
        {"from": WORKER_PEER},
    ]
    assert ingress(docs, "decode") == [
        {"from": ROUTER_PEER, "ports": tcp(50062)},
        {"from": monitoring, "ports": tcp(9092)},
        {"from": PREFILL_PEER, "ports": tcp(50071)},
        {"from": WORKER_PEER},
    ]
    assert ingress(docs, "router") == [
        {"from": gateway, "ports": tcp(50051)},
        {"from": monitoring, "ports": tcp(9090)},
    ]


def test_pair_policy_covers_both_containers() -> None:
    docs = render("gpu-pair")
    assert names(docs, "NetworkPolicy") == ["tandem-pair", "tandem-redis", "tandem-router"]
    assert ingress(docs, "pair") == [
        {"from": ROUTER_PEER, "ports": tcp(50061, 50062)},
        {"ports": tcp(9091, 9092)},
        {"from": PREFILL_PEER, "ports": tcp(50071)},
    ]


def test_network_policies_can_be_disabled() -> None:
    assert names(render(sets=("networkPolicy.enabled=false",)), "NetworkPolicy") == []


def test_pdb_per_pool() -> None:
    docs = render()
    assert names(docs, "PodDisruptionBudget") == ["tandem-decode", "tandem-prefill", "tandem-router"]
    for component in ("router", "prefill", "decode"):
        spec = find(docs, "PodDisruptionBudget", component)["spec"]
        assert spec == {"maxUnavailable": 1, "selector": {"matchLabels": selector(component)}}
    nccl = render("multi-host-nccl")
    assert find(nccl, "PodDisruptionBudget", "decode")["spec"]["maxUnavailable"] == "25%"
    pair = find(render("gpu-pair"), "PodDisruptionBudget", "pair")["spec"]
    assert pair == {"minAvailable": 0, "selector": {"matchLabels": selector("pair")}}
    assert names(render(sets=("router.pdb.enabled=false",)), "PodDisruptionBudget") == [
        "tandem-decode",
        "tandem-prefill",
    ]


def test_min_available_wins_over_max_unavailable() -> None:
    spec = find(render(sets=("prefill.pdb.minAvailable=1",)), "PodDisruptionBudget", "prefill")["spec"]
    assert (spec.get("minAvailable"), spec.get("maxUnavailable")) == (1, None)


def test_hpa_only_when_enabled() -> None:
    assert names(render(), "HorizontalPodAutoscaler") == []
    assert names(render("gpu-pair"), "HorizontalPodAutoscaler") == []
    assert names(render("cpu-only"), "HorizontalPodAutoscaler") == ["tandem-decode"]
    assert names(render("multi-host-nccl"), "HorizontalPodAutoscaler") == [
        "tandem-decode",
        "tandem-prefill",
        "tandem-router",
    ]


def pods_metric(name: str, value: str) -> dict:
    return {
        "type": "Pods",
        "pods": {"metric": {"name": name}, "target": {"type": "AverageValue", "averageValue": value}},
    }


def test_hpa_on_custom_metrics() -> None:
    docs = render("multi-host-nccl")
    decode = find(docs, "HorizontalPodAutoscaler", "decode")["spec"]
    assert decode["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "tandem-decode",
    }
    assert (decode["minReplicas"], decode["maxReplicas"]) == (2, 16)
    assert decode["metrics"] == [
        pods_metric("tandem_requests_waiting", "4"),
        pods_metric("tandem_kv_blocks_used", "20000"),
    ]
    prefill = find(docs, "HorizontalPodAutoscaler", "prefill")["spec"]
    assert prefill["metrics"] == [pods_metric("tandem_requests_waiting", "8")]
    assert prefill["behavior"] == {"scaleDown": {"stabilizationWindowSeconds": 300}}
    router = find(docs, "HorizontalPodAutoscaler", "router")["spec"]
    assert router["metrics"] == [
        {
            "type": "Resource",
            "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}},
        }
    ]


@pytest.mark.parametrize(
    ("ci_name", "ports"),
    [("multi-host-nccl", ["metrics"]), ("gpu-pair", ["metrics", "metrics-prefill", "metrics-decode"])],
)
def test_service_monitor_scrapes_every_metrics_port(ci_name: str, ports: list[str]) -> None:
    docs = render(ci_name)
    monitor = find(docs, "ServiceMonitor", "")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"matchNames": ["serving"]}
    assert [e["port"] for e in spec["endpoints"]] == ports
    wanted = spec["selector"]["matchLabels"]
    services = [
        d
        for d in docs
        if d["kind"] == "Service" and all(d["metadata"]["labels"].get(k) == v for k, v in wanted.items())
    ]
    # Every Tandem service but Redis is scraped, and every metrics port is named in an endpoint.
    service_names = sorted(s["metadata"]["name"] for s in services)
    expected = (
        ["tandem-pair", "tandem-router"]
        if ci_name == "gpu-pair"
        else ["tandem-decode", "tandem-prefill", "tandem-router"]
    )
    assert service_names == expected
    scraped = {p["name"] for s in services for p in s["spec"]["ports"] if p["name"].startswith("metrics")}
    assert scraped == set(ports)
    assert names(render(), "ServiceMonitor") == []
