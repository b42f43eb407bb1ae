"""Tests for minilae.methods: every method's Predictor on synthetic data, against direct loops."""
import numpy as np
import pytest

from minilae import backend
from minilae.laplace import DiagonalLaplace
from minilae.losses import Gaussian, get_likelihood
from minilae.methods import (DropoutPredictor, EnsemblePredictor, NetworkPredictor, VAEPredictor, build_network,
                             make_predictor, member_seed)
from minilae.models import mlp_autoencoder
from minilae.predictive import predict

IMAGE = (1, 4, 2)
FIELDS = ("z_mean", "z_var", "x_mean", "x_var", "log_px", "mse")


def host(a):
    return backend.to_numpy(a)


def images(rng, n=6):
    return rng.uniform(0, 1, size=(n,) + IMAGE)  # host, as predictors take them


def ae(seed=1, **options):
    return mlp_autoencoder(input_shape=IMAGE, latent_size=2, hidden=(5,), seed=seed, **options)


def stack_passes(predictor, x, K):
    """(z (K, N, latent), x_hat (K, N, ...)) by hand: what the K draws give, from the sampling API."""
    return host(predictor.sample_codes(x, K, rng=7)), host(predictor.sample_reconstructions(x, K, rng=7))


def assert_prediction(pred, want, rtol=1e-10):
    for name, value in zip(FIELDS, want, strict=True):
        np.testing.assert_allclose(host(getattr(pred, name)), value, rtol=rtol, atol=1e-14, err_msg=name)


def gaussian_log_px(fs, x):
    """1/K sum_k log N(x | f_k, I) per input."""
    d = x[0].size
    sq = ((fs - x[None]) ** 2).reshape(fs.shape[0], len(x), -1).sum(axis=2)
    return (-0.5 * sq - 0.5 * d * np.log(2 * np.pi)).mean(axis=0)


# ----------------------------------------------------------------------------------------------
# ae, posthoc / online (the Laplace draws)

def test_ae_is_one_deterministic_network(rng):
    """Catches n_samples honoured by a deterministic method (K copies of one network) and a non-zero variance."""
    x, model = images(rng), ae()
    p = make_predictor("ae", {"method": "ae"}, model)
    assert isinstance(p, NetworkPredictor) and not p.stochastic and not p.decoder_variance
    pred = p.predict(x, n_samples=9)
    f = host(model.forward(backend.asarray(x)))
    z = host(model.encode(backend.asarray(x)))
    assert_prediction(pred, (z, 0 * z, f, 0 * f, gaussian_log_px(f[None], x),
                             ((x - f) ** 2).reshape(len(x), -1).mean(axis=1)))
    assert pred.n_samples == 1
    codes, recon = stack_passes(p, x, 5)
    assert codes.shape == (1, len(x), 2) and recon.shape == (1, len(x)) + IMAGE
    np.testing.assert_allclose(recon[0], f, rtol=1e-14)


def test_laplace_predictor_is_the_predictive_of_its_posterior(rng):
    """Catches the Predictor drawing other networks than minilae.predictive.predict for the same rng (the
    numbers of every existing run would move), and sample_* not using one sampled network per pass."""
    x, model = images(rng), ae()
    theta = model.get_params()
    posterior = DiagonalLaplace(theta, backend.asarray(rng.gamma(1.0, 20.0, size=theta.size)), prior_precision=3.0)
    p = make_predictor("online", {"method": "online"}, model, posterior)
    assert p.stochastic and p.decoder_variance
    want = predict(model, x, posterior, n_samples=6, rng=5).to_numpy()
    assert_prediction(p.predict(x, n_samples=6, rng=5), [getattr(want, k) for k in FIELDS], rtol=1e-13)
    codes, recon = stack_passes(p, x, 4)
    draws = backend.xp().random.default_rng(7)
    for k in range(4):
        model.set_params(posterior.sample(1, draws)[0])
        np.testing.assert_allclose(codes[k], host(model.encode(backend.asarray(x))), rtol=1e-13)
        np.testing.assert_allclose(recon[k], host(model.forward(backend.asarray(x))), rtol=1e-13)
    model.set_params(theta)
    np.testing.assert_array_equal(host(p.model.get_params()), host(theta))  # put back after the passes


