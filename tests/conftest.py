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


# --- training layer: the per-user feature cache goes to a temp folder, never the developer's home ---
@pytest.fixture(autouse=True, scope="session")
def _feature_cache_dir(tmp_path_factory):
    import os

    old = os.environ.get("PFEDSAM_CACHE_DIR")
    os.environ["PFEDSAM_CACHE_DIR"] = str(tmp_path_factory.mktemp("feature_cache"))
    yield
    if old is None:
        os.environ.pop("PFEDSAM_CACHE_DIR", None)
    else:
        os.environ["PFEDSAM_CACHE_DIR"] = old
