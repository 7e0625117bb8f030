"""Acceptance 3: docker-compose.yml passes the compose-spec schema; plus the
promises of SPEC section 6 and issue 5 about the compose stack."""

from __future__ import annotations

import re

import pytest

import deploylib as dl

APP_SERVICES = {"poll": 4000, "vote": 5000}


def test_compose_spec_schema() -> None:
    checker = dl.require_tool("check-jsonschema", "CHECK_JSONSCHEMA")
    result = dl.run([checker, "--builtin-schema", "vendor.compose-spec", str(dl.COMPOSE_FILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_check_rejects_garbage(tmp_path) -> None:
    """Negative control: the vendored schema is really applied."""
    checker = dl.require_tool("check-jsonschema", "CHECK_JSONSCHEMA")
    bad = tmp_path / "compose.yml"
    bad.write_text("services:\n  x:\n    image: a\n    depends_on:\n      y:\n        condition: when_i_feel_like_it\n")
    result = dl.run([checker, "--builtin-schema", "vendor.compose-spec", str(bad)])
    assert result.returncode != 0


def test_mongodb_pinned_healthchecked_persistent(compose) -> None:
    mongo = compose["services"]["mongo"]
    assert re.fullmatch(r"mongo:\d+\.\d+(\.\d+)?", mongo["image"]), f"pin the major version: {mongo['image']}"
    assert mongo["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL")
    volumes = mongo.get("volumes") or []
    assert any(str(v).split(":")[-1] == "/data/db" or (isinstance(v, dict) and v.get("target") == "/data/db") for v in volumes)
    named = {str(v).split(":")[0] for v in volumes if isinstance(v, str)}
    assert named <= set(compose.get("volumes") or {}), "data lives in a named volume"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_service_ports_and_env(compose, name: str) -> None:
    service = compose["services"][name]
    env = dl.compose_env(service)
    unknown = set(env) - dl.ACCEPTED_ENV
    assert not unknown, f"{name}: variables the binaries do not read: {sorted(unknown)}"
    assert dl.compose_port_mappings(service) == [(APP_SERVICES[name], int(env["PORT"]))]
    assert env["PORT"] == "8080", "container port 8080, as in Kubernetes"
    assert env.get("CLIENT_IP_SOURCE", "peer") in dl.CLIENT_IP_SOURCES
    assert env.get("MONGODB_CONNECTION_STRING", "").startswith("mongodb://mongo:27017"), "compose runs on MongoDB"
    peer, var = ("vote", "VOTE_API") if name == "poll" else ("poll", "POLL_API")
    assert env[var] == f"http://{peer}:8080"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_service_health_gated(compose, name: str) -> None:
    service = compose["services"][name]
    depends = service["depends_on"]
    assert depends["mongo"]["condition"] == "service_healthy"
    for dependency in depends.values():
        assert dependency["condition"] == "service_healthy"
    # Exec form, no shell: the binary's own --health flag.
    assert service["healthcheck"]["test"] == ["CMD", f"/app/{name}", "--health"]


@pytest.mark.parametrize("name", APP_SERVICES)
def test_service_built_from_its_target_and_hardened(compose, name: str) -> None:
    service = compose["services"][name]
    assert service["build"]["target"] == name
    assert service["build"].get("dockerfile", "Dockerfile") == "Dockerfile"
    assert service.get("read_only") is True
    assert "ALL" in service.get("cap_drop", [])
    assert "no-new-privileges:true" in service.get("security_opt", [])
    assert any(str(t).split(":")[0] == "/tmp" for t in service.get("tmpfs", []))


def test_no_dependency_cycle(compose) -> None:
    graph = {name: set((svc.get("depends_on") or {})) for name, svc in compose["services"].items()}
    seen: set[str] = set()

    def visit(node: str, path: tuple[str, ...]) -> None:
        assert node not in path, f"depends_on cycle: {' -> '.join((*path, node))}"
        if node in seen:
            return
        for nxt in graph[node]:
            visit(nxt, (*path, node))
        seen.add(node)

    for name in graph:
        visit(name, ())