# ----------------------------------------------------------------------------------------------
# ae-var

def test_ae_var_predicts_its_decoded_variance(rng):
    """Catches x_var = 0 (the spread of one network) instead of the decoded e^s, a log p(x) with the unit
    Gaussian, and the mean taken over both channel halves."""
    x, model = images(rng), build_network("ae-var", "mlp", IMAGE, 2, seed=3)
    het = get_likelihood("heteroscedastic")
    p = make_predictor("ae-var", {"method": "ae-var"}, model)
    assert not p.stochastic and p.decoder_variance
    xb = backend.asarray(x)
    f = host(model.forward(xb))
    mu, s = f[:, :1], f[:, 1:]
    log_px = -host(het.nll(model.forward(xb), xb))
    pred = p.predict(x, n_samples=4)
    assert_prediction(pred, (host(model.encode(xb)), np.zeros((len(x), 2)), mu, np.exp(s), log_px,
                             ((x - mu) ** 2).reshape(len(x), -1).mean(axis=1)))
    mean, var = p.predict_decoder(model.encode(xb))
    np.testing.assert_allclose(host(mean), mu, rtol=1e-12)
    np.testing.assert_allclose(host(var), np.exp(s), rtol=1e-12)
    assert p.sample_reconstructions(x, 3).shape == (1, len(x)) + IMAGE


# ----------------------------------------------------------------------------------------------
# mc-dropout

def test_mc_dropout_with_p_zero_is_the_plain_ae(rng):
    """Catches the dropout predictor changing the network beyond its masks (e.g. a rescaling at p = 0)."""
    x = images(rng)
    plain = make_predictor("ae", {}, ae(seed=4)).predict(x)
    drop = make_predictor("mc-dropout", {}, ae(seed=4, dropout=0.0)).predict(x, n_samples=5, rng=1)
    assert_prediction(drop, [host(getattr(plain, k)) for k in FIELDS], rtol=1e-13)
    assert drop.n_samples == 5


