"""Shared fixtures: a key cache for real-key tests (tests only: insecure) and seeded RNGs.

Importing `fhe_backend` here replaces concrete-python's exit callback (see
`fhe_backend.exit_status`): without it, any test that simulates a circuit makes the pytest
process exit 0 whatever the outcome, and CI could not fail.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import fhe_backend

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
fhe_backend.keep_exit_status()

KEY_CACHE = os.path.join(os.path.dirname(__file__), "..", ".keys")


@pytest.fixture
def insecure_configuration():
    """A Configuration that caches keys on disk (INSECURE: for tests only)."""
    from concrete import fhe

    return fhe.Configuration(
        enable_unsafe_features=True, use_insecure_key_cache=True, insecure_key_cache_location=KEY_CACHE
    )


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield
