"""Shared pytest fixtures (keep each small; add yours below the existing ones)."""

from __future__ import annotations

from pathlib import Path

import pytest

# --- data layer: the real multi-site data beside the repository (../shared/data), read in place ---
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data; skips the test when it is absent (e.g. a user's fresh clone)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (../shared/data beside the repository)")
    return SHARED_DATA
