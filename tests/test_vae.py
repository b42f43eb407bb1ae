"""Tests for minilae.vae: the VAE's halves and parameters, the loss gradient through the reparameterisation
and the KL term against finite differences with the noise held, exact resumption under fit, learning."""
import numpy as np
import pytest

from minilae.backend import asarray, to_numpy, xp
from minilae.gradcheck import assert_close, fd_roundoff, numerical_gradient
from minilae.layers import Linear
from minilae.models import BUILDERS, build_model
from minilae.optim import SGD, Adam
from minilae.training import CheckpointError, fit, load_checkpoint, reconstruction_mse
from minilae.vae import DEFAULT_BETA, VAE, VAETrainer, build_vae, kl_standard_normal

# small VAEs: (name, input shape, latent size, architecture); finite differences cost 2 P forwards
SMALL = {"mlp": ("mlp", (1, 4, 4), 2, dict(hidden=(5, 3))), "conv": ("conv", (1, 4, 4), 3, dict(channels=(2, 3),
                                                                                                   hidden=(6,)))}


def small_vae(kind, seed=0):
    """build_vae's construction with a small architecture: the encoder of the AE with a 2L code, the AE's decoder."""
    name, shape, latent, arch = SMALL[kind]
    build = BUILDERS[name]
    return VAE(build(shape, 2 * latent, seed=seed, **arch).encoder, build(shape, latent, seed=seed, **arch).decoder,
               shape)


def quiet(*args, **kwargs):
    pass


@pytest.mark.parametrize("kind", list(SMALL))
def test_vae_halves_shapes_and_parameters(kind, rng):
    """Catches the encoder's outputs split wrongly into (mu, s), forward decoding a sample instead of the mean
    (a random validation loss), and a flat parameter vector that misses or reorders a half."""
    name, shape, latent, arch = SMALL[kind]
    model = build_vae(name, shape, latent, seed=0)
    x = asarray(rng.random((3,) + shape))
    mu, s = model.encode_stats(x)
    h = model.encoder(x)
    assert mu.shape == s.shape == (3, latent) and h.shape == (3, 2 * latent)
    np.testing.assert_array_equal(to_numpy(mu), to_numpy(h[:, :latent]))
    np.testing.assert_array_equal(to_numpy(s), to_numpy(h[:, latent:]))
    np.testing.assert_array_equal(to_numpy(model.encode(x)), to_numpy(mu))
    np.testing.assert_array_equal(to_numpy(model(x)), to_numpy(model.decode(mu)))
    assert model.output_shape == shape and model.input_shape == shape and model.latent_size == latent
    # the decoder is the plain AE's, with its initial weights for the same seed
    plain = build_model(name, shape, latent, seed=0)
    assert model.num_params == model.encoder.num_params + plain.decoder.num_params
    np.testing.assert_array_equal(to_numpy(model.decoder.get_params()), to_numpy(plain.decoder.get_params()))
    assert isinstance(model.encoder[-1], Linear) and model.encoder[-1].out_features == 2 * latent
    theta = model.get_params()
    assert theta.shape == (model.num_params,) and len(model.params) == len(model.encoder.params + plain.decoder.params)
    new = asarray(rng.standard_normal(model.num_params))
    model.set_params(new)
    np.testing.assert_array_equal(to_numpy(model.get_params()), to_numpy(new))
    np.testing.assert_array_equal(to_numpy(model.encoder.get_params()), to_numpy(new[:model.encoder.num_params]))
    with pytest.raises(ValueError, match="expected a flat vector"):
        model.set_params(theta[:-1])
    with pytest.raises(ValueError, match=r"VAE takes images of shape \(B, " + ", ".join(map(str, shape))):
        model.encode(asarray(rng.random((2, 1, 4, 8))))


def test_vae_sample_latent_is_the_reparameterisation(rng):
    """Catches e^s used as the standard deviation: z = mu + e^{s/2} eps with eps from the generator's draws."""
    model = small_vae("mlp")
    x = asarray(rng.random((4, 1, 4, 4)))
    mu, s = model.encode_stats(x)
    eps = xp().random.default_rng(3).standard_normal(mu.shape)
    z = model.sample_latent(x, xp().random.default_rng(3))
    assert_close(z, mu + xp().exp(0.5 * s) * eps, 1e-15, "z")


