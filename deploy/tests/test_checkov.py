"""Acceptance 2: checkov (offline) on the rendered overlays and the Dockerfile
reports no failed check, and every skipped check carries its reason next to it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

import deploylib as dl

# Checks that must have run and passed: if checkov silently stopped parsing a
# file, "no failures" would prove nothing.
MUST_PASS = {
    "kubernetes": {
        "CKV_K8S_8",  # liveness probe
        "CKV_K8S_9",  # readiness probe
        "CKV_K8S_12",  # memory requests
        "CKV_K8S_13",  # memory limits
        "CKV_K8S_20",  # allowPrivilegeEscalation false
        "CKV_K8S_22",  # read-only root filesystem
        "CKV_K8S_23",  # no root containers
        "CKV_K8S_28",  # NET_RAW dropped
        "CKV_K8S_37",  # capabilities minimised
        "CKV_K8S_38",  # service account token only where needed
        "CKV_K8S_40",  # high UID
    },
    "dockerfile": {
        "CKV_DOCKER_2",  # HEALTHCHECK
        "CKV_DOCKER_3",  # USER
        "CKV_DOCKER_7",  # no :latest base image
    },
}
SKIP_RE = re.compile(r"^(CKV2?_[A-Z0-9]+_\d+)=([^=]{20,})$")
DOCKER_SKIP_RE = re.compile(r"#\s*checkov:skip=([A-Z0-9_,]+)(?::\s*(.*))?$")


@pytest.fixture(scope="session")
def checkov_reports(rendered_file, tmp_path_factory) -> dict[str, dict[str, Any]]:
    checkov = dl.require_tool("checkov", "CHECKOV", dl.ROOT / ".venv" / "deploy-checkov" / "bin")
    files = [rendered_file(o) for o in dl.OVERLAYS]
    cmd = [checkov, "--skip-download", "--framework", "kubernetes", "dockerfile", "--output", "json"]
    for f in (*files, dl.DOCKERFILE):
        cmd += ["--file", str(f)]
    result = dl.run(cmd, env={**__import__("os").environ, "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true"})
    try:
        output = json.loads(result.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"checkov gave no JSON (exit {result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    reports = output if isinstance(output, list) else [output]
    by_type = {r["check_type"]: r for r in reports}
    assert set(by_type) == {"kubernetes", "dockerfile"}, f"checkov scanned {sorted(by_type)}"
    return by_type


def _describe(check: dict[str, Any]) -> str:
    return f"{check['check_id']} {check['check_name']!r} on {check['resource']} ({Path(check['file_path']).name})"


@pytest.mark.parametrize("framework", ["kubernetes", "dockerfile"])
def test_checkov_no_failed_checks(checkov_reports, framework: str) -> None:
    results = checkov_reports[framework]["results"]
    failed = results.get("failed_checks", [])
    assert not failed, "checkov failed checks:\n" + "\n".join(_describe(c) for c in failed)


@pytest.mark.parametrize("framework", ["kubernetes", "dockerfile"])
def test_checkov_ran_the_important_checks(checkov_reports, framework: str) -> None:
    results = checkov_reports[framework]["results"]
    passed = {c["check_id"] for c in results.get("passed_checks", [])}
    missing = MUST_PASS[framework] - passed
    assert not missing, f"expected checkov to run and pass {sorted(missing)}"
    if framework == "kubernetes":
        scanned = {Path(c["file_path"]).name for c in results["passed_checks"]}
        assert {f"{o}.yaml" for o in dl.OVERLAYS} <= scanned


def test_checkov_skips_carry_reasons(checkov_reports) -> None:
    skipped = [c for r in checkov_reports.values() for c in r["results"].get("skipped_checks", [])]
    for check in skipped:
        reason = (check.get("check_result") or {}).get("suppress_comment", "")
        assert reason and reason != "No comment provided" and len(reason) >= 20, f"no reason for {_describe(check)}"


def _annotation_skips(manifests: dl.Manifests) -> dict[str, set[str]]:
    """{checkov resource id: {skipped check ids}} from checkov.io/skip* annotations."""
    found: dict[str, set[str]] = {}
    for doc in manifests.docs:
        meta = doc["metadata"]
        resource = f"{doc['kind']}.{meta.get('namespace', 'default')}.{meta['name']}"
        for key, value in (meta.get("annotations") or {}).items():
            if key.startswith("checkov.io/skip"):
                match = SKIP_RE.match(value)
                assert match, f"{resource}: annotation {key} must read 'CHECK_ID=reason' (one '=', a real reason): {value!r}"
                found.setdefault(resource, set()).add(match.group(1))
    return found


@pytest.mark.parametrize("target", dl.OVERLAYS)
def test_every_skip_annotation_is_used(checkov_reports, render, target: str) -> None:
    """A skip must suppress a real finding on that very resource; stale skips hide future ones."""
    declared = _annotation_skips(render(target))
    assert declared, "expected the documented skips (CPU limit, digest) on the workloads"
    skipped = {
        (c["resource"], c["check_id"])
        for c in checkov_reports["kubernetes"]["results"].get("skipped_checks", [])
        if Path(c["file_path"]).name == f"{target}.yaml"
    }
    for resource, ids in declared.items():
        for check_id in ids:
            assert (resource, check_id) in skipped, f"{target}: skip of {check_id} on {resource} suppresses nothing"


def test_dockerfile_skips_carry_reasons() -> None:
    for number, line in enumerate(dl.DOCKERFILE.read_text().splitlines(), 1):
        match = DOCKER_SKIP_RE.search(line)
        if match:
            assert match.group(2) and len(match.group(2).strip()) >= 20, f"Dockerfile:{number}: skip without a reason"
