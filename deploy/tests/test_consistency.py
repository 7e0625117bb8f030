"""Acceptance 4: the manifests and the compose file talk to the binaries we
actually build.

For each overlay and for docker-compose.yml, both binaries are started with
exactly the environment the manifests give them (ConfigMaps and Secrets
resolved from the rendered output), overriding only what must point at this
machine:
  - PORT: a free loopback port (the probes' container port must equal PORT);
  - MONGODB_CONNECTION_STRING: the local test server, env MONGODB_TEST_URI;
  - POLL_API / VOTE_API: the local peer;
  - azure only: the Key Vault variables are dropped (there is no vault
    offline) and the database comes from MONGODB_TEST_URI instead, unless
    KEYVAULT_TEST_URL names a Key Vault test double, which is then used.
Then every probe path the manifests use (kubelet probes, the Application
Gateway health probe, the compose/Docker `--health` check) must answer as the
manifest expects, and SIGTERM must turn readiness off and exit within the
drain timeout.

Needs the binaries (POLLVOTE_BIN_DIR, default target/debug) and MONGODB_TEST_URI:
missing ones skip the test, or fail it under CI=true.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import deploylib as dl

CASES = (*dl.OVERLAYS, "compose")
READY_TIMEOUT_CAP = 90.0  # seconds; the manifests' startup budget is longer


@dataclass
class ServiceSpec:
    env: dict[str, str]
    # (what, path, expected status codes): kubelet probes and gateway probes.
    http_checks: list[tuple[str, str, set[int]]] = field(default_factory=list)
    # Extra argv for an exec health check (compose / Dockerfile HEALTHCHECK).
    exec_check: list[str] | None = None
    ready_timeout: float = 60.0


# ----------------------------------------------------------------- extraction


def specs_from_overlay(manifests: dl.Manifests) -> dict[str, ServiceSpec]:
    specs = {}
    ingresses = manifests.of_kind("Ingress")
    for service in dl.SERVICES:
        container = manifests.service_container(service)
        env = manifests.container_env(container)
        unresolved = [k for k, v in env.items() if v is None]
        assert not unresolved, f"{manifests.name}/{service}: cannot resolve {unresolved}"
        port = int(env["PORT"])
        spec = ServiceSpec(env={k: v for k, v in env.items() if v is not None})
        for kind, (path, probe_port) in dl.http_probes(container).items():
            assert probe_port == port, f"{manifests.name}/{service}: {kind} on {probe_port}, the service listens on PORT={port}"
            spec.http_checks.append((kind, path, {200}))
        startup = container.get("startupProbe") or {}
        if startup:
            spec.ready_timeout = min(READY_TIMEOUT_CAP, startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3))
        for ingress in ingresses:
            notes = ingress["metadata"].get("annotations") or {}
            if "appgw.ingress.kubernetes.io/health-probe-path" in notes:
                assert int(notes.get("appgw.ingress.kubernetes.io/health-probe-port", port)) == port
                codes = _status_codes(notes.get("appgw.ingress.kubernetes.io/health-probe-status-codes", "200-399"))
                spec.http_checks.append(("application gateway probe", notes["appgw.ingress.kubernetes.io/health-probe-path"], codes))
        specs[service] = spec
    return specs


def _status_codes(text: str) -> set[int]:
    codes: set[int] = set()
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        codes.update(range(int(low), int(high or low) + 1))
    return codes


def specs_from_compose(compose: dict) -> dict[str, ServiceSpec]:
    specs = {}
    for service in dl.SERVICES:
        definition = compose["services"][service]
        env = dl.compose_env(definition)
        for _, container_port in dl.compose_port_mappings(definition):
            assert container_port == int(env["PORT"]), f"compose/{service}: publishes {container_port}, listens on {env['PORT']}"
        test = definition["healthcheck"]["test"]
        assert test[0] == "CMD" and Path(test[1]).name == service, test
        specs[service] = ServiceSpec(env=env, exec_check=test[2:])
    return specs


# ----------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_status(port: int, path: str, timeout: float = 2.0) -> int | None:
    """HTTP status of GET path, None when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout):
        return None


@dataclass
class Running:
    name: str
    process: subprocess.Popen
    port: int
    log: Path
    env: dict[str, str]

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


def prerequisites() -> tuple[Path, str]:
    bin_dir = Path(os.environ.get("POLLVOTE_BIN_DIR", dl.ROOT / "target" / "debug"))
    if not bin_dir.is_absolute():
        bin_dir = dl.ROOT / bin_dir
    missing = [name for name in dl.SERVICES if not os.access(bin_dir / name, os.X_OK)]
    if missing:
        dl.unavailable(
            f"binaries {missing} not found in {bin_dir} (cargo build --bin poll --bin vote, or set POLLVOTE_BIN_DIR)"
        )
    uri = os.environ.get("MONGODB_TEST_URI", "")
    if not uri:
        dl.unavailable("MONGODB_TEST_URI is not set (e.g. the URI printed by scripts/ferretdb start <dir>)")
    return bin_dir, uri


