"""What the rendered overlays promise (SPEC section 6, issue 5), checked on the
kustomize output rather than by eye."""

from __future__ import annotations

import re

import pytest

import deploylib as dl

PUBLIC_PREFIXES = {"/api/polls": "poll", "/api/votes": "vote"}
# Pod Security Standards "restricted": the only volume types allowed.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}
GUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


# ----------------------------------------------------------------- workloads


def test_namespace_enforces_restricted(overlay) -> None:
    (namespace,) = overlay.of_kind("Namespace")
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_deployments_leave_replicas_to_the_hpa(overlay) -> None:
    for deployment in overlay.of_kind("Deployment"):
        assert "replicas" not in deployment["spec"], f"{deployment['metadata']['name']}: spec.replicas fights the HPA"


def test_pod_security_restricted(overlay) -> None:
    """The "restricted" profile, for every workload, so admission cannot reject it."""
    for workload in overlay.workloads():
        name = workload["metadata"]["name"]
        spec = dl.pod_spec(workload)
        pod_sc = spec.get("securityContext") or {}
        for host in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(host), f"{name}: {host}"
        for volume in spec.get("volumes") or []:
            kinds = set(volume) - {"name"}
            assert kinds <= RESTRICTED_VOLUMES, f"{name}: volume {volume['name']} of type {kinds}"
        assert (pod_sc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", f"{name}: seccomp"
        for container in dl.all_containers(workload):
            sc = container.get("securityContext") or {}
            where = f"{name}/{container['name']}"
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation"
            assert not sc.get("privileged"), f"{where}: privileged"
            assert sc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem"
            assert "ALL" in (sc.get("capabilities") or {}).get("drop", []), f"{where}: drop ALL"
            assert not (sc.get("capabilities") or {}).get("add"), f"{where}: adds capabilities"
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, f"{where}: runAsNonRoot"
            uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
            assert uid is not None and uid >= 10000, f"{where}: runAsUser {uid} (numeric, >= 10000)"
            for port in container.get("ports") or []:
                assert "hostPort" not in port, f"{where}: hostPort"
            mounts = {m["mountPath"] for m in container.get("volumeMounts") or []}
            assert "/tmp" in mounts, f"{where}: read-only root needs a writable /tmp"


def test_no_service_account_token(overlay) -> None:
    """Nothing here calls the Kubernetes API. (The azure workload identity
    webhook injects its own projected token, independent of this setting.)"""
    for sa in overlay.of_kind("ServiceAccount"):
        assert sa.get("automountServiceAccountToken") is False, sa["metadata"]["name"]
    for workload in overlay.workloads():
        assert dl.pod_spec(workload).get("automountServiceAccountToken") is False, workload["metadata"]["name"]


def test_resources_requests_and_memory_limits(overlay) -> None:
    for workload in overlay.workloads():
        for container in dl.all_containers(workload):
            resources = container.get("resources") or {}
            where = f"{workload['metadata']['name']}/{container['name']}"
            assert {"cpu", "memory"} <= set(resources.get("requests") or {}), f"{where}: requests"
            assert "memory" in (resources.get("limits") or {}), f"{where}: memory limit"


def test_images_pinned(overlay) -> None:
    for workload in overlay.workloads():
        for container in dl.all_containers(workload):
            image = container["image"]
            assert "@sha256:" in image or re.search(r":[\w.-]+$", image.split("/")[-1]), f"untagged {image}"
            assert not image.endswith(":latest"), image


@pytest.mark.parametrize("service", dl.SERVICES)
def test_service_probes_follow_spec(overlay, service: str) -> None:
    container = overlay.service_container(service)
    probes = dl.http_probes(container)
    assert probes["livenessProbe"][0] == "/healthz", "liveness is in-process only"
    assert probes["readinessProbe"][0] == "/readyz"
    assert probes["startupProbe"][0] == "/readyz", "startup covers initialisation, including the Key Vault fetch"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60, "room for Key Vault retries at start"
    for _, port in probes.values():
        assert port == 8080
    env = overlay.container_env(container)
    assert env["PORT"] == "8080"


@pytest.mark.parametrize("service", dl.SERVICES)
def test_env_is_the_binaries_interface(overlay, service: str) -> None:
    container = overlay.service_container(service)
    env = overlay.container_env(container)
    unknown = set(env) - dl.ACCEPTED_ENV
    assert not unknown, f"variables the binaries do not read: {sorted(unknown)}"
    assert env["CLIENT_IP_SOURCE"] in dl.CLIENT_IP_SOURCES
    assert int(env["TRUSTED_PROXY_HOPS"]) >= 1
    peer, var = ("vote", "VOTE_API") if service == "poll" else ("poll", "POLL_API")
    assert env[var] == f"http://{peer}:8080"
    assert overlay.has("Service", peer)
    assert dl.pod_spec(overlay.deployment(service)).get("enableServiceLinks") is False, "no docker-link env noise"


def test_topology_spread(overlay) -> None:
    for deployment in overlay.of_kind("Deployment"):
        constraints = dl.pod_spec(deployment).get("topologySpreadConstraints") or []
        keys = {c["topologyKey"] for c in constraints}
        assert {"kubernetes.io/hostname", "topology.kubernetes.io/zone"} <= keys
        for constraint in constraints:
            assert dl.selector_matches(constraint["labelSelector"], dl.pod_labels(deployment))


def test_hpa_and_pdb_for_every_deployment(overlay) -> None:
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in overlay.of_kind("HorizontalPodAutoscaler")}
    pdbs = overlay.of_kind("PodDisruptionBudget")
    for deployment in overlay.of_kind("Deployment"):
        name = deployment["metadata"]["name"]
        hpa = hpas[name]
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
        assert hpa["spec"]["minReplicas"] >= 2
        assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
        covering = [p for p in pdbs if dl.selector_matches(p["spec"]["selector"], dl.pod_labels(deployment))]
        assert len(covering) == 1, f"{name}: exactly one PDB"
        pdb = covering[0]
        assert pdb["apiVersion"] == "policy/v1"
        # The PDB must allow a disruption at minReplicas, or node drains hang.
        if "maxUnavailable" in pdb["spec"]:
            assert int(pdb["spec"]["maxUnavailable"]) >= 1
        else:
            assert int(pdb["spec"]["minAvailable"]) < hpa["spec"]["minReplicas"]


