"""The variational autoencoder (Kingma & Welling 2014), the paper's VAE baseline, with its gradient written out.

The encoder gives the mean and log-variance of a diagonal Gaussian q(z | x) = N(mu(x), diag(e^{s(x)})); a code
is drawn by reparameterisation, z = mu + e^{s / 2} * eps with eps ~ N(0, I), and decoded to f = decoder(z). The
training loss per batch is

    L = mean_b [ -log N(x_b | f(z_b), I) + beta * KL(q(z | x_b) || N(0, I)) ],
    KL = 1/2 sum_j (mu_j^2 + e^{s_j} - 1 - s_j),

with beta = 0.001 as in the paper (appendix A). Its gradient by the chain rule, at fixed eps:

    g_f  = dL/df = (f - x) / B                                     (the Gaussian nll's gradient over the batch)
    dL/dtheta_dec = J_dec,theta^T g_f,   g_z = J_dec,z^T g_f         (one backward pass through the decoder)
    dL/dmu = g_z + beta mu / B                                      (dz/dmu = 1)
    dL/ds  = g_z * eps e^{s/2} / 2 + beta (e^s - 1) / (2 B)         (dz/ds = eps e^{s/2} / 2)
    dL/dtheta_enc = J_enc,theta^T [dL/dmu, dL/ds]                   (one backward pass through the encoder)

:class:`VAETrainer` runs this as a trainer of :func:`minilae.training.fit`; its noise eps comes from the backend
generator that fit derives from (seed, epoch), so a resumed run draws the same eps as an uninterrupted one.
"""
from __future__ import annotations

import math

from .backend import array_module, xp
from .layers import Sequential
from .losses import Gaussian
from .models import BUILDERS
from .training import MAPTrainer, check_finite, reconstruction_stats

__all__ = ["VAE", "VAETrainer", "build_vae", "kl_standard_normal", "DEFAULT_BETA"]

DEFAULT_BETA = 0.001
"""The KL weight of the paper's VAE baseline (appendix A)."""


def kl_standard_normal(mu, logvar):
    """KL(N(mu, diag(e^s)) || N(0, I)) = 1/2 sum_j (mu_j^2 + e^{s_j} - 1 - s_j), per sample (B,)."""
    return 0.5 * (mu ** 2 + array_module(mu).exp(logvar) - 1 - logvar).sum(axis=1)


def _backprop(chain, v, need_input=True):
    """(sum_b J_theta^T v_b (P,), J_in^T v (B, *in) or None) through a flat chain at its last forward, in one
    backward pass (Sequential.vjp_params and vjp_input would each make one)."""
    grads = []
    for i, layer in enumerate(reversed(chain.layers)):
        if layer.num_params:
            grads.append(layer.vjp_params(v))
        if need_input or i < len(chain.layers) - 1:
            v = layer.vjp_input(v)
    return xp().concatenate(grads[::-1]), (v if need_input else None)


class VAE:
    """x -> (mu, s) = encoder(x) -> z = mu + e^{s/2} eps -> f = decoder(z); parameters: encoder's, then decoder's.

    ``forward(x) = decode(mu(x))`` is deterministic (the code's mean), so the validation MSE of
    :func:`minilae.training.fit` scores the VAE like any autoencoder.
    """

    def __init__(self, encoder: Sequential, decoder: Sequential, input_shape):
        self.input_shape = tuple(input_shape)
        out = encoder.out_shape(self.input_shape)
        if len(out) != 1 or out[0] % 2:
            raise ValueError(f"a VAE encoder must end in 2 * latent_size outputs (mean and log-variance), got {out}")
        self.latent_size = out[0] // 2
        self.output_shape = tuple(decoder.out_shape((self.latent_size,)))
        self.encoder, self.decoder = encoder, decoder
        self.training = False

    # ---- parameters, modes ------------------------------------------------------------------------
    @property
    def layers(self):
        """The encoder's layers, then the decoder's."""
        return self.encoder.layers + self.decoder.layers

    @property
    def params(self):
        return self.encoder.params + self.decoder.params

    @property
    def num_params(self) -> int:
        return self.encoder.num_params + self.decoder.num_params

    def get_params(self):
        """theta = concat(theta_enc, theta_dec) (a copy)."""
        return xp().concatenate([self.encoder.get_params(), self.decoder.get_params()])

    def set_params(self, theta, check_finite: bool = True, share: bool = False):
        """Write theta into both halves (share: views of theta, see Layer.set_params)."""
        if getattr(theta, "ndim", None) != 1 or theta.shape[0] != self.num_params:
            raise ValueError(f"VAE: expected a flat vector of {self.num_params} parameters, "
                             f"got shape {tuple(getattr(theta, 'shape', ()))}")
        n = self.encoder.num_params
        self.encoder.set_params(theta[:n], check_finite, share)
        self.decoder.set_params(theta[n:], check_finite, share)

    def train(self, mode: bool = True):
        self.training = mode
        self.encoder.train(mode)
        self.decoder.train(mode)
        return self

    def eval(self):
        return self.train(False)

    # ---- the model ---------------------------------------------------------------------------------
    def encode_stats(self, x):
        """(mu, s) of q(z | x): the two halves of the encoder's output, each (B, latent_size)."""
        if hasattr(x, "shape") and tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"VAE takes images of shape (B, {', '.join(map(str, self.input_shape))}); got "
                             f"per-sample shape {tuple(x.shape[1:])}")
        h = self.encoder.forward(x)
        return h[:, :self.latent_size], h[:, self.latent_size:]

    def encode(self, x):
        """The code's mean mu(x)."""
        return self.encode_stats(x)[0]

    def decode(self, z):
        """f = decoder(z)."""
        return self.decoder.forward(z)

    def sample_latent(self, x, rng):
        """z = mu + e^{s/2} eps, eps ~ N(0, I) from the backend Generator rng."""
        mu, s = self.encode_stats(x)
        eps = rng.standard_normal(mu.shape).astype(mu.dtype, copy=False)
        return mu + array_module(mu).exp(0.5 * s) * eps

    def forward(self, x, check_finite: bool = True):
        """f = decode(mu(x)): the reconstruction at the code's mean."""
        return self.decode(self.encode(x))

    __call__ = forward

    def __repr__(self):
        return f"VAE(latent_size={self.latent_size},\n encoder={self.encoder!r},\n decoder={self.decoder!r})"


