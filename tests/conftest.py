"""Shared fixtures: where the real data live, and a skip when they do not."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("STHISTO_SHARED_DATA", REPO.parent / "shared" / "data")).resolve()


def _require(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(
            f"real data not found at {path}: these tests read ../shared/data next to the checkout "
            f"(or $STHISTO_SHARED_DATA); the data are never copied into the repository."
        )
    return path


@pytest.fixture(scope="session")
def her2st_dir() -> Path:
    """Root of the published her2st layout."""
    return _require("her2st")


@pytest.fixture(scope="session")
def visium_dir() -> Path:
    """Root of the Space Ranger reader fixtures."""
    return _require("visium")
