"""Tests for minilae.online: the online LAE step (eq. 10-11) and a short run on real MNIST."""
import copy
import math

import numpy as np
import pytest

from minilae import backend, curvature
from minilae import online as online_module
from minilae.gradcheck import assert_close, fd_roundoff, numerical_gradient
from minilae.laplace import DiagonalLaplace
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
    g = g + prior_precision / N_DATA * theta0  # the prior's weight decay lambda / N, at the mean
    theta1 = theta0 - lr * g / (np.abs(g) + 1e-8)  # Adam's first step: m_hat = g, v_hat = g^2
    H1 = (1 - alpha) * H0 + N_DATA / B * dense_ggn_diag(model, x, theta_s)

    assert_close(trainer.theta, theta1, 1e-6, "theta_1 (eq. 10)")
    assert_close(trainer.H, H1, 1e-10, "H_1 (eq. 11)")


# ----------------------------------------------------------------------------------------------
# one SGD step against the hand-computed update (SGD, unlike Adam's first step ~ lr sign(g), keeps
# the gradient's scale, so a sum over the batch instead of the mean shows)

@pytest.mark.parametrize("B, alpha, prior_precision", [(5, 1e-3, 1.0), (8, 0.3, 4.0)])
def test_one_sgd_step_is_eq_10_and_11_at_the_sampled_weights(B, alpha, prior_precision, rng):
    """theta_1 = theta_0 - lr (grad mean_b nll_b(theta_s) + lambda / N theta_0), theta_s the step's own draw;
    H_1 = (1 - alpha) H_0 + (N / B) G(theta_s) with G the dense GGN diagonal. Bugs caught: the
    gradient summed over the batch (B times too large), taken at the mean instead of the sample,
    or G averaged over the batch instead of summed."""
    model = tiny_autoencoder()
    x = batch(rng, B)
    lr = 0.05
    theta0 = model.get_params()
    trainer = OnlineLaplace(model, N_DATA, alpha, prior_precision, hessian="exact", optimizer=SGD(lr=lr))
    noise_rng, replay = (backend.xp().random.default_rng(11) for _ in range(2))
    trainer.step(x, noise_rng)
    # the model holds the mean again
    np.testing.assert_array_equal(backend.to_numpy(model.get_params()), backend.to_numpy(trainer.theta))

    H0 = N_DATA / B * dense_ggn_diag(model, x, theta0) / alpha  # the recursion's stationary start
    theta_s = DiagonalLaplace(theta0, H0, prior_precision).sample(1, replay)[0]  # the step's own draw
    assert not backend.xp().allclose(theta_s, theta0)
    g = numerical_gradient(lambda th: mean_nll(model, x, th).reshape(1), theta_s.copy())
    atol = 10 * fd_roundoff(mean_nll(model, x, theta_s))  # 10x the differences' round-off floor
    g_prior = prior_precision / N_DATA * theta0  # the prior's share, at the mean (see test_..._prior_objective)
    assert_close((theta0 - trainer.theta) / lr, g + g_prior, 1e-6, "SGD update / lr = mean gradient at theta_s",
                 atol=atol)
    H1 = (1 - alpha) * H0 + N_DATA / B * dense_ggn_diag(model, x, theta_s)
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


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_ggn_stops_with_the_step(bad, rng, monkeypatch):
    """The batch GGN is checked by its min alone (nan shows there); a +inf is named when the precision's check at
    the end of the step finds it. Bug caught: an inf GGN reported as a non-finite precision, or not at all."""
    model = tiny_autoencoder()
    trainer = OnlineLaplace(model, N_DATA, alpha=0.1)
    real = online_module.ggn_diagonal
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        G = real(*args, **kwargs)
        if calls["n"] == 4:  # call 1 is H_0, calls 2-4 are steps 1-3
            G[3] = bad
        return G

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
    # the model is left on theta_t, not on the samples' buffer that the step reuses as scratch
    assert_close(trainer.model.get_params(), trainer.theta, 0.0, "the model's parameters after the error")


def test_after_each_step_the_model_holds_theta_t(rng):
    """The step hands the model its sample and then theta_t as views (no copies). Catches a model left on the
    samples' buffer, and caches that outlive the step (a forward before it passing for one at theta_t)."""
    trainer = OnlineLaplace(tiny_autoencoder(), N_DATA, alpha=0.1)
    gen, x = backend.xp().random.default_rng(0), batch(rng)
    for _ in range(3):
        f = trainer.model.forward(x)
        trainer.step(batch(rng), gen)
        assert not trainer.model.last_output_is(f)
        assert_close(trainer.model.get_params(), trainer.theta, 0.0, "the model holds theta_t")
    fresh = tiny_autoencoder()
    fresh.set_params(trainer.theta)
    assert_close(trainer.model.forward(x), fresh.forward(x), 0.0, "and computes with it")


@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha=0.0), "alpha"), (dict(alpha=1.5), "alpha"), (dict(prior_precision=0.0), "prior_precision"),
    (dict(hessian="full"), "Hessian method"), (dict(n_samples=0), "n_samples"), (dict(n_data=0), "n_data"),
    (dict(threshold=-1), "threshold must be a feature size >= 0"),
    (dict(threshold=float("nan")), "threshold must be a feature size >= 0"),
])
def test_bad_arguments(kwargs, match):
    """Besides the obvious ones, catches OnlineLaplace(threshold=-1) being accepted (it failed, or was
    ignored, only at the first 'mixed' step)."""
    args = {"n_data": N_DATA, **kwargs}
    with pytest.raises(ValueError, match=match):
        OnlineLaplace(tiny_autoencoder(), **args)


