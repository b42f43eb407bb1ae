"""Tests for minilae.posthoc: the data-set GGN, the posterior at the MAP and its prior precision."""
import math

import numpy as np
import pytest

from minilae import curvature
from minilae.backend import asarray, to_numpy, xp
from minilae.gradcheck import assert_close
from minilae.laplace import log_marginal_likelihood_grad
from minilae.losses import Gaussian
from minilae.models import mlp_autoencoder
from minilae.posthoc import dataset_ggn, fit_posthoc

IMAGE = (1, 2, 3)


def setup(rng, n=11):
    model = mlp_autoencoder(input_shape=IMAGE, latent_size=2, hidden=(4,), seed=2)
    return model, rng.uniform(0, 1, size=(n,) + IMAGE)  # host images, as the trainer takes them


@pytest.mark.parametrize("batch_size", [3, 100])
def test_dataset_ggn_sums_the_dense_ggn_over_all_images(batch_size, rng):
    model, x = setup(rng)
    G, log_lik = dataset_ggn(model, x, method="exact", batch_size=batch_size)
    x = asarray(x)
    assert_close(G, xp().diag(curvature.ggn(model, Gaussian(1.0), x, x)), 1e-10, "data-set GGN diagonal")
    assert log_lik == pytest.approx(-float(Gaussian(1.0).nll(model.forward(x), x).sum()), rel=1e-12)


def test_fit_posthoc_optimises_the_prior_precision(rng):
    model, x = setup(rng)
    posterior, info = fit_posthoc(model, x, method="approx", batch_size=4)
    np.testing.assert_array_equal(to_numpy(posterior.mean), to_numpy(model.get_params()))
    assert info["prior_precision"] == posterior.prior_precision
    grad = log_marginal_likelihood_grad(math.log(posterior.prior_precision), posterior.mean, posterior.ggn)
    assert abs(grad) < 1e-6 * posterior.num_params
    assert info["log_marginal_likelihood"] == pytest.approx(posterior.log_marginal_likelihood(info["log_likelihood"]))
    assert info["n_train"] == len(x)


def test_fixed_prior_is_kept(rng):
    model, x = setup(rng)
    posterior, info = fit_posthoc(model, x, prior_precision=2.5, optimize_prior=False)
    assert posterior.prior_precision == info["prior_precision"] == 2.5


def test_the_cli_trains_the_posthoc_map_with_the_prior_and_the_plain_ae_without():
    """Catches the post-hoc MAP trained without the prior the Laplace evidence assumes (issue 8, item 4);
    the plain AE stays eq. 1."""
    from minilae.train import DEFAULTS, _make_trainer

    model = mlp_autoencoder(input_shape=IMAGE, latent_size=2, hidden=(4,), seed=2)
    posthoc = _make_trainer({**DEFAULTS, "method": "posthoc", "prior_precision": 3.5}, model, 123)
    assert (posthoc.prior_precision, posthoc.n_data) == (3.5, 123)
    assert _make_trainer({**DEFAULTS, "method": "ae"}, model, 123).prior_precision == 0.0


@pytest.mark.backends("guard")
def test_dataset_ggn_streams_the_images(rng):
    """Bug caught: all N images moved to the device at once: no device array of the pass is near their size."""
    from minilae import _guard  # noqa: PLC0415
    model, x = setup(rng, n=200)
    with _guard.watch() as seen:
        dataset_ggn(model, x, method="approx", batch_size=8)
    assert seen["largest"] < x.size // 2, seen
