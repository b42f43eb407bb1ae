"""Shared fixtures: float64 parameters during every test (finite differences need it), a seeded rng,
and the one rule for tests that read the real MNIST/FashionMNIST files (:func:`require_data`)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from minilae import backend
from minilae.data import DATASETS, ENV_DATA


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


def in_ci() -> bool:
    """CI sets CI=true: there a missing prerequisite is a failure, not a skip."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require_data() -> Path:
    """The real-data root $MINILAE_DATA with MNIST/raw and FashionMNIST/raw.

    When they are missing the test is skipped with the reason (shown by `pytest -rs`), except in
    CI, where it fails: CI must never pass by silently skipping the real-data checks.
    """
    root = os.environ.get(ENV_DATA)
    missing = [] if not root else [f"{name}/raw" for name in DATASETS.values() if not (Path(root) / name / "raw").is_dir()]
    if root and not missing:
        return Path(root)
    problem = f"${ENV_DATA} is not set" if not root else f"${ENV_DATA}={root} has no {' or '.join(missing)}"
    reason = (f"real-data test: {problem}; point ${ENV_DATA} at the folder holding MNIST/raw and "
              "FashionMNIST/raw (python datasets.py fetches them)")
    if in_ci():
        pytest.fail(f"{reason} - CI=true, so missing data is an error", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    """require_data() as a fixture, for tests that take the data root as an argument."""
    return require_data()
