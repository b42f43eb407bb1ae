"""Shared fixtures: every test runs once per array backend, with float64 parameters and a seeded rng;
and the one rule for tests that read the real MNIST/FashionMNIST files (:func:`require_data`).

Backends: numpy and guard always (the guard, minilae._guard, refuses host/device slips as CuPy
does, so CI proves the device path without a GPU), cupy where CuPy and a GPU are present.
MINILAE_TEST_BACKENDS=numpy,cupy (a comma list) picks them explicitly; a requested backend that
cannot run is an error, not a skip. `@pytest.mark.backends("numpy", ...)` restricts a test (or a
module, via pytestmark) to some backends, e.g. host-only file parsing or a CLI that picks its own.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from minilae import backend
from minilae.data import DATASETS, ENV_DATA

CUPY_OK, CUPY_REASON = backend.cupy_available()


def suite_backends() -> list:
    """Backends the suite runs on: MINILAE_TEST_BACKENDS, else numpy, guard (and cupy when usable)."""
    requested = os.environ.get("MINILAE_TEST_BACKENDS")
    if not requested:
        return ["numpy", "guard"] + (["cupy"] if CUPY_OK else [])
    names = [n.strip().lower() for n in requested.split(",") if n.strip()]
    unknown = set(names) - set(backend.BACKENDS + backend.TESTING_BACKENDS)
    if unknown or not names:
        raise pytest.UsageError(f"MINILAE_TEST_BACKENDS={requested!r}: choose from numpy, guard, cupy")
    if "cupy" in names and not CUPY_OK:
        raise pytest.UsageError(f"MINILAE_TEST_BACKENDS asks for cupy, which cannot run here: {CUPY_REASON}")
    return names


BACKENDS = suite_backends()


def pytest_report_header(config):
    skipped = "" if "cupy" in BACKENDS else f"; cupy not run: {CUPY_REASON}"
    return f"minilae backends: {', '.join(BACKENDS)}{skipped}"


def pytest_configure(config):
    config.addinivalue_line("markers", "backends(*names): run only on these of the suite's backends")


def pytest_generate_tests(metafunc):
    if "array_backend" in metafunc.fixturenames:
        only = metafunc.definition.get_closest_marker("backends")
        names = [pytest.param(n, marks=pytest.mark.gpu) if n == "cupy" else n
                 for n in BACKENDS if only is None or n in only.args]
        if not names:  # e.g. MINILAE_TEST_BACKENDS=cupy for a numpy-only test: skipped, with the reason
            names = [pytest.param("numpy", marks=pytest.mark.skip(
                reason=f"runs on {', '.join(only.args)} only; this session runs {', '.join(BACKENDS)}"))]
        metafunc.parametrize("array_backend", names, indirect=True, scope="function")


@pytest.fixture(autouse=True)
def array_backend(request):
    """The test's backend is current while it runs; numpy (and the previous dtype) come back afterwards."""
    name = getattr(request, "param", "numpy")
    old_dtype = backend.get_default_dtype()
    backend.set_backend(name)
    backend.set_default_dtype(np.float64)  # finite differences need float64
    yield name
    backend.set_default_dtype(old_dtype)
    backend.set_backend("numpy")


@pytest.fixture
def rng():
    """A fixed-seed host generator, fresh for every test (tests do not depend on each other's draws)."""
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
