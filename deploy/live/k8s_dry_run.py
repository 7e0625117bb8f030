#!/usr/bin/env python3
"""Both kustomize overlays against a real Kubernetes API server (scripts/check-deploy-live).

    python3 deploy/live/k8s_dry_run.py --kubeconfig FILE [--kubectl kubectl]

For each overlay: the rendered Namespace is applied for real and must carry
`pod-security.kubernetes.io/enforce: restricted` on the server; then every rendered object is
applied with `kubectl apply --dry-run=server --validate=strict` (admission, strict field
validation, defaulting) and must be accepted without a single warning. Pod Security admission
enforces on Pods only (for Deployments and StatefulSets it only warns), so each workload's pod
template is also dry-run as the Pod its controller would create.

Then a deliberately broken copy of the minikube overlay (a privileged container, an unknown field,
a Deployment whose selector does not match its pod template) goes through the same check, which
must reject it for each of the three reasons: proof that the check can fail.

Prints one line per check and `k8s dry run: N passed, M failed`; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ["minikube", "azure"]
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}


@dataclass
class Outcome:
    """What the API server said about one set of objects."""

    ok: bool
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class Cluster:
    def __init__(self, kubectl: str, kubeconfig: str) -> None:
        self.kubectl = kubectl
        self.kubeconfig = kubeconfig

    def run(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.kubectl, "--kubeconfig", self.kubeconfig, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def apply(self, docs: list[dict], *, dry_run: bool) -> Outcome:
        args = ["apply", "--validate=strict", "-f", "-"]
        if dry_run:
            args.insert(1, "--dry-run=server")
        proc = self.run(*args, stdin=yaml.safe_dump_all(docs, sort_keys=False))
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        warnings = [line for line in lines if line.startswith("Warning:")]
        errors = [line for line in lines if not line.startswith("Warning:")]
        return Outcome(proc.returncode == 0, warnings, errors)


def render(kubectl: str, overlay: str) -> list[dict]:
    proc = subprocess.run(
        [kubectl, "kustomize", str(ROOT / "kubernetes" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
    )
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def pods_of(docs: list[dict]) -> list[dict]:
    """The Pod each workload's controller would create from its template."""
    pods = []
    for doc in docs:
        if doc["kind"] not in WORKLOADS:
            continue
        template = copy.deepcopy(doc["spec"]["template"])
        meta = template.get("metadata", {})
        spec = template["spec"]
        if doc["kind"] == "StatefulSet":
            # The StatefulSet controller adds one volume per claim template, named after it.
            name = doc["metadata"]["name"]
            for claim in doc["spec"].get("volumeClaimTemplates", []):
                claim_name = claim["metadata"]["name"]
                spec.setdefault("volumes", []).append(
                    {"name": claim_name, "persistentVolumeClaim": {"claimName": f"{claim_name}-{name}-0"}}
                )
        pods.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": f"{doc['metadata']['name']}-pod-check",
                    "namespace": doc["metadata"].get("namespace"),
                    "labels": meta.get("labels", {}),
                    "annotations": meta.get("annotations", {}),
                },
                "spec": spec,
            }
        )
    return pods


class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def check(self, ok: bool, what: str, detail: str = "") -> bool:
        if ok:
            self.passed += 1
            print(f"ok: {what}")
        else:
            self.failed += 1
            print(f"FAILED: {what}" + (f"\n  {detail}" if detail else ""))
        return ok


def describe(outcome: Outcome) -> str:
    return "\n  ".join(outcome.errors + outcome.warnings) or "(nothing on stderr)"


