"""Shared fixtures: a key cache for real-key tests (tests only: insecure) and seeded RNGs."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")

KEY_CACHE = os.path.join(os.path.dirname(__file__), "..", ".keys")


@pytest.fixture
def insecure_configuration():
    """A Configuration that caches keys on disk (INSECURE: for tests only)."""
    from concrete import fhe

    return fhe.Configuration(enable_unsafe_features=True, use_insecure_key_cache=True,
                             insecure_key_cache_location=KEY_CACHE)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield
