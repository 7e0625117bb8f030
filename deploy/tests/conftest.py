"""Fixtures for the deployment tests (run them through scripts/check-deploy)."""

from __future__ import annotations

from pathlib import Path

import pytest

import deploylib as dl


@pytest.fixture(scope="session")
def kubectl() -> str:
    return dl.require_tool("kubectl", "KUBECTL")


@pytest.fixture(scope="session")
def rendered_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rendered")


_cache: dict[str, dl.Manifests] = {}


@pytest.fixture(scope="session")
def render(kubectl: str, rendered_dir: Path):
    """render(target) -> Manifests for 'base' or an overlay, rendered once."""

    def _render(target: str) -> dl.Manifests:
        if target not in _cache:
            text = dl.render(kubectl, target)
            (rendered_dir / f"{target}.yaml").write_text(text)
            _cache[target] = dl.Manifests(target, text)
        return _cache[target]

    return _render


@pytest.fixture(scope="session")
def rendered_file(render, rendered_dir: Path):
    """rendered_file(target) -> path of the rendered YAML on disk."""

    def _file(target: str) -> Path:
        render(target)
        return rendered_dir / f"{target}.yaml"

    return _file


@pytest.fixture(params=dl.OVERLAYS)
def overlay(request: pytest.FixtureRequest, render) -> dl.Manifests:
    return render(request.param)


@pytest.fixture(scope="session")
def compose() -> dict:
    return dl.load_compose()
