"""Static checks of the Dockerfile and .dockerignore. The images themselves are
built and run by scripts/check-deploy-live (a real Docker engine)."""

from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import deploylib as dl


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages) with continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest.strip(), re.IGNORECASE)
            assert match, f"unparsed FROM {rest}"
            base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), match.group(1))
            stages.append(Stage(base, match.group(2)))
        elif keyword == "ARG" and not stages:
            name, _, default = rest.strip().partition("=")
            args[name] = default
        else:
            stages[-1].instructions.append((keyword, rest.strip()))
    return args, stages


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse_dockerfile(dl.DOCKERFILE.read_text())


def stage_named(stages: list[Stage], name: str) -> Stage:
    for stage in stages:
        if stage.name == name:
            return stage
    raise KeyError(name)


def lineage(stages: list[Stage], name: str) -> list[Stage]:
    """The stage and the stages it builds FROM, nearest first."""
    chain, stage = [], stage_named(stages, name)
    while True:
        chain.append(stage)
        parents = [s for s in stages if s.name == stage.base]
        if not parents:
            return chain
        stage = parents[0]


def effective(chain: list[Stage], keyword: str) -> str | None:
    for stage in chain:
        for kw, value in reversed(stage.instructions):
            if kw == keyword:
                return value
    return None


@pytest.mark.parametrize("service", dl.SERVICES)
def test_final_target_minimal_nonroot_healthchecked(dockerfile, service: str) -> None:
    _, stages = dockerfile
    chain = lineage(stages, service)
    root = chain[-1].base
    assert root.startswith("gcr.io/distroless/") or root == "scratch", f"{service}: final image from {root}"
    assert ":nonroot" in root or effective(chain, "USER"), "non-root user"
    user = effective(chain, "USER")
    assert user and re.fullmatch(r"\d+(:\d+)?", user), f"numeric USER, got {user}"
    assert int(user.split(":")[0]) >= 10000
    health = effective(chain, "HEALTHCHECK")
    assert health, "HEALTHCHECK"
    cmd = json.loads(health[health.index("CMD") + 3 :].strip())
    assert cmd == [f"/app/{service}", "--health"], "exec form, no shell in the image"
    assert json.loads(effective(chain, "ENTRYPOINT")) == [f"/app/{service}"]
    assert effective(chain, "WORKDIR") == "/app"
    assert any(kw == "COPY" and re.search(r"\bconfig/?\s+/app/config/?$", v) for s in chain for kw, v in s.instructions)
    env = " ".join(v for s in chain for kw, v in s.instructions if kw == "ENV")
    assert re.search(r"\bPORT=8080\b", env)
    assert any(kw == "EXPOSE" and v == "8080" for s in chain for kw, v in s.instructions)


def test_builder_caches_dependencies_before_sources(dockerfile) -> None:
    args, stages = dockerfile
    builder = stage_named(stages, "builder")
    chef = lineage(stages, "builder")[-1]
    assert re.fullmatch(r"rust:1\.9\d+(\.\d+)?-\S+", chef.base), f"rust 1.9x builder, got {chef.base}"
    runs = [(i, v) for i, (kw, v) in enumerate(builder.instructions) if kw == "RUN"]
    copies = [(i, v) for i, (kw, v) in enumerate(builder.instructions) if kw == "COPY"]
    cook = next(i for i, v in runs if "cargo chef cook" in v)
    sources = next(i for i, v in copies if v.split()[0] == ".")
    build = next(i for i, v in runs if "cargo build" in v)
    assert cook < sources < build, "dependencies are built (and cached) before the sources are copied"
    assert "--bin poll" in builder.instructions[build][1] and "--bin vote" in builder.instructions[build][1]
    assert "--locked" in builder.instructions[build][1]


def test_no_latest_tags(dockerfile) -> None:
    _, stages = dockerfile
    names = {s.name for s in stages}
    for stage in stages:
        if stage.base in names or stage.base == "scratch":
            continue
        assert ":" in stage.base.split("/")[-1] and not stage.base.endswith(":latest"), stage.base


# ----------------------------------------------------------------- .dockerignore


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex (Go filepath.Match plus `**`)."""
    out, i = "", 0
    pattern = pattern.strip("/")
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a
    parent directory matches everything below it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _pattern_regex(pattern[1:] if negate else pattern)
        if any(regex.match(prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


def dockerignore_patterns() -> list[str]:
    lines = (dl.ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def workspace_members() -> list[str]:
    manifest = tomllib.loads((dl.ROOT / "Cargo.toml").read_text())
    return list(manifest["workspace"]["members"])


def test_dockerignore_keeps_every_build_input() -> None:
    patterns = dockerignore_patterns()
    needed = ["Cargo.toml", "Cargo.lock", "config/default.toml"]
    for member in workspace_members():
        needed.append(f"{member}/Cargo.toml")
        member_dir = dl.ROOT / member
        for dirpath, dirnames, filenames in os.walk(member_dir):
            dirnames[:] = [d for d in dirnames if d != "target"]
            needed += [str((Path(dirpath) / f).relative_to(dl.ROOT)) for f in filenames]
    kept_out = [p for p in needed if dockerignore_excludes(patterns, p)]
    assert not kept_out, f".dockerignore drops build inputs: {kept_out[:10]}"


@pytest.mark.parametrize(
    "path",
    [
        "target/debug/poll",
        "shared/target/x",
        ".git/HEAD",
        ".venv/deploy/bin/python",
        "kubernetes/base/poll.yaml",
        "deploy/tests/conftest.py",
        "data/poll.redb",
        "shared/poll.redb",
        ".env",
        "services/poll/.env",
    ],
)
def test_dockerignore_drops_the_rest(path: str) -> None:
    assert dockerignore_excludes(dockerignore_patterns(), path)
