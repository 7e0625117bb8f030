"""Helpers shared by the deployment tests: tools, rendering, manifest queries.

Nothing here talks to a cluster or a Docker engine: everything is static, except
test_consistency.py, which starts the real binaries on loopback.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "kubernetes"
OVERLAYS = ("minikube", "azure")
SERVICES = ("poll", "vote")
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

# The binaries' documented runtime interface. Anything the manifests or the
# compose file hand the services must be one of these (the binaries ignore any
# other variable, so a typo would silently do nothing).
ACCEPTED_ENV = frozenset(
    {
        "PORT",
        "APP_ENV",
        "DATA_DIR",
        "MONGODB_CONNECTION_STRING",
        "COSMOSDB_CONNECTION_STRING",
        "POLL_API",
        "VOTE_API",
        "RATE_LIMIT_PER_MINUTE",
        "LOG_FORMAT",
        "RUST_LOG",
        "CLIENT_IP_SOURCE",
        "TRUSTED_PROXY_HOPS",
        "FRONT_DOOR_ID",
        "DRAIN_TIMEOUT_MS",
        "REQUEST_TIMEOUT_MS",
        "USE_KEYVAULT",
        "KEYVAULT_URL",
        "KEYVAULT_SECRET_NAME",
        # Injected by the azure workload identity webhook.
        "AZURE_CLIENT_ID",
        "AZURE_TENANT_ID",
        "AZURE_FEDERATED_TOKEN_FILE",
        "AZURE_AUTHORITY_HOST",
    }
)
CLIENT_IP_SOURCES = frozenset({"peer", "x-forwarded-for", "x-azure-clientip"})
KEYVAULT_ENV = ("USE_KEYVAULT", "KEYVAULT_URL", "KEYVAULT_SECRET_NAME")
CONNECTION_STRING_ENV = ("MONGODB_CONNECTION_STRING", "COSMOSDB_CONNECTION_STRING")
# The binaries' built-in drain timeout when DRAIN_TIMEOUT_MS is not set.
DEFAULT_DRAIN_TIMEOUT_MS = 20000
# Kubernetes' default when terminationGracePeriodSeconds is absent.
DEFAULT_GRACE_SECONDS = 30
PROBES = ("startupProbe", "livenessProbe", "readinessProbe")


# --------------------------------------------------------------------------- tools


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def unavailable(reason: str) -> None:
    """A missing prerequisite: a failure under CI=true, a skip elsewhere."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: a missing tool is a failure)", pytrace=False)
    pytest.skip(reason)


def find_tool(name: str, env_var: str, *extra_dirs: Path) -> str | None:
    """The tool named by env_var, else next to this interpreter, else on PATH."""
    explicit = os.environ.get(env_var)
    if explicit:
        return explicit if Path(explicit).exists() or shutil.which(explicit) else None
    for directory in (Path(sys.executable).parent, *extra_dirs):
        candidate = directory / name
        if candidate.exists():
            return str(candidate)
    return shutil.which(name)


def require_tool(name: str, env_var: str, *extra_dirs: Path) -> str:
    path = find_tool(name, env_var, *extra_dirs)
    if path is None:
        unavailable(f"{name} not found (set {env_var} or run scripts/check-deploy)")
    return path  # type: ignore[return-value]


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


# --------------------------------------------------------------------------- rendering


def render(kubectl: str, target: str) -> str:
    """`kubectl kustomize` of kubernetes/<target> (base or overlays/<name>)."""
    path = KUBERNETES / target if target == "base" else KUBERNETES / "overlays" / target
    result = run([kubectl, "kustomize", str(path)])
    if result.returncode != 0:
        pytest.fail(f"kubectl kustomize {path} failed:\n{result.stderr}", pytrace=False)
    return result.stdout