def test_mc_dropout_redraws_masks_per_pass_reproducibly(rng):
    """Catches one mask reused by every pass (zero variance), masks that do not repeat for the same rng, and
    the model left in training mode (its validation would then be noisy)."""
    x, model = images(rng, n=40), ae(seed=4, dropout=0.3)
    p = make_predictor("mc-dropout", {}, model)
    assert isinstance(p, DropoutPredictor) and p.stochastic
    recon = host(p.sample_reconstructions(x, 6, rng=2))
    assert recon.shape == (6, 40) + IMAGE
    assert all(not np.allclose(recon[0], recon[k]) for k in range(1, 6))
    np.testing.assert_array_equal(recon, host(p.sample_reconstructions(x, 6, rng=2)))
    assert not np.allclose(recon, host(p.sample_reconstructions(x, 6, rng=3)))
    assert not model.training and not any(layer.training for layer in model.layers)
    pred = p.predict(x, n_samples=6, rng=2)
    assert (host(pred.x_var) > 0).mean() > 0.9 and (host(pred.z_var) > 0).all()
    np.testing.assert_allclose(host(pred.x_mean), recon.mean(axis=0), rtol=1e-12)  # the same masks
    np.testing.assert_allclose(host(pred.x_var), recon.var(axis=0), rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(host(pred.log_px), gaussian_log_px(recon, x), rtol=1e-12)


# ----------------------------------------------------------------------------------------------
# ensemble

def members(n):
    return [ae(seed=member_seed(0, m)).get_params() for m in range(n)]


def test_an_ensemble_of_identical_members_has_zero_variance(rng):
    """Catches a variance that is not the spread over members (e.g. the sample variance of a bias)."""
    x, model = images(rng), ae(seed=8)
    theta = model.get_params()
    pred = make_predictor("ensemble", {}, model, thetas=[theta, theta.copy(), theta.copy()]).predict(x)
    np.testing.assert_array_equal(host(pred.x_var), 0)
    np.testing.assert_array_equal(host(pred.z_var), 0)
    np.testing.assert_allclose(host(pred.x_mean), host(model.forward(backend.asarray(x))), rtol=1e-14)
    assert pred.n_samples == 3


def test_ensemble_statistics_are_over_its_members(rng):
    """Catches n_samples overriding the members (K must be M), a member skipped, and the population variance
    replaced by the sample variance."""
    x, model = images(rng), ae()
    thetas = members(3)
    p = make_predictor("ensemble", {}, model, thetas=thetas)
    assert isinstance(p, EnsemblePredictor) and p.stochastic
    zs, fs = [], []
    for theta in thetas:
        model.set_params(theta)
        zs.append(host(model.encode(backend.asarray(x))))
        fs.append(host(model.forward(backend.asarray(x))))
    zs, fs = np.stack(zs), np.stack(fs)
    pred = p.predict(x, n_samples=50, rng=3)
    assert pred.n_samples == 3
    assert_prediction(pred, (zs.mean(0), zs.var(0), fs.mean(0), fs.var(0), gaussian_log_px(fs, x),
                             ((x - fs.mean(0)) ** 2).reshape(len(x), -1).mean(axis=1)))
    mean, var = p.predict_decoder(backend.asarray(zs[0]))
    assert mean.shape == var.shape == x.shape and (host(var) > 0).all()


def test_ensemble_passes_cycle_through_a_random_order_of_the_members(rng):
    """Catches sample_codes returning fewer passes than asked, always starting at member 0 (an imputation chain
    of single passes would never leave it) and a member missing from M passes."""
    x, model = images(rng), ae()
    thetas = members(3)
    p = make_predictor("ensemble", {}, model, thetas=thetas)
    per_member = []
    for theta in thetas:
        model.set_params(theta)
        per_member.append(host(model.encode(backend.asarray(x))))
    codes = host(p.sample_codes(x, 7, rng=11))
    assert codes.shape == (7, len(x), 2)
    which = [int(np.argmin([np.abs(c - m).max() for m in per_member])) for c in codes]
    assert sorted(which[:3]) == [0, 1, 2] and which[3:6] == which[:3] and which[6] == which[0]
    firsts = {int(np.argmin([np.abs(host(p.sample_codes(x, 1, rng=s))[0] - m).max() for m in per_member]))
              for s in range(12)}
    assert firsts == {0, 1, 2}


# ----------------------------------------------------------------------------------------------
# vae

def vae_predictor(seed=2):
    vae = build_network("vae", "mlp", IMAGE, 2, seed=seed)
    return vae, make_predictor("vae", {"method": "vae"}, vae)


def test_vae_latent_statistics_are_the_encoders(rng):
    """Catches z_var taken as the spread of sampled codes around their own mean (noisy, not e^logvar) and a
    z_mean that is a sample instead of mu."""
    x = images(rng)
    vae, p = vae_predictor()
    assert isinstance(p, VAEPredictor) and p.stochastic and not p.decoder_variance
    mu, logvar = vae.encode_stats(backend.asarray(x))
    pred = p.predict(x, n_samples=5, rng=4)
    np.testing.assert_allclose(host(pred.z_mean), host(mu), rtol=1e-13)
    np.testing.assert_allclose(host(pred.z_var), np.exp(host(logvar)), rtol=1e-13)


def test_vae_reconstructions_are_decoded_sampled_codes(rng):
    """Catches x decoded from mu (zero variance, K identical passes), codes that do not follow
    z = mu + e^{s/2} eps, and log p(x) not averaged over the sampled codes."""
    x = images(rng)
    vae, p = vae_predictor()
    xb = backend.asarray(x)
    mu, logvar = (host(a) for a in vae.encode_stats(xb))
    eps_rng = backend.xp().random.default_rng(9)
    zs = np.stack([mu + np.exp(logvar / 2) * host(eps_rng.standard_normal(mu.shape)) for _ in range(4)])
    fs = np.stack([host(vae.decode(backend.asarray(z))) for z in zs])
    codes = host(p.sample_codes(x, 4, rng=9))
    np.testing.assert_allclose(codes, zs, rtol=1e-12)
    np.testing.assert_allclose(host(p.sample_reconstructions(x, 4, rng=9)), fs, rtol=1e-12)
    pred = p.predict(x, n_samples=4, rng=9)
    assert_prediction(pred, (mu, np.exp(logvar), fs.mean(0), fs.var(0), gaussian_log_px(fs, x),
                             ((x - fs.mean(0)) ** 2).reshape(len(x), -1).mean(axis=1)), rtol=1e-9)
    mean, var = p.predict_decoder(backend.asarray(mu))
    np.testing.assert_allclose(host(mean), host(vae.decode(backend.asarray(mu))), rtol=1e-13)
    np.testing.assert_array_equal(host(var), 0)


# ----------------------------------------------------------------------------------------------
# every method: the contract's shapes, reproducibility and bad input

def posthoc_predictor():
    model = ae()
    theta = model.get_params()
    posterior = DiagonalLaplace(theta, backend.xp().full(theta.shape, 50.0), prior_precision=1.0)
    return make_predictor("posthoc", {}, model, posterior)


PREDICTORS = {
    "ae": lambda: make_predictor("ae", {}, ae()),
    "posthoc": posthoc_predictor,
    "ae-var": lambda: make_predictor("ae-var", {}, build_network("ae-var", "mlp", IMAGE, 2, seed=1)),
    "mc-dropout": lambda: make_predictor("mc-dropout", {}, build_network("mc-dropout", "mlp", IMAGE, 2, 1, 0.2)),
    "ensemble": lambda: make_predictor("ensemble", {}, ae(), thetas=members(2)),
    "vae": lambda: vae_predictor()[1],
}


@pytest.mark.parametrize("method", list(PREDICTORS))
def test_every_method_keeps_the_contract(method, rng):
    """Catches a method whose prediction has other shapes, a negative or non-finite variance, or changes with
    the batch size or from call to call with the same rng."""
    x = images(rng, n=7)
    p = PREDICTORS[method]()
    assert p.input_shape == IMAGE and p.latent_size == 2
    pred = p.predict(x, n_samples=3, rng=1, batch_size=4)
    assert pred.z_mean.shape == pred.z_var.shape == (7, 2)
    assert pred.x_mean.shape == pred.x_var.shape == (7,) + IMAGE and pred.log_px.shape == pred.mse.shape == (7,)
    for name in FIELDS:
        assert np.isfinite(host(getattr(pred, name))).all(), name
    assert (host(pred.x_var) >= 0).all() and (host(pred.z_var) >= 0).all()
    again = p.predict(x, n_samples=3, rng=1, batch_size=4)
    assert_prediction(again, [host(getattr(pred, k)) for k in FIELDS], rtol=0)
    K = 1 if not p.stochastic else 3
    assert p.sample_codes(x, 3, rng=2).shape == (K, 7, 2)
    assert p.sample_reconstructions(x, 3, rng=2).shape == (K, 7) + IMAGE
    mean, var = p.predict_decoder(backend.xp().zeros((5, 2)), n_samples=3, rng=2)
    assert mean.shape == var.shape == (5,) + IMAGE and (host(var) >= 0).all()
    with pytest.raises(ValueError, match=r"x must be a non-empty batch of images \(N, 1, 4, 2\)"):
        p.predict(x.reshape(7, 1, 2, 4))
    with pytest.raises(ValueError, match="n_samples"):
        p.sample_codes(x, 0)


def test_bad_predictors_are_refused():
    with pytest.raises(ValueError, match="at least one member"):
        EnsemblePredictor("ensemble", {}, ae(), [])


@pytest.mark.parametrize("method", list(PREDICTORS))
def test_unit_gaussian_is_the_likelihood_of_every_method_but_ae_var(method):
    """Catches the VAE / ensemble / dropout log p(x) computed with another likelihood than the paper's N(x|f, I)."""
    p = PREDICTORS[method]()
    if method == "ae-var":
        assert p.likelihood.name == "heteroscedastic"
    else:
        assert isinstance(p.likelihood, Gaussian) and p.likelihood.sigma == 1.0
