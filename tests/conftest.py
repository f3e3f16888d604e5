"""Shared test fixtures: paths to committed fixtures and an isolated cache directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ chatter out of reports

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Point IMAGEREC_CACHE_DIR at a fresh folder so no test reads or writes ~/.cache."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("IMAGEREC_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(scope="session")
def cifar_small() -> Path:
    """32x32 CIFAR-10 training JPEGs, 8 per class, in root/<class>/NNNN.jpg layout."""
    return FIXTURES / "cifar_small"