def test_kl_matches_monte_carlo():
    """Catches a wrong KL (a lost 1/2, e^s vs e^{2s}): E_q[log q(z) - log p(z)] by 200000 draws, 5 standard errors."""
    rng = np.random.default_rng(0)
    mu, s = rng.standard_normal((1, 3)), rng.uniform(-1, 1, (1, 3))
    kl = float(to_numpy(kl_standard_normal(asarray(mu), asarray(s)))[0])
    eps = rng.standard_normal((200_000, 3))
    z = mu + np.exp(s / 2) * eps
    log_ratio = (-0.5 * eps ** 2 - s / 2 + 0.5 * z ** 2).sum(axis=1)  # log q - log p, constants cancel
    assert abs(kl - log_ratio.mean()) < 5 * log_ratio.std() / np.sqrt(len(log_ratio))


@pytest.mark.parametrize("kind, beta", [("mlp", DEFAULT_BETA), ("mlp", 0.7), ("conv", 0.7)])
def test_vae_loss_gradient_matches_finite_differences_with_the_noise_held(kind, beta, rng):
    """dL/dtheta of the whole loss, mean_b [nll_b + beta KL_b], against central differences at fixed eps.
    Catches a missing dz/ds = eps e^{s/2} / 2 factor, the KL's gradient (beta mu, beta (e^s - 1) / 2) left out
    or not averaged over the batch, and the encoder's and decoder's gradients concatenated in the wrong order."""
    model = small_vae(kind)
    trainer = VAETrainer(model, SGD(lr=0.1), beta=beta)
    x = asarray(rng.random((3,) + model.input_shape))
    eps = asarray(rng.standard_normal((3, model.latent_size)))
    loss, grad, parts = trainer.loss_and_grad(x, eps)
    assert_close(loss, (parts["nll"] + beta * parts["kl"]).mean(), 1e-15, "loss")
    theta = model.get_params()

    def total(th):
        model.set_params(th)
        return trainer.loss_and_grad(x, eps)[0].reshape(1)

    expected = numerical_gradient(total, theta.copy())
    model.set_params(theta)
    atol = 10 * fd_roundoff(abs(float(loss)))  # 10x the differences' round-off floor
    assert_close(grad, expected, 1e-6, "VAE loss gradient", atol=atol)
    # the KL's own gradient is checked too: at beta = 0.7 it is a visible part of the encoder's gradient
    if beta == 0.7:
        no_kl = VAETrainer(model, beta=0.0).loss_and_grad(x, eps)[1]
        n = model.encoder.num_params
        assert float(xp().abs(grad[:n] - no_kl[:n]).max()) > 100 * atol


def test_vae_sgd_step_uses_the_generator_noise(rng):
    """Catches the step drawing eps from a generator of its own (a resumed run would diverge) or with another
    shape: one SGD step equals theta - lr dL/dtheta at the eps the given generator draws first."""
    model = small_vae("mlp")
    x = asarray(rng.random((5, 1, 4, 4)))
    theta = model.get_params()
    eps = xp().random.default_rng(8).standard_normal((5, model.latent_size))
    expected = theta - 0.1 * VAETrainer(model).loss_and_grad(x, eps)[1]
    trainer = VAETrainer(model, SGD(lr=0.1))
    stats = trainer.step(x, xp().random.default_rng(8))
    assert_close(trainer.theta, expected, 1e-13, "theta after one SGD step")
    assert set(stats) == {"nll", "mse", "kl", "loss"} and trainer.t == 1


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("stop_after", [1, 3])
def test_interrupted_and_resumed_vae_run_ends_identically(stop_after, rng, tmp_path):
    """Catches eps drawn from state a checkpoint does not hold (a generator kept across epochs, a fresh seed):
    a run resumed after epoch 1 or 3 ends bit-equal to the uninterrupted one, history included."""
    x_train, x_val = rng.random((40, 1, 4, 4)), rng.random((10, 1, 4, 4))
    kw = dict(epochs=5, batch_size=8, seed=3, log=quiet, progress=False)
    full = VAETrainer(small_vae("mlp"), Adam(lr=0.01), beta=0.01)
    fit(full, x_train, x_val, checkpoint=tmp_path / "full.npz", **kw)

    def interrupt(epoch, record):
        if epoch == stop_after:
            raise Interrupt

    with pytest.raises(Interrupt):
        fit(VAETrainer(small_vae("mlp"), Adam(lr=0.01), beta=0.01), x_train, x_val, checkpoint=tmp_path / "cut.npz",
            on_epoch_end=interrupt, **kw)
    state, _ = load_checkpoint(tmp_path / "cut.npz")
    assert state["epoch"] == stop_after
    resumed = VAETrainer(small_vae("mlp", seed=1), Adam(lr=0.01), beta=0.5)  # all must come from the checkpoint
    fit(resumed, x_train, x_val, checkpoint=tmp_path / "cut.npz", resume=state, **kw)
    np.testing.assert_array_equal(to_numpy(resumed.theta), to_numpy(full.theta))
    assert resumed.beta == 0.01 and resumed.t == full.t
    a, b = load_checkpoint(tmp_path / "full.npz")[0], load_checkpoint(tmp_path / "cut.npz")[0]
    assert [r["train_loss"] for r in a["history"]] == [r["train_loss"] for r in b["history"]]
    assert [r["val_mse"] for r in a["history"]] == [r["val_mse"] for r in b["history"]]
    other = VAETrainer(build_vae("mlp", (1, 4, 4), 2))
    with pytest.raises(CheckpointError, match="parameters"):
        other.load_state_dict(state["trainer"])


def test_vae_learns_synthetic_blobs(rng):
    """300 Adam steps on 128 blob images (8 x 8, 2-D code): the loss falls by more than 2 nats per image (the
    reconstruction term of a unit-variance Gaussian moves by SSE / 2) and the deterministic reconstruction MSE
    below 40% of the untrained model's. Catches a VAE gradient that does not descend its loss."""
    centres = rng.uniform(2, 6, (128, 2))
    grid = np.arange(8)
    d2 = (grid[None, :, None] - centres[:, 0, None, None]) ** 2 + (grid[None, None, :] - centres[:, 1, None, None]) ** 2
    x = np.exp(-d2 / (2 * (8 / 6) ** 2))[:, None]
    model = VAE(BUILDERS["mlp"]((1, 8, 8), 4, (32, 16)).encoder, BUILDERS["mlp"]((1, 8, 8), 2, (32, 16)).decoder,
                (1, 8, 8))
    trainer = VAETrainer(model, Adam(lr=3e-3))
    before = reconstruction_mse(model, x)
    noise = xp().random.default_rng(0)
    stats = [trainer.step(asarray(x[rng.choice(len(x), 16, replace=False)]), noise) for _ in range(300)]
    after = reconstruction_mse(model, x)
    first, last = stats[0]["loss"], float(np.mean([s["loss"] for s in stats[-20:]]))
    assert after < 0.4 * before, f"reconstruction MSE only fell from {before:.4f} to {after:.4f}"
    assert last < first - 2, f"loss only fell from {first:.3f} to {last:.3f}"


@pytest.mark.parametrize("beta", [-0.001, float("nan"), float("inf"), True, "0.1", None])
def test_bad_beta_is_refused(beta):
    """Catches a negative KL weight (it would reward a spread-out posterior without bound) or a non-number."""
    with pytest.raises(ValueError, match=r"beta \(the KL weight\) must be a finite number >= 0, got"):
        VAETrainer(small_vae("mlp"), beta=beta)


def test_bad_vae_input_is_refused(rng):
    """Catches the trainer accepting another model, a step without the noise generator, eps of the wrong shape,
    and an encoder whose output cannot be split into mean and log-variance."""
    with pytest.raises(TypeError, match="VAETrainer trains a VAE"):
        VAETrainer(build_model("mlp", (1, 4, 4), 2))
    trainer = VAETrainer(small_vae("mlp"))
    x = asarray(rng.random((2, 1, 4, 4)))
    with pytest.raises(ValueError, match="needs the backend Generator"):
        trainer.step(x, None)
    with pytest.raises(ValueError, match=r"eps must have shape \(B, latent_size\) = \(2, 2\)"):
        trainer.loss_and_grad(x, asarray(np.zeros((2, 3))))
    odd = build_model("mlp", (1, 4, 4), 3)
    with pytest.raises(ValueError, match="2 \\* latent_size outputs"):
        VAE(odd.encoder, odd.decoder, (1, 4, 4))
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        build_vae("resnet")