def test_services_select_pods_and_ports(overlay) -> None:
    for service in overlay.of_kind("Service"):
        targets = [w for w in overlay.workloads() if dl.selector_matches({"matchLabels": service["spec"]["selector"]}, dl.pod_labels(w))]
        assert len(targets) == 1, f"Service {service['metadata']['name']} selects {len(targets)} workloads"
        containers = dl.pod_spec(targets[0])["containers"]
        for port in service["spec"]["ports"]:
            assert any(dl.named_port(c, port["targetPort"]) for c in containers)


# ----------------------------------------------------------------- ingress


def _ingress_routes(overlay) -> list[tuple[str, str, str]]:
    (ingress,) = overlay.of_kind("Ingress")
    routes = []
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            routes.append((path["path"], path["pathType"], path["backend"]["service"]["name"]))
    return routes


def _route(routes: list[tuple[str, str, str]], request_path: str) -> str | None:
    """Which service a request path reaches under Kubernetes Ingress semantics."""
    best: tuple[int, str] | None = None
    for path, kind, service in routes:
        if kind == "Exact":
            hit = request_path == path
        else:
            prefix = path.rstrip("/")
            hit = request_path == prefix or request_path.startswith(prefix + "/")
        if hit and (best is None or len(path) > best[0]):
            best = (len(path), service)
    return best[1] if best else None


@pytest.mark.parametrize(
    "request_path,expected",
    [
        ("/api/polls", "poll"),
        ("/api/polls/abc", "poll"),
        ("/api/polls/abc/results/stream", "poll"),
        ("/api/votes", "vote"),
        ("/api/votes/x", "vote"),
        ("/api/pollsters", None),
        ("/internal/polls/abc", None),
        ("/internal/tallies", None),
        ("/healthz", None),
        ("/metrics", None),
        ("/", None),
    ],
)
def test_ingress_routes_public_api_only(overlay, request_path: str, expected: str | None) -> None:
    assert _route(_ingress_routes(overlay), request_path) == expected


def test_ingress_backends_exist(overlay) -> None:
    (ingress,) = overlay.of_kind("Ingress")
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            service = overlay.get("Service", backend["name"])
            assert backend["port"].get("name") in {p["name"] for p in service["spec"]["ports"]}


# ----------------------------------------------------------------- network policy


def _policies_for(overlay, labels: dict[str, str]) -> list[dict]:
    return [p for p in overlay.of_kind("NetworkPolicy") if dl.selector_matches(p["spec"]["podSelector"], labels)]