def build_vae(name: str, input_shape=(1, 28, 28), latent_size=2, seed=0):
    """The 'mlp' or 'conv' autoencoder as a VAE: its encoder with 2 * latent_size outputs, its decoder.

    The decoder has the plain autoencoder's initial weights for the same seed; the encoder the weights of
    the autoencoder with a 2 * latent_size code.
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(BUILDERS)}")
    build = BUILDERS[name]
    encoder = build(input_shape=input_shape, latent_size=2 * latent_size, seed=seed).encoder
    decoder = build(input_shape=input_shape, latent_size=latent_size, seed=seed).decoder
    return VAE(encoder, decoder, input_shape)


def _beta(beta):
    """A finite number >= 0 (bools refused), or ValueError naming it."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
        raise ValueError(f"beta (the KL weight) must be a finite number >= 0, got {beta!r}")
    return float(beta)


class VAETrainer(MAPTrainer):
    """theta <- Adam step on L = mean_b [-log N(x_b | decode(z_b), I) + beta KL(q(z | x_b) || N(0, I))].

    A trainer of :func:`minilae.training.fit` (see its module docstring for the protocol); snapshots and
    the optimiser step are the MAP trainer's, the loss and its gradient are the VAE's.
    """

    method = "vae"

    def __init__(self, model: VAE, optimizer=None, beta=DEFAULT_BETA):
        if not isinstance(model, VAE):
            raise TypeError(f"VAETrainer trains a VAE (minilae.vae.build_vae), got {type(model).__name__}")
        super().__init__(model, optimizer)  # unit Gaussian: its mean(f) = f is what fit's validation MSE scores
        self.beta = _beta(beta)

    def loss_and_grad(self, x, eps):
        """(L (0-d backend array), dL/dtheta (P,), parts) at the current parameters and fixed noise eps (B, latent).

        parts: f (B, *out) decoded from the sampled codes, nll (B,) and kl (B,).
        """
        B = x.shape[0]
        if tuple(eps.shape) != (B, self.model.latent_size):
            raise ValueError(f"eps must have shape (B, latent_size) = ({B}, {self.model.latent_size}), "
                             f"got {tuple(eps.shape)}")
        mu, s = self.model.encode_stats(x)
        m = array_module(mu)
        root = m.exp(0.5 * s)                                    # e^{s/2}
        f = self.model.decode(mu + root * eps)
        check_finite("the reconstruction", f, self.t + 1)
        nll, kl = self.likelihood.nll(f, x), kl_standard_normal(mu, s)
        g_dec, g_z = _backprop(self.model.decoder, self.likelihood.grad(f, x) / B)
        g_mu = g_z + (self.beta / B) * mu
        g_s = g_z * eps * root / 2 + (self.beta / (2 * B)) * (root * root - 1)
        g_enc, _ = _backprop(self.model.encoder, m.concatenate([g_mu, g_s], axis=1), need_input=False)
        grad = m.concatenate([g_enc, g_dec])
        check_finite("the gradient", grad, self.t + 1)
        return (nll + self.beta * kl).mean(), grad, {"f": f, "nll": nll, "kl": kl}

    def step(self, x, rng):
        """One minibatch: eps ~ N(0, I) from the backend Generator rng, gradient, optimiser step; host stats."""
        if rng is None:
            raise ValueError("VAETrainer.step needs the backend Generator that draws the codes' noise eps "
                             "(minilae.training.fit passes one per epoch)")
        eps = rng.standard_normal((x.shape[0], self.model.latent_size)).astype(x.dtype, copy=False)
        loss, grad, parts = self.loss_and_grad(x, eps)
        stats = {**reconstruction_stats(parts["f"], x, parts["nll"]), "kl": float(parts["kl"].mean()),
                 "loss": float(loss)}
        self.apply_gradient(grad)
        return stats

    def state_dict(self):
        """The MAP trainer's state and beta."""
        return {**super().state_dict(), "beta": self.beta}

    def load_state_dict(self, d):
        """Restore theta, step count, optimiser state and beta."""
        super().load_state_dict(d)
        self.beta = _beta(d["beta"])
