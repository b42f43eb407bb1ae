"""The one place that chooses the array backend: NumPy (CPU) or CuPy (GPU).

Library code never imports NumPy or CuPy for array work; it asks for the array
module with :func:`xp` (the current backend) or :func:`array_module` (the module
an existing array belongs to). Moving data between host and device happens only
through :func:`asarray` (host -> backend) and :func:`to_numpy` (backend -> host),
which callers invoke explicitly.

The backend is chosen by :func:`set_backend`, or by the environment variable
``MINILAE_BACKEND`` (``numpy`` or ``cupy``; default ``numpy``), which is read at import but
loaded on first use: a missing CuPy raises its BackendError there (or at an explicit
``set_backend``), never at ``import minilae``. ``guard`` is a testing backend (see
:mod:`minilae._guard`): NumPy arrays that refuse implicit host conversions as CuPy does.
"""
from __future__ import annotations

import os

import numpy

BACKENDS = ("numpy", "cupy")
TESTING_BACKENDS = ("guard",)
"""Accepted by set_backend for tests and CI, not offered to users (see minilae._guard)."""

_state = {"name": "numpy", "module": numpy, "dtype": numpy.float32, "pending": None}

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


def _load_guard():
    from . import _guard  # noqa: PLC0415 - only tests load it
    return _guard.namespace


def set_backend(name: str):
    """Select the array backend by name ('numpy' or 'cupy'; 'guard' for tests) and return its module."""
    if not isinstance(name, str) or name.lower() not in BACKENDS + TESTING_BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)} "
                           f"(or {', '.join(TESTING_BACKENDS)}, the testing backend)")
    name = name.lower()
    module = {"numpy": lambda: numpy, "cupy": _load_cupy, "guard": _load_guard}[name]()
    _state.update(name=name, module=module, pending=None)
    return module


def _resolve_pending():
    """Load the backend MINILAE_BACKEND named, on first use; it raises again on every use until it loads."""
    if _state["pending"] is not None:
        set_backend(_state["pending"])


def get_backend() -> str:
    """Name of the current backend."""
    _resolve_pending()
    return _state["name"]


def xp():
    """The array module of the current backend (numpy, cupy, or the guard's namespace)."""
    _resolve_pending()
    return _state["module"]


def _is_guard(a):
    return type(a).__module__ == "minilae._guard"


def array_module(*arrays):
    """The array module that the given arrays live in (cupy or the guard if any array is theirs, else numpy)."""
    for a in arrays:
        if type(a).__module__.split(".")[0] == "cupy":
            return _state["module"] if _state["name"] == "cupy" else _load_cupy()
        if _is_guard(a):
            return _load_guard()
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
    """Host (or backend) array -> array on the current backend: an explicit transfer.

    On a device it is a copy; on NumPy it may be the input itself, so copy before changing either.
    """
    return xp().asarray(a, dtype=dtype)


def to_numpy(a):
    """Backend array -> NumPy array on the host: an explicit transfer (on NumPy possibly the input itself)."""
    if type(a).__module__.split(".")[0] == "cupy" or _is_guard(a):
        return a.get()
    return numpy.asarray(a)


def cupy_available() -> tuple[bool, str]:
    """(True, '') when CuPy and a GPU can be used, else (False, reason) - for test skips."""
    try:
        _load_cupy()
    except BackendError as err:
        return False, str(err)
    return True, ""


_state["pending"] = os.environ.get("MINILAE_BACKEND") or None
