"""Shared test helpers: where the reference fixtures and datasets live."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# Kernel choice by measurement is off in tests (results must not depend on timings); it is read once, when
# diffusekit.runtime.autotune is imported, and inherited by the command-line tools that tests start.
os.environ["DIFFUSEKIT_AUTOTUNE"] = "rules"

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


@pytest.fixture(scope="session")
def sd_folder(fixtures_dir: Path) -> Path:
    """The tiny Stable Diffusion pipeline folder of the shared fixtures."""
    return fixtures_dir / "pipelines" / "stable_diffusion"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread: thread start-up dominates, and a busy machine makes extra
    threads spin. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
