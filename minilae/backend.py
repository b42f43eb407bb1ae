"""The one place that chooses the array backend: NumPy (CPU) or CuPy (GPU).

Library code never imports NumPy or CuPy for array work; it asks for the array
module with :func:`xp` (the current backend) or :func:`array_module` (the module
an existing array belongs to). Moving data between host and device happens only
through :func:`asarray` (host -> backend) and :func:`to_numpy` (backend -> host),
which callers invoke explicitly.

The backend is chosen by :func:`set_backend`, or at import time by the
environment variable ``MINILAE_BACKEND`` (``numpy`` or ``cupy``; default ``numpy``).
"""
from __future__ import annotations

import os

import numpy

BACKENDS = ("numpy", "cupy")

_state = {"name": "numpy", "module": numpy, "dtype": numpy.float32}

_CUPY_HELP = (
    "the CuPy backend needs CuPy and a CUDA GPU. Install it with "
    "`pip install 'minilae[gpu]'` (CuPy for CUDA 12; see https://docs.cupy.dev "
    "for other CUDA versions), or use the NumPy backend: set_backend('numpy') "
    "or MINILAE_BACKEND=numpy."
)


class BackendError(RuntimeError):
    """Raised when a backend is unknown or cannot be used on this machine."""


def _load_cupy():
    """Import CuPy and check that a GPU is visible; raise BackendError otherwise."""
    try:
        import cupy  # noqa: PLC0415 - the only CuPy import in the library
    except ImportError as err:
        raise BackendError(f"CuPy is not installed: {_CUPY_HELP}") from err
    try:
        n_gpus = cupy.cuda.runtime.getDeviceCount()
    except Exception as err:  # CUDA driver missing or broken
        raise BackendError(f"CuPy is installed but no CUDA device is usable ({err}): {_CUPY_HELP}") from err
    if n_gpus < 1:
        raise BackendError(f"CuPy is installed but no CUDA GPU was found: {_CUPY_HELP}")
    return cupy


def set_backend(name: str):
    """Select the array backend by name ('numpy' or 'cupy') and return its module."""
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    name = name.lower()
    module = numpy if name == "numpy" else _load_cupy()
    _state.update(name=name, module=module)
    return module


def get_backend() -> str:
    """Name of the current backend."""
    return _state["name"]


def xp():
    """The array module of the current backend (numpy or cupy)."""
    return _state["module"]


def array_module(*arrays):
    """The array module that the given arrays live in (cupy if any is a CuPy array)."""
    for a in arrays:
        if type(a).__module__.split(".")[0] == "cupy":
            return _state["module"] if _state["name"] == "cupy" else _load_cupy()
    return numpy


def set_default_dtype(dtype):
    """Floating dtype used for new parameters (float32 for speed, float64 for checks)."""
    dtype = numpy.dtype(dtype)
    if dtype.kind != "f":
        raise BackendError(f"default dtype must be a floating type, got {dtype}")
    _state["dtype"] = dtype.type


def get_default_dtype():
    """Floating dtype used for new parameters."""
    return _state["dtype"]


def asarray(a, dtype=None):
    """Host (or backend) array -> array on the current backend: an explicit transfer."""
    return xp().asarray(a, dtype=dtype)


def to_numpy(a):
    """Backend array -> NumPy array on the host: an explicit transfer."""
    if type(a).__module__.split(".")[0] == "cupy":
        return a.get()
    return numpy.asarray(a)


def cupy_available() -> tuple[bool, str]:
    """(True, '') when CuPy and a GPU can be used, else (False, reason) - for test skips."""
    try:
        _load_cupy()
    except BackendError as err:
        return False, str(err)
    return True, ""


if os.environ.get("MINILAE_BACKEND"):
    set_backend(os.environ["MINILAE_BACKEND"])
