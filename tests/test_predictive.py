"""Tests for minilae.predictive: moments over sampled networks, log p(x) and MSE, against direct loops."""
import numpy as np
import pytest
import scipy.stats

from minilae import backend
from minilae.hessian import MemoryBudgetError
from minilae.laplace import DiagonalLaplace
from minilae.models import mlp_autoencoder
from minilae.predictive import Pass, _Moments, predict, predict_decoder, predict_draws

IMAGE = (1, 3, 2)


def setup(rng, n_images=7):
    model = mlp_autoencoder(input_shape=IMAGE, latent_size=2, hidden=(5,), seed=1)
    theta = model.get_params()
    posterior = DiagonalLaplace(theta, backend.asarray(rng.gamma(1.0, 20.0, size=theta.size)), prior_precision=3.0)
    x = rng.uniform(0, 1, size=(n_images,) + IMAGE)
    return model, posterior, x  # x on the host, as predict takes it


def reference(model, posterior, x, K, rng):
    """Direct loop: K networks, stacked outputs, numpy mean/var, scipy log-density."""
    thetas = [posterior.sample(1, rng)[0] for _ in range(K)]
    zs, fs = [], []
    for th in thetas:
        model.set_params(th)
        zs.append(model.encode(backend.asarray(x)))
        fs.append(model.decode(zs[-1]))
    zs, fs = backend.to_numpy(backend.xp().stack(zs)), backend.to_numpy(backend.xp().stack(fs))
    log_p = scipy.stats.norm(fs, 1.0).logpdf(x[None]).reshape(K, len(x), -1).sum(axis=2).mean(axis=0)
    mse = ((x - fs.mean(axis=0)) ** 2).reshape(len(x), -1).mean(axis=1)
    return zs.mean(0), zs.var(0), fs.mean(0), fs.var(0), log_p, mse


@pytest.mark.parametrize("K, batch_size", [(1, 500), (13, 3)])
def test_prediction_matches_a_direct_loop(K, batch_size, rng):
    model, posterior, x = setup(rng)
    theta_before = model.get_params()
    expected = reference(model, posterior, x, K, backend.xp().random.default_rng(4))
    model.set_params(theta_before)
    pred = predict(model, x, posterior, n_samples=K, rng=4, batch_size=batch_size)  # networks from default_rng(4)
    for name, want in zip(("z_mean", "z_var", "x_mean", "x_var", "log_px", "mse"), expected, strict=True):
        np.testing.assert_allclose(backend.to_numpy(getattr(pred, name)), want, rtol=1e-10, atol=1e-14, err_msg=name)
    assert pred.n_samples == K
    np.testing.assert_array_equal(backend.to_numpy(model.get_params()), backend.to_numpy(theta_before))  # restored


def test_without_posterior_one_deterministic_network(rng):
    model, _, x = setup(rng)
    pred = predict(model, x).to_numpy()
    np.testing.assert_array_equal(pred.x_var, 0)
    np.testing.assert_array_equal(pred.z_var, 0)
    np.testing.assert_allclose(pred.x_mean, backend.to_numpy(model.forward(backend.asarray(x))), rtol=1e-15)
    assert pred.n_samples == 1
    summary = pred.summary()
    assert set(summary) == {"mse", "log_px", "x_var", "z_var", "n_images", "n_samples"}
    assert summary["x_var"] == 0 and summary["n_images"] == len(x)


def test_decoder_prediction_matches_the_full_prediction_on_codes(rng):
    """With no posterior the decoder at the encoder's codes gives the reconstruction."""
    model, posterior, x = setup(rng)
    x = backend.asarray(x)
    z = model.encode(x)
    mean, var = predict_decoder(model, z)
    np.testing.assert_allclose(backend.to_numpy(mean), backend.to_numpy(model.forward(x)), rtol=1e-14)
    np.testing.assert_array_equal(backend.to_numpy(var), 0)
    mean, var = predict_decoder(model, z, posterior, n_samples=50, rng=backend.xp().random.default_rng(0),
                                batch_size=2)
    assert mean.shape == var.shape == x.shape and (var > 0).all()


def test_welford_variance_survives_a_large_mean():
    """Values 1e8 + O(1e-3): E[x^2] - E[x]^2 in float64 loses every digit, Welford keeps about five."""
    rng = np.random.default_rng(0)
    values = 1e8 + 1e-3 * rng.standard_normal((200, 4))
    moments = _Moments(1, (4,))
    for k, v in enumerate(backend.asarray(values), start=1):
        moments.add(k, slice(0, 1), v[None])
    exact = (values - 1e8).var(axis=0)  # shift first: exact up to the representation of the inputs
    variance = backend.to_numpy(moments.variance)[0]
    np.testing.assert_allclose(variance, exact, rtol=1e-4)
    assert (variance >= 0).all()
    naive = (values ** 2).mean(axis=0) - values.mean(axis=0) ** 2
    assert np.abs(naive - exact).max() > 100 * exact.max()  # the cancellation this guards against


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_samples=0), "n_samples"), (dict(batch_size=0), "batch_size"), (dict(n_samples=2.5), "n_samples"),
])
def test_bad_arguments(kwargs, match, rng):
    model, posterior, x = setup(rng)
    with pytest.raises(ValueError, match=match):
        predict(model, x, posterior, **kwargs)