@pytest.fixture
def launcher(tmp_path: Path):
    """Starts binaries like the image does (WORKDIR with config/), stops them all at the end."""
    app_dir = tmp_path / "app"
    shutil.copytree(dl.ROOT / "config", app_dir / "config")
    started: list[Running] = []

    def launch(binary: Path, name: str, env: dict[str, str]) -> Running:
        log = tmp_path / f"{name}.log"
        base = {k: os.environ[k] for k in ("PATH", "HOME", "TMPDIR") if k in os.environ}
        with log.open("wb") as out:
            process = subprocess.Popen(
                [str(binary)], cwd=app_dir, env={**base, **env}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        running = Running(name, process, int(env["PORT"]), log, env)
        started.append(running)
        return running

    yield launch
    for running in started:
        if running.process.poll() is None:
            running.process.send_signal(signal.SIGTERM)
    for running in started:
        try:
            running.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            running.process.kill()
            running.process.wait(timeout=10)


def wait_ready(running: Running, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        if running.process.poll() is not None:
            pytest.fail(f"{running.name} exited with {running.process.returncode} at start:\n{running.log_tail()}", pytrace=False)
        status = http_status(running.port, path)
        if status == 200:
            return
        time.sleep(0.25)
    pytest.fail(f"{running.name}: {path} still {status} after {timeout:.0f}s:\n{running.log_tail()}", pytrace=False)


# ----------------------------------------------------------------- the test


def local_env(case: str, service: str, spec: ServiceSpec, ports: dict[str, int], mongo_uri: str) -> dict[str, str]:
    env = dict(spec.env)
    env["PORT"] = str(ports[service])
    peer, peer_var = ("vote", "VOTE_API") if service == "poll" else ("poll", "POLL_API")
    assert env.get(peer_var, "").startswith("http://"), f"{case}/{service}: {peer_var} is not set"
    env[peer_var] = f"http://127.0.0.1:{ports[peer]}"
    for name in dl.CONNECTION_STRING_ENV:
        env.pop(name, None)
    keyvault_double = os.environ.get("KEYVAULT_TEST_URL")
    if env.get("USE_KEYVAULT", "").lower() == "true" and keyvault_double:
        # A Key Vault test double serves the connection string: exercise the
        # overlay's Key Vault settings as they are, only the URL is local.
        env["KEYVAULT_URL"] = keyvault_double
        for name in ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_FEDERATED_TOKEN_FILE", "AZURE_AUTHORITY_HOST"):
            if name in os.environ:
                env[name] = os.environ[name]
    else:
        # No Key Vault offline (and no workload identity token outside AKS):
        # drop the Key Vault variables and hand the database URI over directly,
        # which is what the secret would contain. Everything else stays as rendered.
        for name in dl.KEYVAULT_ENV:
            env.pop(name, None)
        env["MONGODB_CONNECTION_STRING"] = mongo_uri
    unknown = set(env) - dl.ACCEPTED_ENV
    assert not unknown, unknown
    return env


@pytest.mark.parametrize("case", CASES)
def test_binaries_accept_the_manifests(case: str, render, compose, launcher) -> None:
    bin_dir, mongo_uri = prerequisites()
    specs = specs_from_compose(compose) if case == "compose" else specs_from_overlay(render(case))
    ports = {service: free_port() for service in dl.SERVICES}
    running = {
        service: launcher(bin_dir / service, f"{case}-{service}", local_env(case, service, spec, ports, mongo_uri))
        for service, spec in specs.items()
    }

    for service, spec in specs.items():
        proc = running[service]
        wait_ready(proc, "/readyz", spec.ready_timeout)
        for what, path, expected in spec.http_checks:
            status = http_status(proc.port, path)
            assert status in expected, f"{case}/{service}: {what} GET {path} -> {status}, manifest expects {sorted(expected)}\n{proc.log_tail()}"
        if spec.exec_check is not None:
            result = dl.run([str(bin_dir / service), *spec.exec_check], env={**os.environ, "PORT": str(proc.port)}, timeout=30)
            assert result.returncode == 0, f"{case}/{service}: health check {spec.exec_check} -> {result.returncode}\n{result.stderr}"
            # ...and it is a real check: nothing listening means unhealthy.
            result = dl.run([str(bin_dir / service), *spec.exec_check], env={**os.environ, "PORT": str(free_port())}, timeout=30)
            assert result.returncode != 0, f"{case}/{service}: health check passes with nothing listening"

    # Graceful termination as the manifests budget it: readiness off at once,
    # exit within the configured drain timeout.
    for service, spec in specs.items():
        proc = running[service]
        drain = dl.drain_timeout_ms(spec.env) / 1000
        proc.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 3
        while http_status(proc.port, "/readyz", timeout=1) == 200:
            assert time.monotonic() < deadline, f"{case}/{service}: /readyz still 200 after SIGTERM"
            time.sleep(0.1)
        try:
            code = proc.process.wait(timeout=drain + 5)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{case}/{service}: still running {drain + 5:.0f}s after SIGTERM (drain {drain:.0f}s)", pytrace=False)
        assert code == 0, f"{case}/{service}: exit {code} after SIGTERM\n{proc.log_tail()}"
