"""Shared test helpers: where the reference fixtures and datasets live."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import settings

# Property and fuzz tests draw the same examples on every run (derandomize): CI stays reproducible, and
# exploring new random inputs is done by hand with --hypothesis-profile=explore.
settings.register_profile("ci", derandomize=True, deadline=None, database=None)
settings.register_profile("explore", deadline=None)
settings.load_profile("ci")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FIXTURES = SHARED / "fixtures"
DATASETS = SHARED / "datasets"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"reference fixtures not found at {FIXTURES}")
    return FIXTURES


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    if not DATASETS.is_dir():
        pytest.skip(f"datasets not found at {DATASETS}")
    return DATASETS