def test_default_deny(overlay) -> None:
    deny = [p for p in overlay.of_kind("NetworkPolicy") if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress") and not p["spec"].get("egress")]
    assert deny and set(deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}


def test_every_pod_has_dns_egress(overlay) -> None:
    for workload in overlay.workloads():
        ports = {
            (p.get("protocol", "TCP"), p["port"])
            for policy in _policies_for(overlay, dl.pod_labels(workload))
            for rule in policy["spec"].get("egress") or []
            for p in rule.get("ports") or []
        }
        assert {("UDP", 53), ("TCP", 53)} <= ports, workload["metadata"]["name"]


@pytest.mark.parametrize("service", dl.SERVICES)
def test_service_ingress_sources(overlay, service: str) -> None:
    """On 8080: the other service and the ingress controller (and in AKS the metrics scraper), nobody else."""
    labels = dl.pod_labels(overlay.deployment(service))
    peer = "vote" if service == "poll" else "poll"
    sources = []
    for policy in _policies_for(overlay, labels):
        for rule in policy["spec"].get("ingress") or []:
            assert {p["port"] for p in rule.get("ports") or []} == {8080}, policy["metadata"]["name"]
            sources += rule["from"]
    peers = [s for s in sources if "podSelector" in s and "namespaceSelector" not in s]
    assert len(peers) == 1 and peers[0]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": peer}}
    others = [s for s in sources if s not in peers]
    if overlay.name == "minikube":
        assert others == [
            {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}},
                "podSelector": {"matchLabels": {"app.kubernetes.io/name": "ingress-nginx"}},
            }
        ]
    else:
        scraper = {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"rsName": "ama-metrics"}},
        }
        assert scraper in others, "Azure Managed Prometheus scrapes /metrics"
        others = [s for s in others if s != scraper]
        assert len(others) == 1 and "ipBlock" in others[0], "only the Application Gateway subnet"
        cidr = others[0]["ipBlock"]["cidr"]
        assert re.fullmatch(r"\d+\.\d+\.\d+\.\d+/\d+", cidr) and not cidr.startswith("0.0.0.0"), cidr


@pytest.mark.parametrize("service", dl.SERVICES)
def test_service_egress(overlay, service: str) -> None:
    labels = dl.pod_labels(overlay.deployment(service))
    peer = "vote" if service == "poll" else "poll"
    rules = [r for p in _policies_for(overlay, labels) for r in p["spec"].get("egress") or []]
    ports = {p["port"] for r in rules for p in r.get("ports") or []}
    assert any(
        t.get("podSelector") == {"matchLabels": {"app.kubernetes.io/name": peer}} and [p["port"] for p in r["ports"]] == [8080]
        for r in rules
        for t in r.get("to") or []
    ), "egress to the other service's internal path"
    if overlay.name == "minikube":
        assert ports == {53, 8080, 27017}
    else:
        assert ports == {53, 8080, 443, 10255, 10260}
        for rule in rules:
            for target in rule.get("to") or []:
                if "ipBlock" in target and target["ipBlock"]["cidr"] == "0.0.0.0/0":
                    assert "169.254.169.254/32" in target["ipBlock"].get("except", []), "IMDS stays blocked"


def test_every_workload_covered_by_a_policy(overlay) -> None:
    for workload in overlay.workloads():
        named = [p for p in _policies_for(overlay, dl.pod_labels(workload)) if p["spec"]["podSelector"]]
        assert named, f"{workload['metadata']['name']} relies on default deny only"


# ----------------------------------------------------------------- minikube


@pytest.fixture
def minikube(render) -> dl.Manifests:
    return render("minikube")


@pytest.fixture
def azure(render) -> dl.Manifests:
    return render("azure")