def test_bad_shapes(rng):
    model, posterior, x = setup(rng)
    with pytest.raises(ValueError, match="non-empty batch"):
        predict(model, x[:0], posterior)
    with pytest.raises(ValueError, match=r"z must have shape \(N, 2\)"):
        predict_decoder(model, backend.xp().zeros((3, 5)), posterior)


@pytest.mark.backends("guard")
def test_inputs_that_do_not_fit_are_streamed_in_chunks_with_the_same_networks(rng):
    """Bugs caught: predict moving all N images (or N-sized statistics) to the device when they do not fit,
    and a later chunk drawing other networks than the first. With a budget for ~20 inputs no device array
    holds more than a chunk, and the result equals the one-chunk prediction."""
    from minilae import _guard  # noqa: PLC0415
    model, posterior, x = setup(rng, n_images=100)
    whole = predict(model, x, posterior, n_samples=5, rng=3, batch_size=4).to_numpy()
    with _guard.watch() as seen:
        chunked = predict(model, x, posterior, n_samples=5, rng=3, batch_size=4, memory_budget=4000)
    assert seen["largest"] < x.size // 2, seen
    for name in ("z_mean", "z_var", "x_mean", "x_var", "log_px", "mse"):
        np.testing.assert_allclose(getattr(chunked, name), getattr(whole, name), rtol=1e-12, atol=1e-15, err_msg=name)


def test_a_budget_below_one_input_is_refused(rng):
    model, posterior, x = setup(rng)
    with pytest.raises(MemoryBudgetError, match="per input, more than the memory budget"):
        predict(model, x, posterior, n_samples=2, memory_budget=10)


class _OwnVarianceDraw:
    """A draw that predicts its own variances: z_k = k, z_var_k = k^2; x_k = 2k, x_var_k = 3; nll_k = k."""

    def __init__(self, k, n, d):
        self.k, self.n, self.d = k, n, d

    def reconstruct(self, x):
        xp, b = backend.xp(), x.shape[0]
        full = lambda value, shape: xp.full(shape, float(value))  # noqa: E731
        return Pass(full(self.k, (b, 2)), full(self.k**2, (b, 2)), full(2 * self.k, x.shape), full(3, x.shape),
                    full(self.k, (b,)))


def test_own_variances_add_by_the_law_of_total_variance(rng):
    """Catches a draw's own variance (ae-var's e^s, a VAE's encoder variance) dropped or averaged wrongly: for
    k = 1..4, Var[z] = Var_k k + E_k k^2 = 1.25 + 7.5, Var[x] = Var_k 2k + 3 = 5 + 3, log p = -E_k k = -2.5."""
    x = rng.uniform(size=(5,) + IMAGE)
    pred = predict_draws(lambda: (_OwnVarianceDraw(k, 5, 6) for k in range(1, 5)), x, 2, np.dtype("float64"),
                         batch_size=2).to_numpy()
    np.testing.assert_allclose(pred.z_mean, 2.5)
    np.testing.assert_allclose(pred.z_var, 1.25 + 7.5)
    np.testing.assert_allclose(pred.x_mean, 5.0)
    np.testing.assert_allclose(pred.x_var, 5.0 + 3.0)
    np.testing.assert_allclose(pred.log_px, -2.5)
    assert pred.n_samples == 4


def test_an_error_mid_prediction_puts_the_parameters_back(rng, monkeypatch):
    """Catches the sampled network left in the model when a prediction fails part-way: the draws' generator
    must be closed at once, not when it is garbage-collected - which never happens while the exception is kept
    (as a notebook keeps the last traceback; here: `failure`)."""
    model, posterior, x = setup(rng)
    theta = backend.to_numpy(model.get_params())
    calls = []
    real_decode = model.decode

    def failing_decode(z):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory, say")
        return real_decode(z)

    monkeypatch.setattr(model, "decode", failing_decode)
    with pytest.raises(RuntimeError, match="out of memory") as failure:
        predict(model, x, posterior, n_samples=5, rng=1)
    np.testing.assert_array_equal(backend.to_numpy(model.get_params()), theta)
    assert failure.value.__traceback__ is not None  # still held