def prepare_namespace(cluster: Cluster, docs: list[dict], report: Report, label: str) -> None:
    """Apply the Namespace for real (namespaced objects cannot be dry-run without it) and the
    service accounts the pods name (ServiceAccount admission looks them up). `default` is what the
    service account controller makes in every namespace; this API server runs no controllers."""
    namespaces = [d for d in docs if d["kind"] == "Namespace"]
    report.check(len(namespaces) == 1, f"{label}: renders exactly one Namespace")
    if not namespaces:
        return
    ns = namespaces[0]["metadata"]["name"]
    outcome = cluster.apply(namespaces, dry_run=False)
    report.check(outcome.ok and not outcome.warnings, f"{label}: namespace {ns} applied", describe(outcome))
    got = cluster.run("get", "namespace", ns, "-o", "jsonpath={.metadata.labels.pod-security\\.kubernetes\\.io/enforce}")
    report.check(
        got.returncode == 0 and got.stdout.strip() == "restricted",
        f"{label}: namespace {ns} is labelled pod-security.kubernetes.io/enforce=restricted on the server",
        got.stderr.strip() or f"label is {got.stdout.strip()!r}",
    )
    accounts = [d for d in docs if d["kind"] == "ServiceAccount"]
    accounts.append({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default", "namespace": ns}})
    outcome = cluster.apply(accounts, dry_run=False)
    report.check(outcome.ok, f"{label}: service accounts created", describe(outcome))


def accepted(cluster: Cluster, docs: list[dict]) -> tuple[bool, str]:
    """The check itself: every object, then every workload's Pod, accepted by a server-side dry
    run without a warning. Both steps always run, so a refusal names every reason."""
    whole = cluster.apply(docs, dry_run=True)
    pods = cluster.apply(pods_of(docs), dry_run=True)
    ok = whole.ok and not whole.warnings and pods.ok and not pods.warnings
    details = [describe(o) for o in (whole, pods) if not o.ok or o.warnings]
    return ok, "\n  ".join(details)


def broken_variants(docs: list[dict]) -> dict[str, tuple[list[dict], str]]:
    """name -> (broken copy, a fragment the API server's refusal must contain)."""

    def poll(d: list[dict]) -> dict:
        return next(x for x in d if x["kind"] == "Deployment" and x["metadata"]["name"] == "poll")

    privileged = copy.deepcopy(docs)
    ctx = poll(privileged)["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    ctx["privileged"] = True
    ctx["allowPrivilegeEscalation"] = True

    unknown = copy.deepcopy(docs)
    poll(unknown)["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"

    mismatch = copy.deepcopy(docs)
    poll(mismatch)["spec"]["selector"]["matchLabels"] = {"app.kubernetes.io/name": "not-poll"}

    return {
        "privileged container": (privileged, 'is forbidden: violates PodSecurity "restricted:latest": privileged'),
        "unknown field": (unknown, 'unknown field "spec.template.spec.containers[0].imagePullPolicyy"'),
        "selector mismatch": (mismatch, "`selector` does not match template `labels`"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--kubectl", default="kubectl")
    args = parser.parse_args()
    cluster = Cluster(args.kubectl, args.kubeconfig)
    report = Report()

    version = cluster.run("version", "-o", "yaml")
    server = yaml.safe_load(version.stdout or "{}").get("serverVersion", {}).get("gitVersion", "?")
    print(f"API server {server}")

    rendered = {overlay: render(args.kubectl, overlay) for overlay in OVERLAYS}
    for overlay, docs in rendered.items():
        prepare_namespace(cluster, docs, report, overlay)
        ok, detail = accepted(cluster, docs)
        kinds = sorted({d["kind"] for d in docs})
        report.check(
            ok,
            f"{overlay}: {len(docs)} objects ({', '.join(kinds)}) and {len(pods_of(docs))} workload pods "
            "accepted by --dry-run=server --validate=strict, no warning",
            detail,
        )

    for name, (docs, expected) in broken_variants(rendered["minikube"]).items():
        ok, detail = accepted(cluster, docs)
        report.check(
            not ok and expected in detail,
            f"broken copy ({name}) is rejected: {expected!r}",
            "accepted" if ok else detail,
        )

    print(f"k8s dry run: {report.passed} passed, {report.failed} failed")
    return 0 if report.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
