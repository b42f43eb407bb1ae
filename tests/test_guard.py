"""The guard backend refuses host/device slips exactly where CuPy does, allows what CuPy allows, counts
device syncs and transfers; and the command line runs under it end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from minilae import _guard, backend

pytestmark = pytest.mark.backends("guard")


@pytest.fixture
def g(rng):
    return backend.asarray(rng.standard_normal((3, 4)))


@pytest.mark.parametrize("slip", [
    lambda g: np.asarray(g),
    lambda g: np.array(g),
    lambda g: np.testing.assert_allclose(g, g),
    lambda g: float(g),  # more than one element
], ids=["np.asarray", "np.array", "np.testing", "float of many"])
def test_implicit_device_to_host_conversions_raise(g, slip):
    """Bug caught: a GuardArray that hands NumPy its data (__array__), so np.asarray on a device array passes."""
    with pytest.raises((TypeError, ValueError), match="Implicit conversion to a NumPy array|only 0-dimensional"):
        slip(g)


@pytest.mark.parametrize("slip", [
    lambda g, h: g + h, lambda g, h: h + g, lambda g, h: h @ g.T, lambda g, h: np.add(g, h),
    lambda g, h: np.maximum(h, g), lambda g, h: np.concatenate([g, h]), lambda g, h: backend.xp().stack([g, h]),
    lambda g, h: np.where(g > 0, h, 0.0),
], ids=["g+h", "h+g", "h@g", "np.add", "np.maximum", "np.concatenate", "xp.stack", "np.where"])
def test_mixing_host_and_device_arrays_raises(g, slip):
    """Bug caught: an operator, ufunc or function that quietly computes with a host ndarray next to a device array."""
    with pytest.raises(TypeError, match="Unsupported type <class 'numpy.ndarray'>"):
        slip(g, np.ones((3, 4)))


def test_setitem_with_a_host_array_raises_except_a_full_slice(g):
    """Bug caught: g[i] = host_array accepted (CuPy refuses all but g[:] = host_array)."""
    with pytest.raises(ValueError, match="non-scalar numpy.ndarray cannot be used for fill"):
        g[0] = np.ones(4)
    g[:] = np.ones((3, 4))
    g[0, 1] = 2.0
    assert backend.to_numpy(g)[0].tolist() == [1.0, 2.0, 1.0, 1.0]


@pytest.mark.parametrize("name", ["normal", "permutation", "choice", "shuffle"])
def test_numpy_only_generator_methods_are_refused(name):
    """Bug caught: a device Generator offering NumPy methods CuPy's lacks (code using them fails on a GPU)."""
    rng = backend.xp().random.default_rng(0)
    with pytest.raises(AttributeError, match=f"no attribute '{name}'"):
        getattr(rng, name)
    assert rng.standard_normal((2,), dtype=np.float32).dtype == np.float32


def test_array_flags_are_cupys_three(g):
    """cupy.ndarray.flags has c_contiguous, f_contiguous and owndata only: code reading flags.writeable (as
    Layer.set_params once did) would fail on a GPU, and must fail here."""
    assert g.flags.c_contiguous and g.flags["C_CONTIGUOUS"] and g.flags.owndata and not g.flags.f_contiguous
    with pytest.raises(AttributeError):
        g.flags.writeable


def test_numpy_functions_cupy_lacks_are_refused(g):
    """Bug caught: NumPy-only API (here the business-day functions) reached through xp() or np.<function>."""
    with pytest.raises(AttributeError, match="module 'cupy' has no attribute 'busday_count'"):
        backend.xp().busday_count
    with pytest.raises(TypeError, match="CuPy has no such function"):
        np.busday_count(g.astype("datetime64[D]"), g.astype("datetime64[D]"))


def test_what_cupy_allows_works_and_stays_on_the_device(g):
    """Host scalars, host index arrays, NumPy ufuncs on device arrays, reductions to 0-d arrays."""
    xp = backend.xp()
    for value in (2.0 * g, np.float64(2.0) * g, np.tanh(g), g[np.array([0, 2])], xp.einsum("ij,kj->ik", g, g),
                  g.sum(), np.linalg.norm(g), xp.linalg.eigh(g @ g.T)[0]):
        assert isinstance(value, _guard.GuardArray)
    assert g.sum().shape == ()  # a 0-d device array, as CuPy returns, not a NumPy scalar


def test_syncs_and_transfers_are_counted(g):
    """Bug caught: a sync (float/bool of a device scalar) or a transfer that the counters miss."""
    with _guard.watch() as seen:
        host = np.ones(5)
        d = backend.asarray(host)
        assert bool((d > 0).all())
        float(d.sum())
        f"{d.max():.2f}"
        backend.to_numpy(d)
    assert seen == {"syncs": 3, "to_device": 1, "to_host": 1, "largest": 5}
    host[0] = 7.0  # asarray copied: the device array does not see later host changes
    assert float(d[0]) == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("method, extra", [
    ("online", []), ("posthoc", ["--no-plots", "--hessian", "mixed", "--hessian-threshold", "64"])])
def test_the_command_line_runs_under_the_guard(method, extra, tmp_path):
    """A short `python -m minilae.train` (conv AE: training, posterior, evaluation, figures) with
    MINILAE_BACKEND=guard: every host/device slip on the CLI path fails here, on a CPU."""
    env = {**os.environ, "MINILAE_BACKEND": "guard", "MPLBACKEND": "Agg"}
    out = tmp_path / "run"
    args = ["--method", method, "--model", "conv", "--limit-train", "96", "--limit-val", "32", "--epochs", "1",
            "--samples", "2", "--batch-size", "32", "--quiet", "--out", str(out), *extra]
    run = subprocess.run([sys.executable, "-m", "minilae.train", *args], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["backend"] == "guard" and metrics["posterior"]["num_params"] > 0
    assert (out / "latent.png").is_file() == (method == "online")
