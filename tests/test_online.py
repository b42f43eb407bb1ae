"""Tests for minilae.online: the online LAE step (eq. 10-11) and a short run on real MNIST."""
import copy
import math
import os

import numpy as np
import pytest

from minilae import backend, curvature
from minilae import online as online_module
from minilae.gradcheck import assert_close, numerical_gradient
from minilae.losses import Gaussian
from minilae.models import mlp_autoencoder
from minilae.online import OnlineLaplace
from minilae.optim import SGD
from minilae.predictive import predict
from minilae.training import TrainingDivergedError, fit, reconstruction_mse

IMAGE = (1, 2, 3)
N_DATA = 50


def tiny_autoencoder(seed=0):
    """An MLP autoencoder small enough for dense GGNs (P = 80)."""
    return mlp_autoencoder(input_shape=IMAGE, latent_size=2, hidden=(4,), seed=seed)


def batch(rng, B=5):
    return backend.asarray(rng.uniform(0, 1, size=(B,) + IMAGE))


def dense_ggn_diag(model, x, theta):
    """diag(sum_b J_b^T H_out J_b) at theta from the dense Jacobian (independent of minilae.hessian)."""
    model.set_params(theta)
    return backend.xp().diag(curvature.ggn(model, Gaussian(1.0), x, x))


def mean_nll(model, x, theta):
    model.set_params(theta)
    return Gaussian(1.0).nll(model.forward(x), x).mean()


@pytest.mark.parametrize("alpha, prior_precision", [(1e-3, 1.0), (0.3, 4.0)])
def test_one_step_is_eq_10_and_11(alpha, prior_precision, rng):
    model = tiny_autoencoder()
    x = batch(rng)
    B, lr = x.shape[0], 1e-2
    trainer = OnlineLaplace(model, N_DATA, alpha, prior_precision, hessian="exact",
                            optimizer=online_module.Adam(lr=lr))
    theta0 = model.get_params()
    noise_rng, replay = (backend.xp().random.default_rng(3) for _ in range(2))

    trainer.step(x, noise_rng)
    assert (model.get_params() == trainer.theta).all()  # the model holds the mean again

    H0 = N_DATA / B * dense_ggn_diag(model, x, theta0) / alpha  # the recursion's stationary start
    eps = replay.standard_normal((1, theta0.size))[0]
    theta_s = theta0 + eps / np.sqrt(H0 + prior_precision)
    g = numerical_gradient(lambda th: mean_nll(model, x, th).reshape(1), theta_s.copy())
    theta1 = theta0 - lr * g / (np.abs(g) + 1e-8)  # Adam's first step: m_hat = g, v_hat = g^2
    H1 = (1 - alpha) * H0 + N_DATA / B * dense_ggn_diag(model, x, theta_s)

    assert_close(trainer.theta, theta1, 1e-6, "theta_1 (eq. 10)")
    assert_close(trainer.H, H1, 1e-10, "H_1 (eq. 11)")


def test_precision_stays_positive_and_bounded_over_many_steps(rng):
    model = tiny_autoencoder()
    trainer = OnlineLaplace(model, N_DATA, alpha=0.5, prior_precision=2.0, hessian="approx")
    for _ in range(30):
        trainer.step(batch(rng), backend.xp().random.default_rng(1))
        post = trainer.posterior()
        assert np.isfinite(post.precision).all()
        assert (post.precision >= 2.0).all()
        assert (post.variance > 0).all() and (post.variance <= 0.5).all()


def test_several_samples_average_gradient_and_ggn(rng):
    """With n_samples = 3 the update uses the mean of three per-sample GGNs."""
    model = tiny_autoencoder()
    x = batch(rng)
    trainer = OnlineLaplace(model, N_DATA, alpha=0.2, hessian="exact", n_samples=3)
    theta0 = model.get_params()
    noise_rng, replay = (backend.xp().random.default_rng(5) for _ in range(2))
    trainer.step(x, noise_rng)
    H0 = N_DATA / 5 * dense_ggn_diag(model, x, theta0) / 0.2
    thetas = theta0 + replay.standard_normal((3, theta0.size)) / np.sqrt(H0 + 1.0)
    G = backend.xp().stack([dense_ggn_diag(model, x, th) for th in thetas]).mean(axis=0)
    assert_close(trainer.H, 0.8 * H0 + N_DATA / 5 * G, 1e-10, "H_1 with three samples")