def test_minikube_mongodb_statefulset(minikube) -> None:
    mongo = minikube.get("StatefulSet", "mongodb")
    (container,) = dl.pod_spec(mongo)["containers"]
    assert re.fullmatch(r"mongo:\d+\.\d+\.\d+", container["image"]), f"pinned image, got {container['image']}"
    (claim,) = mongo["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    assert any(m["name"] == claim["metadata"]["name"] and m["mountPath"] == "/data/db" for m in container["volumeMounts"])
    service = minikube.get("Service", mongo["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"


@pytest.mark.parametrize("service", dl.SERVICES)
def test_minikube_connection_string_from_secret(minikube, service: str) -> None:
    container = minikube.service_container(service)
    (var,) = [v for v in container["env"] if v["name"] == "MONGODB_CONNECTION_STRING"]
    ref = var["valueFrom"]["secretKeyRef"]
    uri = minikube.secret_data(ref["name"])[ref["key"]]
    host = re.match(r"mongodb://([^/:?]+)", uri).group(1)
    assert host.split(".")[-1] == "mongodb" or host == "mongodb", "points at the in-cluster StatefulSet"
    env = minikube.container_env(container)
    assert env["CLIENT_IP_SOURCE"] == "x-forwarded-for"
    assert container["imagePullPolicy"] == "IfNotPresent", "images come from `minikube image build`"


def test_minikube_ingress_is_nginx(minikube) -> None:
    (ingress,) = minikube.of_kind("Ingress")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert sorted(_ingress_routes(minikube)) == [("/api/polls", "Prefix", "poll"), ("/api/votes", "Prefix", "vote")]


# ----------------------------------------------------------------- azure


def test_azure_has_no_connection_string_anywhere(azure) -> None:
    assert not azure.of_kind("Secret")
    assert "mongodb://" not in azure.text and "mongodb+srv://" not in azure.text
    assert "AccountKey=" not in azure.text
    for service in dl.SERVICES:
        env = azure.container_env(azure.service_container(service))
        assert not set(env) & set(dl.CONNECTION_STRING_ENV)


@pytest.mark.parametrize("service", dl.SERVICES)
def test_azure_key_vault_and_front_door_settings(azure, service: str) -> None:
    container = azure.service_container(service)
    env = azure.container_env(container)
    assert env["USE_KEYVAULT"] == "true"
    assert re.fullmatch(r"https://[a-z0-9-]+\.vault\.azure\.net/?", env["KEYVAULT_URL"])
    assert env["KEYVAULT_SECRET_NAME"] == "cosmosdb-connection-string"
    assert env["CLIENT_IP_SOURCE"] == "x-azure-clientip"
    assert GUID.fullmatch(env["FRONT_DOOR_ID"]), "X-Azure-FDID check configured"
    # The Key Vault URL sits in the ConfigMap, not inline in the Deployment.
    assert not {v["name"] for v in container.get("env") or []} & set(dl.KEYVAULT_ENV)
    assert container["imagePullPolicy"] == "Always"
    assert container["image"].split("/")[0].endswith(".azurecr.io")


def test_azure_workload_identity(azure) -> None:
    (sa,) = azure.of_kind("ServiceAccount")
    assert GUID.fullmatch(sa["metadata"]["annotations"]["azure.workload.identity/client-id"])
    for service in dl.SERVICES:
        deployment = azure.deployment(service)
        assert dl.pod_labels(deployment)["azure.workload.identity/use"] == "true"
        assert dl.pod_spec(deployment)["serviceAccountName"] == sa["metadata"]["name"]
        # The webhook adds its own projected token; the manifests must not pre-empt it.
        assert not any("projected" in v for v in dl.pod_spec(deployment).get("volumes") or [])


def test_azure_application_gateway_ingress(azure) -> None:
    (ingress,) = azure.of_kind("Ingress")
    notes = ingress["metadata"]["annotations"]
    assert ingress["spec"]["ingressClassName"] == "azure-application-gateway"
    assert notes["appgw.ingress.kubernetes.io/connection-draining"] == "true"
    assert int(notes["appgw.ingress.kubernetes.io/connection-draining-timeout"]) >= 1
    assert notes["appgw.ingress.kubernetes.io/health-probe-path"] == "/readyz"
    assert notes["appgw.ingress.kubernetes.io/health-probe-port"] == "8080"
    for path, kind, _ in _ingress_routes(azure):
        # AGIC turns Prefix into "<path>*": a prefix must end with "/" so that
        # /api/pollsX does not match; the bare path is routed by an Exact twin.
        if kind == "Prefix":
            assert path.endswith("/") and (path.rstrip("/"), "Exact") in {(p, k) for p, k, _ in _ingress_routes(azure)}
    assert not any(k.startswith("nginx.") for k in notes)


def test_placeholders_are_all_in_the_settings_files() -> None:
    """Everything an operator must edit lives in the two settings files (*.properties)."""
    overlay_dir = dl.KUBERNETES / "overlays" / "azure"
    for path in overlay_dir.glob("*.yaml"):
        text = path.read_text()
        for guid in GUID.findall(text):
            pytest.fail(f"{path.name} hard-codes {guid}; put it in a settings file")
        assert "vault.azure.net" not in text or path.name == "kustomization.yaml"
