"""The backend switch: names, errors without CuPy, dtype default, explicit transfers; and, where
CuPy and a GPU exist, layers on CuPy agree with NumPy."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest

from minilae.backend import (BackendError, array_module, asarray, cupy_available, get_backend,
                             get_default_dtype, set_backend, set_default_dtype, to_numpy, xp)

CUPY_OK, CUPY_REASON = cupy_available()


def test_numpy_backend_by_name():
    assert set_backend("numpy") is np
    assert get_backend() == "numpy" and xp() is np
    assert set_backend("NumPy") is np  # names are case-insensitive


@pytest.mark.parametrize("name", ["torch", "", "gpu", None, 3])
def test_unknown_backend_name(name):
    with pytest.raises(BackendError, match=r"unknown backend .*choose one of numpy, cupy"):
        set_backend(name)
    assert get_backend() == "numpy"


def test_cupy_not_installed(monkeypatch):
    """Simulate a machine without CuPy: a clear BackendError with the install hint; NumPy stays on."""
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    with pytest.raises(BackendError, match=r"CuPy is not installed.*pip install 'minilae\[gpu\]'"):
        set_backend("cupy")
    assert get_backend() == "numpy" and xp() is np
    ok, reason = cupy_available()
    assert not ok and "CuPy is not installed" in reason


def _fake_cupy(device_count):
    runtime = types.SimpleNamespace(getDeviceCount=device_count)
    return types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime))


def _no_driver():
    raise RuntimeError("cudaErrorNoDevice")


@pytest.mark.parametrize("device_count, match", [
    (lambda: 0, "no CUDA GPU was found"),
    (_no_driver, r"no CUDA device is usable \(cudaErrorNoDevice\)"),
])
def test_cupy_without_gpu(monkeypatch, device_count, match):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(device_count))
    with pytest.raises(BackendError, match=match):
        set_backend("cupy")
    assert get_backend() == "numpy"
    ok, reason = cupy_available()
    assert not ok and re.search(match, reason)


def test_cupy_available_matches_set_backend():
    ok, reason = cupy_available()
    assert isinstance(ok, bool) and isinstance(reason, str)
    if ok:
        assert reason == ""
    else:
        assert reason, "an unavailable backend must say why"
        with pytest.raises(BackendError):
            set_backend("cupy")


@pytest.mark.parametrize("value, expected", [
    ("numpy", "numpy\n"),
    ("bogus", "unknown backend 'bogus'"),
])
def test_environment_variable_picks_the_backend(value, expected):
    env = dict(os.environ, MINILAE_BACKEND=value)
    run = subprocess.run([sys.executable, "-c", "import minilae; print(minilae.get_backend())"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert expected in (run.stdout if run.returncode == 0 else run.stderr)
    assert (run.returncode == 0) == (value == "numpy")


def test_default_dtype():
    """The conftest fixture sets float64; float32 can be chosen; non-floats are refused."""
    assert get_default_dtype() == np.float64
    set_default_dtype(np.float32)
    assert get_default_dtype() == np.float32
    from minilae.layers import Linear
    assert Linear(2, 2).weight.dtype == np.float32
    set_default_dtype("float64")
    assert Linear(2, 2).weight.dtype == np.float64
    with pytest.raises(BackendError, match="floating type"):
        set_default_dtype(np.int32)


def test_explicit_transfers_on_numpy(rng):
    a = rng.standard_normal((3, 2))
    b = asarray(a)
    assert isinstance(b, np.ndarray) and np.array_equal(b, a)
    assert asarray([1, 2], dtype=np.float32).dtype == np.float32
    assert isinstance(to_numpy(b), np.ndarray) and np.array_equal(to_numpy(b), a)
    assert array_module(a, b) is np and array_module() is np


# ---- CuPy: the same layers on the GPU give the same numbers ------------------------------------

def gpu(test):
    """Mark a test as needing CuPy and a GPU; skipped with the reason (visible under `pytest -rs`)."""
    return pytest.mark.gpu(pytest.mark.skipif(not CUPY_OK, reason=f"CuPy backend unavailable: {CUPY_REASON}")(test))


@gpu
def test_cupy_backend_switch():
    import cupy  # noqa: PLC0415
    assert set_backend("cupy") is cupy and xp() is cupy and get_backend() == "cupy"
    a = asarray(np.arange(3.0))
    assert isinstance(a, cupy.ndarray) and array_module(a) is cupy
    assert isinstance(to_numpy(a), np.ndarray)
    set_backend("numpy")


def _gpu_model(rng):
    from minilae.layers import (Conv2d, Flatten, Linear, MaxPool2d, ReLU, Reshape, Sequential,  # noqa: PLC0415
                                Sigmoid, Tanh, Upsample)
    return Sequential(Conv2d(2, 3, 3, padding=1, rng=rng), Tanh(), MaxPool2d(2),
                      Conv2d(3, 4, (2, 3), stride=(2, 1), padding=(1, 1), rng=rng), ReLU(),
                      Flatten(), Linear(24, 5, rng=rng), Sigmoid(), Linear(5, 32, rng=rng),
                      Reshape(2, 4, 4), Upsample(2), Conv2d(2, 1, 3, padding=1, rng=rng))


@gpu
def test_layers_on_cupy_match_numpy(rng):
    """Forward, both products (K > 1 too) and the dense Jacobians agree to float64 round-off."""
    from minilae.gradcheck import assert_close  # noqa: PLC0415
    model_np = _gpu_model(np.random.default_rng(5))
    x = rng.standard_normal((3, 2, 8, 8))
    v = rng.standard_normal((3, 4, 1, 8, 8))
    y_np = model_np(x)
    ref = (y_np, model_np.vjp_input(v), model_np.vjp_params(v, per_sample=True), model_np.vjp_params(v[:, 0]))
    dense = (model_np.jac_input(x[:1]), model_np.jac_params(x[:1]))

    set_backend("cupy")
    model_cp = _gpu_model(np.random.default_rng(5))
    model_cp.set_params(asarray(to_numpy(model_np.get_params())))
    xc, vc = asarray(x), asarray(v)
    got = (model_cp(xc), model_cp.vjp_input(vc), model_cp.vjp_params(vc, per_sample=True),
           model_cp.vjp_params(vc[:, 0]))
    got_dense = (model_cp.jac_input(xc[:1]), model_cp.jac_params(xc[:1]))
    set_backend("numpy")
    for name, a, b in zip(["forward", "J_in^T V", "per-sample J_p^T V", "sum J_p^T v", "J_in", "J_p"],
                          got + got_dense, ref + dense):
        assert type(a).__module__.startswith("cupy"), f"{name} left the GPU"
        assert_close(to_numpy(a), b, 1e-12, f"cupy vs numpy {name}")