def test_state_dict_round_trip_continues_identically(rng):
    xs = [batch(rng) for _ in range(4)]
    a = OnlineLaplace(tiny_autoencoder(), N_DATA, alpha=0.1)
    for x in xs[:2]:
        a.step(x, backend.xp().random.default_rng(0))
    b = OnlineLaplace(tiny_autoencoder(seed=9), N_DATA, alpha=0.9)  # different init, replaced by the state
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for x in xs[2:]:
        a.step(x, backend.xp().random.default_rng(1))
        b.step(x, backend.xp().random.default_rng(1))
    np.testing.assert_array_equal(backend.to_numpy(a.theta), backend.to_numpy(b.theta))
    np.testing.assert_array_equal(backend.to_numpy(a.H), backend.to_numpy(b.H))


def test_nan_in_the_ggn_stops_with_the_step(rng, monkeypatch):
    model = tiny_autoencoder()
    trainer = OnlineLaplace(model, N_DATA, alpha=0.1)
    real = online_module.ggn_diagonal
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        G = real(*args, **kwargs)
        return G * np.nan if calls["n"] == 4 else G  # call 1 is H_0, calls 2-4 are steps 1-3

    monkeypatch.setattr(online_module, "ggn_diagonal", flaky)
    trainer.step(batch(rng), backend.xp().random.default_rng(0))
    trainer.step(batch(rng), backend.xp().random.default_rng(0))
    with pytest.raises(TrainingDivergedError, match="step 3.*batch GGN.*non-finite"):
        trainer.step(batch(rng), backend.xp().random.default_rng(0))


def test_negative_ggn_beyond_round_off_is_an_error(rng, monkeypatch):
    real = online_module.ggn_diagonal
    monkeypatch.setattr(online_module, "ggn_diagonal", lambda *a, **k: real(*a, **k) - 1.0)
    with pytest.raises(TrainingDivergedError, match="negative diagonal entry"):
        OnlineLaplace(tiny_autoencoder(), N_DATA, alpha=0.1).step(batch(rng), backend.xp().random.default_rng(0))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_exploding_parameters_stop_with_the_step(rng):
    """SGD with an absurd learning rate: the error names the step where the numbers left float64."""
    trainer = OnlineLaplace(tiny_autoencoder(), N_DATA, alpha=0.1, optimizer=SGD(lr=1e300))
    with pytest.raises(TrainingDivergedError, match=r"step \d+"):
        for _ in range(10):
            trainer.step(batch(rng) * 1e3, backend.xp().random.default_rng(0))


@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha=0.0), "alpha"), (dict(alpha=1.5), "alpha"), (dict(prior_precision=0.0), "prior_precision"),
    (dict(hessian="full"), "Hessian method"), (dict(n_samples=0), "n_samples"), (dict(n_data=0), "n_data"),
])
def test_bad_arguments(kwargs, match):
    args = {"n_data": N_DATA, **kwargs}
    with pytest.raises(ValueError, match=match):
        OnlineLaplace(tiny_autoencoder(), **args)


# ----------------------------------------------------------------------------------------------
# real data

def _data_root():
    root = os.environ.get("MINILAE_DATA")
    if not root:
        pytest.fail("set MINILAE_DATA to the folder with MNIST/ and FashionMNIST/ (CI: ../shared/data)")
    return root


@pytest.mark.slow
@pytest.mark.backends("numpy", "cupy")  # the longest test; on the guard, tutorial 04 and the CLI test run this path
def test_short_run_on_mnist_learns_and_is_uncertain_on_fashionmnist():
    from minilae.data import load_dataset
    from minilae.models import mlp_autoencoder as mlp

    backend.set_default_dtype(np.float32)  # the production dtype; the fixture restores float64
    root = _data_root()
    x_train, _ = load_dataset("mnist", "train", root=root)
    x_val, _ = load_dataset("mnist", "val", root=root)
    x_ood, _ = load_dataset("fashionmnist", "test", root=root)
    x_train, x_val = x_train[:3200], x_val[:500]
    model = mlp(latent_size=2, seed=0)
    trainer = OnlineLaplace(model, len(x_train))
    before = reconstruction_mse(model, x_val)
    state = fit(trainer, x_train, x_val, epochs=6, batch_size=64, seed=0, progress=False, log=lambda *a: None)
    after = reconstruction_mse(model, x_val)
    assert trainer.t == 300
    assert after < 0.8 * before
    history = [r["train_mse"] for r in state["history"]]
    assert history[-1] < history[0]

    post = trainer.posterior()
    precision = backend.to_numpy(post.precision)
    assert np.isfinite(precision).all() and (precision >= post.prior_precision).all()

    in_dist = predict(model, x_val[:200], post, n_samples=20, rng=backend.xp().random.default_rng(0))
    ood = predict(model, x_ood[:200], post, n_samples=20, rng=backend.xp().random.default_rng(0))
    var_in, var_ood = float(in_dist.x_var.mean()), float(ood.x_var.mean())
    assert math.isfinite(var_in) and var_in > 0
    assert var_ood > 2 * var_in, (var_in, var_ood)