def load_all(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


class Manifests:
    """Query helpers over one rendered overlay."""

    def __init__(self, name: str, text: str) -> None:
        self.name = name
        self.text = text
        self.docs = load_all(text)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d.get("kind") == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        for doc in self.of_kind(kind):
            if doc["metadata"]["name"] == name:
                return doc
        raise KeyError(f"{self.name}: no {kind} named {name}")

    def has(self, kind: str, name: str) -> bool:
        return any(d["metadata"]["name"] == name for d in self.of_kind(kind))

    def workloads(self) -> list[dict[str, Any]]:
        return [d for d in self.docs if d.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")]

    def deployment(self, service: str) -> dict[str, Any]:
        return self.get("Deployment", service)

    def service_container(self, service: str) -> dict[str, Any]:
        return container_named(self.deployment(service), service)

    def configmap_data(self, name: str) -> dict[str, str]:
        return dict(self.get("ConfigMap", name).get("data") or {})

    def secret_data(self, name: str) -> dict[str, str]:
        secret = self.get("Secret", name)
        data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
        data.update(secret.get("stringData") or {})
        return data

    def container_env(self, container: dict[str, Any]) -> dict[str, str | None]:
        """The container's environment as Kubernetes would build it.

        envFrom first, then env (env wins). Values from ConfigMaps and Secrets
        are resolved from the rendered overlay; anything else (fieldRef, ...)
        is None.
        """
        env: dict[str, str | None] = {}
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "configMapRef" in source:
                data = self.configmap_data(source["configMapRef"]["name"])
            elif "secretRef" in source:
                data = self.secret_data(source["secretRef"]["name"])
            else:  # pragma: no cover - no other envFrom kinds exist
                continue
            env.update({prefix + k: v for k, v in data.items()})
        for var in container.get("env") or []:
            if "value" in var:
                env[var["name"]] = str(var["value"])
            elif "valueFrom" in var:
                ref = var["valueFrom"]
                if "configMapKeyRef" in ref:
                    env[var["name"]] = self.configmap_data(ref["configMapKeyRef"]["name"]).get(ref["configMapKeyRef"]["key"])
                elif "secretKeyRef" in ref:
                    env[var["name"]] = self.secret_data(ref["secretKeyRef"]["name"]).get(ref["secretKeyRef"]["key"])
                else:
                    env[var["name"]] = None
            else:
                env[var["name"]] = ""
        return env


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    if workload["kind"] == "CronJob":
        return workload["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return workload["spec"]["template"]["spec"]


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return dict(workload["spec"]["template"]["metadata"].get("labels") or {})


def container_named(workload: dict[str, Any], name: str) -> dict[str, Any]:
    for container in pod_spec(workload)["containers"]:
        if container["name"] == name:
            return container
    raise KeyError(f"{workload['metadata']['name']}: no container {name}")


def all_containers(workload: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = pod_spec(workload)
    yield from spec.get("initContainers") or []
    yield from spec["containers"]


def selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes LabelSelector semantics (matchLabels + matchExpressions)."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def named_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    raise KeyError(f"container {container['name']} has no port named {port}")


def http_probes(container: dict[str, Any]) -> dict[str, tuple[str, int]]:
    """{probe kind: (path, container port)} for the container's httpGet probes."""
    found = {}
    for kind in PROBES:
        probe = container.get(kind)
        if probe and "httpGet" in probe:
            found[kind] = (probe["httpGet"]["path"], named_port(container, probe["httpGet"]["port"]))
    return found


# --------------------------------------------------------------------------- termination


def prestop_seconds(container: dict[str, Any]) -> int:
    """Seconds the preStop hook keeps the container serving before SIGTERM."""
    pre_stop = (container.get("lifecycle") or {}).get("preStop")
    if not pre_stop:
        return 0
    if "sleep" in pre_stop:
        return int(pre_stop["sleep"]["seconds"])
    if "exec" in pre_stop:
        command = pre_stop["exec"]["command"]
        match = re.search(r"\bsleep\s+(\d+)", " ".join(command))
        if match:
            return int(match.group(1))
    raise AssertionError(f"unrecognised preStop hook in {container['name']}: {pre_stop}")


def drain_timeout_ms(env: dict[str, str | None]) -> int:
    """DRAIN_TIMEOUT_MS as configured, else the binaries' default."""
    value = env.get("DRAIN_TIMEOUT_MS")
    if value is None or value == "":
        return DEFAULT_DRAIN_TIMEOUT_MS
    return int(value)


def grace_seconds(workload: dict[str, Any]) -> int:
    return int(pod_spec(workload).get("terminationGracePeriodSeconds", DEFAULT_GRACE_SECONDS))


def termination_budget(manifests: Manifests, workload: dict[str, Any], container_name: str) -> dict[str, float]:
    """preStop + drain vs grace for one container, all in seconds."""
    container = container_named(workload, container_name)
    env = manifests.container_env(container)
    pre_stop = prestop_seconds(container)
    drain = drain_timeout_ms(env) / 1000
    grace = grace_seconds(workload)
    return {"preStop": pre_stop, "drain": drain, "grace": grace, "margin": grace - (pre_stop + drain)}


def compose_duration_seconds(value: str | int | float) -> float:
    """Compose duration ('1m30s', '45s', '500ms', bare seconds) in seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    total, pos = 0.0, 0
    for match in re.finditer(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", value):
        if match.start() != pos:
            raise ValueError(f"bad duration {value!r}")
        total += float(match.group(1)) * units[match.group(2)]
        pos = match.end()
    if pos != len(value) or pos == 0:
        raise ValueError(f"bad duration {value!r}")
    return total


# --------------------------------------------------------------------------- compose


def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def compose_port_mappings(service: dict[str, Any]) -> list[tuple[int, int]]:
    """[(host port, container port)] from short or long port syntax."""
    mappings = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            mappings.append((int(port["published"]), int(port["target"])))
        else:
            parts = str(port).split("/")[0].split(":")
            mappings.append((int(parts[-2]), int(parts[-1])))
    return mappings


def iter_strings(node: Any) -> Iterable[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from iter_strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from iter_strings(item)