# ----------------------------------------------------------------------------------------------
# the prior in the mean's step, the posterior as a snapshot, a missing rng (issue 8, items 3, 4, 15)

@pytest.mark.parametrize("prior_precision, n_samples", [(1.0, 1), (30.0, 1), (7.0, 2)])
def test_one_sgd_step_follows_the_prior_objective(prior_precision, n_samples, rng):
    """Catches a mean step without the prior (the old eq. 10 used the batch NLL only, while the precision
    held lambda), a prior term of the wrong scale (lambda instead of lambda / N) or taken at theta_s.

    For the step's fixed noise eps the objective of the mean mu is
        J(mu) = 1/S sum_s mean_b nll_b(mu + eps_s sigma) + lambda / (2N) ||mu||^2,
    and one SGD step must be mu - lr * dJ/dmu, with dJ/dmu by central finite differences (float64).
    """
    model = tiny_autoencoder()
    x, lr = batch(rng), 0.05
    trainer = OnlineLaplace(model, N_DATA, 0.3, prior_precision, hessian="exact", n_samples=n_samples,
                            optimizer=SGD(lr=lr))
    theta0 = model.get_params()
    noise_rng, replay = (backend.xp().random.default_rng(11) for _ in range(2))
    trainer.step(x, noise_rng)
    H0 = N_DATA / x.shape[0] * dense_ggn_diag(model, x, theta0) / 0.3
    eps_sigma = replay.standard_normal((n_samples, theta0.size)) / np.sqrt(H0 + prior_precision)

    def objective(mu):
        data = backend.xp().stack([mean_nll(model, x, mu + e) for e in eps_sigma]).mean()
        return (data + prior_precision / (2 * N_DATA) * mu @ mu).reshape(1)

    grad = numerical_gradient(objective, theta0.copy())
    assert_close(trainer.theta, theta0 - lr * grad, 1e-8, "theta_1 = theta_0 - lr dJ/dmu")
    # the prior's share is not negligible here, so the test sees it
    assert float(np.abs(prior_precision / N_DATA * theta0).max()) > 1e-3 * float(np.abs(grad).max())


def test_mean_converges_to_the_mode_under_the_prior(rng):
    """Catches a mean that ignores the prior: with the sampling noise made negligible (H = 1e24, so theta_s
    equals theta_t to round-off) SGD must end where the gradient of mean_b nll_b + lambda / (2N) ||theta||^2
    vanishes - the mode the Laplace posterior assumes - not where that of the NLL alone does."""
    model = tiny_autoencoder()
    x = batch(rng)
    trainer = OnlineLaplace(model, 5, alpha=1.0, prior_precision=3.0, hessian="approx", optimizer=SGD(lr=0.2))
    trainer.H = backend.xp().full(model.num_params, 1e24)  # sigma ~ 1e-12: theta_s = theta_t to round-off
    for _ in range(3000):
        trainer.step(x, backend.xp().random.default_rng(0))
        trainer.H = backend.xp().full(model.num_params, 1e24)

    def objective(th, lam):
        return (mean_nll(model, x, th) + lam / (2 * 5) * th @ th).reshape(1)

    theta = trainer.theta.copy()
    with_prior = numerical_gradient(lambda th: objective(th, 3.0), theta.copy())
    without = numerical_gradient(lambda th: objective(th, 0.0), theta.copy())
    assert float(np.abs(with_prior).max()) < 1e-6
    assert float(np.abs(without).max()) > 1e-2  # the NLL alone is not stationary there


def test_posterior_is_a_snapshot_that_later_steps_leave_alone(rng):
    """Catches posterior() sharing theta and H with the trainer: a posterior taken after step 1 changed
    under step 2 (H is updated in place)."""
    trainer = OnlineLaplace(tiny_autoencoder(), N_DATA, alpha=0.2)
    trainer.step(batch(rng), backend.xp().random.default_rng(0))
    post = trainer.posterior()
    mean, ggn = post.mean.copy(), post.ggn.copy()
    trainer.step(batch(rng), backend.xp().random.default_rng(1))
    np.testing.assert_array_equal(backend.to_numpy(post.mean), backend.to_numpy(mean))
    np.testing.assert_array_equal(backend.to_numpy(post.ggn), backend.to_numpy(ggn))
    assert not backend.xp().array_equal(trainer.H, ggn) and not backend.xp().array_equal(trainer.theta, mean)
    post.ggn[:] = 0.0  # and writing into the posterior does not reach the trainer
    assert float(trainer.H.min()) > 0


@pytest.mark.parametrize("bad_rng", [None, 0, "seed"])
def test_step_without_a_generator_is_a_clear_error_and_changes_nothing(bad_rng, rng):
    """Catches step(x, rng=None) dying with AttributeError: 'NoneType' object has no attribute
    'standard_normal' - after H_0 had already been computed."""
    trainer = OnlineLaplace(tiny_autoencoder(), N_DATA, alpha=0.2)
    theta = trainer.theta.copy()
    with pytest.raises(TypeError, match="rng must be a random Generator.*default_rng"):
        trainer.step(batch(rng), bad_rng)
    assert trainer.H is None and trainer.t == 0
    np.testing.assert_array_equal(backend.to_numpy(trainer.theta), backend.to_numpy(theta))


# ----------------------------------------------------------------------------------------------
# real data

@pytest.mark.slow
@pytest.mark.backends("numpy", "cupy")  # the longest test; on the guard, tutorial 04 and the CLI test run this path
def test_short_run_on_mnist_learns_and_is_uncertain_on_fashionmnist(real_data_root):
    from minilae.data import load_dataset
    from minilae.models import mlp_autoencoder as mlp

    backend.set_default_dtype(np.float32)  # the production dtype; the fixture restores float64
    root = real_data_root
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
