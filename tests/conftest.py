"""Shared fixtures: float64 parameters during every test (finite differences need it) and a seeded rng."""
from __future__ import annotations

import numpy as np
import pytest

from minilae import backend


@pytest.fixture(autouse=True)
def float64_default():
    """New parameters are float64 inside a test; the previous dtype and backend come back afterwards."""
    old_dtype, old_backend = backend.get_default_dtype(), backend.get_backend()
    backend.set_default_dtype(np.float64)
    yield
    backend.set_default_dtype(old_dtype)
    if backend.get_backend() != old_backend:
        backend.set_backend(old_backend)


@pytest.fixture
def rng():
    """A fixed-seed generator, fresh for every test (tests do not depend on each other's draws)."""
    return np.random.default_rng(20221128)
