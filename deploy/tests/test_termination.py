"""Acceptance 5: graceful termination arithmetic, computed from the rendered
manifests (and the compose file), not by eye.

After the pod is marked terminating the kubelet runs the preStop hook (the
container keeps serving while the endpoint removal reaches the ingress), then
sends SIGTERM; the service turns unready, stops accepting and drains in-flight
requests for up to DRAIN_TIMEOUT_MS. All of that must fit in
terminationGracePeriodSeconds, or the kubelet SIGKILLs requests mid-flight.
"""

from __future__ import annotations

import pytest

import deploylib as dl

# Room for process exit and the kubelet's own bookkeeping.
MIN_MARGIN_SECONDS = 5


@pytest.mark.parametrize("service", dl.SERVICES)
def test_prestop_plus_drain_fits_grace(overlay, service: str) -> None:
    deployment = overlay.deployment(service)
    budget = dl.termination_budget(overlay, deployment, service)
    assert budget["preStop"] > 0, "a preStop delay lets the ingress stop sending before SIGTERM"
    assert budget["margin"] >= MIN_MARGIN_SECONDS, (
        f"{overlay.name}/{service}: preStop {budget['preStop']}s + drain {budget['drain']}s "
        f"must be < terminationGracePeriodSeconds {budget['grace']}s by >= {MIN_MARGIN_SECONDS}s"
    )


@pytest.mark.parametrize("service", dl.SERVICES)
def test_drain_timeout_read_from_the_configmap(overlay, service: str) -> None:
    """The arithmetic uses the value the pods will really get."""
    container = overlay.service_container(service)
    env = overlay.container_env(container)
    configured = env.get("DRAIN_TIMEOUT_MS")
    assert configured is not None, "set DRAIN_TIMEOUT_MS explicitly so the budget is visible"
    assert dl.drain_timeout_ms(env) == int(configured)


def test_azure_waits_for_application_gateway(render) -> None:
    """The pod must stay up (preStop) while AGIC removes it from the backend
    pool (an ARM update: tens of seconds). Application Gateway then drains the
    pod's open connections for connection-draining-timeout: long enough for a
    request to finish (REQUEST_TIMEOUT_MS), and no longer than the pod lives."""
    azure = render("azure")
    (ingress,) = azure.of_kind("Ingress")
    draining = int(ingress["metadata"]["annotations"]["appgw.ingress.kubernetes.io/connection-draining-timeout"])
    for service in dl.SERVICES:
        budget = dl.termination_budget(azure, azure.deployment(service), service)
        env = azure.container_env(azure.service_container(service))
        request_timeout = int(env.get("REQUEST_TIMEOUT_MS") or 10000) / 1000
        assert budget["preStop"] >= 20, "AGIC backend pool updates take tens of seconds"
        assert request_timeout <= draining <= budget["preStop"] + budget["drain"]
        assert budget["margin"] >= MIN_MARGIN_SECONDS


@pytest.mark.parametrize("service", dl.SERVICES)
def test_compose_stop_grace_exceeds_drain(compose, service: str) -> None:
    definition = compose["services"][service]
    grace = dl.compose_duration_seconds(definition.get("stop_grace_period", "10s"))
    drain = dl.drain_timeout_ms(dl.compose_env(definition)) / 1000
    assert grace >= drain + MIN_MARGIN_SECONDS, f"{service}: stop_grace_period {grace}s vs drain {drain}s"


# ---------------------------------------------------------------- the helpers


def _synthetic(grace: int | None, prestop: dict | None, env: list[dict], configmap: dict | None = None) -> dl.Manifests:
    import yaml

    container = {"name": "poll", "image": "x:1", "env": env}
    if prestop is not None:
        container["lifecycle"] = {"preStop": prestop}
    if configmap is not None:
        container["envFrom"] = [{"configMapRef": {"name": "cfg"}}]
    spec = {"containers": [container]}
    if grace is not None:
        spec["terminationGracePeriodSeconds"] = grace
    docs = [{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "poll"}, "spec": {"template": {"spec": spec}}}]
    if configmap is not None:
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": configmap})
    return dl.Manifests("synthetic", yaml.safe_dump_all(docs))


def test_budget_defaults_to_binary_drain_and_kubernetes_grace() -> None:
    manifests = _synthetic(None, {"sleep": {"seconds": 5}}, [])
    budget = dl.termination_budget(manifests, manifests.deployment("poll"), "poll")
    assert budget == {"preStop": 5, "drain": 20.0, "grace": 30, "margin": 5.0}


def test_budget_reads_configmap_and_env_precedence() -> None:
    manifests = _synthetic(40, {"exec": {"command": ["/bin/sh", "-c", "sleep 15"]}}, [{"name": "DRAIN_TIMEOUT_MS", "value": "25000"}], {"DRAIN_TIMEOUT_MS": "1000"})
    budget = dl.termination_budget(manifests, manifests.deployment("poll"), "poll")
    assert budget == {"preStop": 15, "drain": 25.0, "grace": 40, "margin": 0.0}
    manifests = _synthetic(40, None, [], {"DRAIN_TIMEOUT_MS": "1000"})
    assert dl.termination_budget(manifests, manifests.deployment("poll"), "poll")["margin"] == 39.0


def test_compose_durations() -> None:
    assert dl.compose_duration_seconds("1m30s") == 90
    assert dl.compose_duration_seconds("500ms") == 0.5
    assert dl.compose_duration_seconds(12) == 12
    with pytest.raises(ValueError):
        dl.compose_duration_seconds("30 seconds")
