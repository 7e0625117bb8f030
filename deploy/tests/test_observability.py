"""Scraping and dashboards: the azure overlay's PodMonitor (Azure Managed Prometheus,
azmonitoring.coreos.com/v1, applied on its own from overlays/azure/monitoring) and the
NetworkPolicy that lets the scraper in; the minikube overlay's prometheus.io annotations; the
Grafana dashboard's shape. (That the dashboard's queries read only series the services expose, and
parse as PromQL, is checked against the running services in tests/tests/api/poll.rs.)"""

from __future__ import annotations

import json

import pytest

import deploylib as dl

# The fields of azmonitoring.coreos.com/v1 PodMonitor used here, as the add-on's CRD types them
# (the same as monitoring.coreos.com/v1); anything else in spec or an endpoint is a mistake here.
PODMONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "azmonitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name", "namespace"],
            "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}, "labels": {"type": "object"}},
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "podMetricsEndpoints"],
            "properties": {
                "selector": {"type": "object"},
                "namespaceSelector": {"type": "object"},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port", "path"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": "^[0-9]+[smh]$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+[smh]$"},
                        },
                    },
                },
            },
        },
    },
}


@pytest.fixture(scope="module")
def monitoring(kubectl: str) -> dl.Manifests:
    return dl.Manifests("azure/monitoring", dl.render(kubectl, "azure/monitoring"))


@pytest.fixture(scope="module")
def azure(render) -> dl.Manifests:
    return render("azure")


def _seconds(duration: str) -> int:
    return int(duration[:-1]) * {"s": 1, "m": 60, "h": 3600}[duration[-1]]


def test_podmonitor_scrapes_both_services(monitoring, azure) -> None:
    monitors = monitoring.of_kind("PodMonitor")
    assert [m["metadata"]["name"] for m in monitors] == ["pollvote"]
    assert {d["kind"] for d in monitoring.docs} == {"PodMonitor"}, "only the PodMonitor needs the add-on's CRD"
    monitor = monitors[0]
    try:
        import jsonschema
    except ImportError:  # pragma: no cover - check-jsonschema brings it into the deploy venv
        dl.unavailable("jsonschema is not installed")
    else:
        jsonschema.validate(monitor, PODMONITOR_SCHEMA)
    assert monitor["metadata"]["namespace"] == "pollvote"
    for service in dl.SERVICES:
        deployment = azure.deployment(service)
        assert dl.selector_matches(monitor["spec"]["selector"], dl.pod_labels(deployment)), service
        container = azure.service_container(service)
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert endpoint["path"] == "/metrics"
            assert dl.named_port(container, endpoint["port"]) == 8080, "the port the services listen on"
            assert _seconds(endpoint["scrapeTimeout"]) < _seconds(endpoint["interval"])


def test_azure_lets_the_managed_prometheus_scraper_in(azure) -> None:
    policy = azure.get("NetworkPolicy", "allow-from-azure-managed-prometheus")
    for service in dl.SERVICES:
        assert dl.selector_matches(policy["spec"]["podSelector"], dl.pod_labels(azure.deployment(service)))
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    [rule] = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8080}]
    assert rule["from"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"rsName": "ama-metrics"}},
        }
    ]


@pytest.mark.parametrize("service", dl.SERVICES)
def test_minikube_pods_carry_the_prometheus_annotations(render, service: str) -> None:
    minikube = render("minikube")
    deployment = minikube.deployment(service)
    annotations = deployment["spec"]["template"]["metadata"].get("annotations") or {}
    assert annotations.get("prometheus.io/scrape") == "true"
    assert annotations.get("prometheus.io/path") == "/metrics"
    port = int(annotations.get("prometheus.io/port", "0"))
    assert port == dl.named_port(minikube.service_container(service), "http") == 8080


def test_dashboard_shape() -> None:
    path = dl.ROOT / "deploy" / "grafana" / "pollvote.json"
    dashboard = json.loads(path.read_text())
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for signal in ("traffic", "errors", "latency", "saturation", "ballot"):
        assert signal in titles, f"no {signal} panel"
    queries = 0
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
            queries += 1
    assert queries >= 10
