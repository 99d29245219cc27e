"""Shared fixtures: locations of the real-model zoo and a few tiny models built from ONNX text."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO.parent / "shared" / "zoo"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def zoo_dir() -> Path:
    """``../shared/zoo`` beside the repository; tests that need it skip when it is absent."""
    if not ZOO.is_dir():
        pytest.skip("../shared/zoo is not present")
    return ZOO
