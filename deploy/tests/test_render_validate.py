"""Acceptance 1: every overlay renders and passes kubernetes-validate --strict
for Kubernetes 1.30 and for the newest version the validator knows."""

from __future__ import annotations

import pytest

import deploylib as dl

TARGETS = ("base", *dl.OVERLAYS)


def _latest_known_version() -> str:
    try:
        from kubernetes_validate.utils import latest_version
    except ImportError:  # validator not importable here: the CLI default is its latest
        return "latest"
    return latest_version() + ".0"


VERSIONS = ("1.30.0", _latest_known_version())


@pytest.mark.parametrize("target", TARGETS)
def test_kustomize_renders(render, target: str) -> None:
    manifests = render(target)
    kinds = {d["kind"] for d in manifests.docs}
    assert {"Namespace", "ServiceAccount", "ConfigMap", "Deployment", "Service"} <= kinds
    for doc in manifests.docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "pollvote", f"{doc['kind']}/{doc['metadata']['name']}"


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("target", TARGETS)
def test_kubernetes_validate_strict(rendered_file, target: str, version: str) -> None:
    validator = dl.require_tool("kubernetes-validate", "KUBERNETES_VALIDATE")
    cmd = [validator, "--strict", "--quiet"]
    if version != "latest":
        cmd += ["-k", version]
    result = dl.run([*cmd, str(rendered_file(target))])
    assert result.returncode == 0, f"kubernetes-validate {version} on {target}:\n{result.stdout}{result.stderr}"
    # Every resource must have been checked against a schema, none skipped.
    assert "unknown" not in (result.stdout + result.stderr).lower(), result.stdout + result.stderr


def test_validator_is_strict(tmp_path) -> None:
    """Negative control: an unknown field must be rejected, or the check above proves nothing."""
    validator = dl.require_tool("kubernetes-validate", "KUBERNETES_VALIDATE")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n"
        "spec:\n  selector: {matchLabels: {a: b}}\n  template:\n    metadata: {labels: {a: b}}\n"
        "    spec:\n      containers: [{name: x, image: x:1, readinessProbe: {httpGet: {path: /, port: 1}, bogus: 1}}]\n"
    )
    result = dl.run([validator, "--strict", "--quiet", "-k", "1.30.0", str(bad)])
    assert result.returncode != 0
    assert "bogus" in result.stdout + result.stderr
