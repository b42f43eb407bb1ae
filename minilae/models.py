"""The paper's two autoencoders (MLP and convolutional) as Sequential models, with the variants the
baselines need: a decoder that outputs a mean and a log-variance (``output="mean_logvar"``, the AE with
learned variance) and dropout between all trainable layers (``dropout=p``, the MC-dropout AE).

An `Autoencoder` is one Sequential (encoder layers then decoder layers) so that the Hessian
engine and the Laplace posterior see a single flat parameter vector; `encode` and `decode`
run the two halves. They share the model's layers, so they overwrite those layers' caches: after
either, the model's own products (`vjp_params`, the Hessian engine with ``f=f``) refuse to run until
the next `model(x)` rather than mix caches of two batches.

Dropout masks are drawn only in training mode (``model.train()``); each Dropout has its own backend
generator, seeded from the model seed on a stream separate from the weights' (so a model with
``dropout=0`` and ``output="mean"`` has the same parameters as before these options existed).
:meth:`Autoencoder.reseed_dropout` points every Dropout at one backend generator, which makes a run of
stochastic forward passes reproducible.
"""
from __future__ import annotations

import math

import numpy as np  # host side only: weight initialisation and seed derivation

from .backend import xp
from .layers import Conv2d, Dropout, Flatten, Linear, MaxPool2d, Reshape, Sequential, Tanh, Upsample
from .layers.base import prod

OUTPUTS = ("mean", "mean_logvar")
"""Decoder outputs: 'mean' (C channels, x_hat) or 'mean_logvar' (2C channels: mu, then s = log sigma^2)."""

_DROPOUT_STREAM = 0x44524F50  # separates the dropout seeds from the weights' stream of the same seed


class Autoencoder(Sequential):
    """x -> z = encoder(x) -> f = decoder(z), as one chain of layers.

    ``output_shape`` is the decoder's per-image output shape: the input shape, with twice the channels
    when ``output == "mean_logvar"``.
    """

    def __init__(self, encoder: Sequential, decoder: Sequential, input_shape, output="mean", dropout=0.0):
        super().__init__(*(list(encoder.layers) + list(decoder.layers)))
        self.n_encoder = len(encoder.layers)
        self.input_shape = tuple(input_shape)
        self.latent_size = prod(encoder.out_shape(self.input_shape))
        self.output = _check_output(output)
        self.dropout = _check_dropout(dropout)
        self.output_shape = tuple(super().out_shape(self.input_shape))

    @property
    def encoder(self) -> Sequential:
        """The first n_encoder layers (shares the layer objects)."""
        return Sequential(*self.layers[:self.n_encoder])

    @property
    def decoder(self) -> Sequential:
        """The remaining layers (shares the layer objects)."""
        return Sequential(*self.layers[self.n_encoder:])

    @property
    def dropout_layers(self) -> list:
        """The Dropout layers, in chain order."""
        return [layer for layer in self.layers if isinstance(layer, Dropout)]

    def reseed_dropout(self, rng):
        """Make every Dropout draw its masks from the one backend Generator rng (or a new one from an int seed).

        The layers then share rng, so the masks of a sequence of forwards depend only on rng's state.
        """
        if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
            rng = xp().random.default_rng(int(rng))
        if not callable(getattr(rng, "random", None)):
            raise TypeError(f"reseed_dropout takes a backend Generator (xp().random.default_rng(seed)) or an int "
                            f"seed, got {type(rng).__name__}")
        for layer in self.dropout_layers:
            layer.rng = rng
        return self

    def out_shape(self, in_shape):
        """The decoder's output shape; images of another shape are refused here, naming the expected shape
        (a flattening encoder would otherwise accept any image with as many pixels)."""
        self._check_images(in_shape)
        return super().out_shape(in_shape)

    def _check_images(self, in_shape):
        if tuple(in_shape) != self.input_shape:
            raise ValueError(f"{type(self).__name__} takes images of shape (B, {', '.join(map(str, self.input_shape))})"
                             f"; got per-sample shape {tuple(in_shape)}")

    def encode(self, x):
        """z = encoder(x)."""
        if hasattr(x, "shape"):
            self._check_images(tuple(x.shape[1:]))
        return self.encoder.forward(x)

    def decode(self, z):
        """f = decoder(z)."""
        return self.decoder.forward(z)


# ----------------------------------------------------------------------------------------------
# argument checks and seeds

def _check_output(output):
    if output not in OUTPUTS:
        raise ValueError(f"unknown output {output!r}; choose one of {', '.join(OUTPUTS)}")
    return output


def _check_dropout(p):
    """A dropout probability p in [0, 1) (bools refused), or ValueError naming it."""
    if isinstance(p, bool) or not isinstance(p, (int, float, np.floating, np.integer)) or not (
            math.isfinite(p) and 0 <= p < 1):
        raise ValueError(f"dropout probability must be a number in [0, 1), got {p!r}")
    return float(p)


def _rng(seed):
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _dropout_seeds(seed):
    """Seeds of the Dropout layers, from a stream of `seed` that the weight initialisation does not use."""
    if isinstance(seed, np.random.Generator):
        base = seed.bit_generator.seed_seq.spawn(1)[0]  # leaves the weights' draws untouched
    else:
        base = np.random.SeedSequence([int(seed), _DROPOUT_STREAM])
    while True:
        yield int(base.spawn(1)[0].generate_state(1, np.uint32)[0])


def _dropout(p, seeds):
    """[Dropout(p)] with the next seed, or no layer at all when p = 0."""
    return [Dropout(p, seed=next(seeds))] if p else []


# ----------------------------------------------------------------------------------------------
# the two architectures

def mlp_autoencoder(input_shape=(1, 28, 28), latent_size=2, hidden=(512, 256), seed=0, dropout=0.0, output="mean"):
    """Encoder: Flatten, Linear, Tanh, Linear, Tanh, Linear; decoder mirrored, ending in Reshape.

    dropout = p: a Dropout after each trainable layer's activation (and on the code z, as the decoder's
    first layer), none after the output layer. output = 'mean_logvar': the last Linear has 2d outputs,
    reshaped to (2C, H, W).
    """
    p, output = _check_dropout(dropout), _check_output(output)
    rng, seeds = _rng(seed), _dropout_seeds(seed)
    C, *rest = input_shape
    d = prod(input_shape)
    sizes = [d, *hidden, latent_size]
    enc = [Flatten()]
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        enc.append(Linear(a, b, rng=rng))
        if i < len(sizes) - 2:
            enc += [Tanh(), *_dropout(p, seeds)]
    back = sizes[::-1]
    if output == "mean_logvar":
        back[-1] = 2 * d
    dec = _dropout(p, seeds)
    for i, (a, b) in enumerate(zip(back[:-1], back[1:])):
        dec.append(Linear(a, b, rng=rng))
        if i < len(back) - 2:
            dec += [Tanh(), *_dropout(p, seeds)]
    # no activation on the output: the likelihood reads raw outputs
    dec.append(Reshape(C * (2 if output == "mean_logvar" else 1), *rest))
    return Autoencoder(Sequential(*enc), Sequential(*dec), input_shape, output, p)


def conv_autoencoder(input_shape=(1, 28, 28), latent_size=2, channels=(16, 32), hidden=(128, 64), seed=0,
                     dropout=0.0, output="mean"):
    """Conv2d, Tanh, MaxPool2d, Conv2d, Tanh, MaxPool2d, Linear, Tanh, Linear, Tanh, Linear; mirrored.

    dropout = p: a Dropout after each trainable layer's activation (before pooling; on the code z as the
    decoder's first layer), none after the output convolution. output = 'mean_logvar': the last
    Conv2d has 2C channels.
    """
    p, output = _check_dropout(dropout), _check_output(output)
    rng, seeds = _rng(seed), _dropout_seeds(seed)
    C, H, W = input_shape
    if H % 4 or W % 4:
        raise ValueError(f"conv_autoencoder pools twice by 2, so H and W must be multiples of 4; got {H}x{W}")
    c1, c2 = channels
    feat = (c2, H // 4, W // 4)
    enc = [Conv2d(C, c1, 3, padding=1, rng=rng), Tanh(), *_dropout(p, seeds), MaxPool2d(2),
           Conv2d(c1, c2, 3, padding=1, rng=rng), Tanh(), *_dropout(p, seeds), MaxPool2d(2), Flatten()]
    sizes = [prod(feat), *hidden, latent_size]
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        enc.append(Linear(a, b, rng=rng))
        if i < len(sizes) - 2:
            enc += [Tanh(), *_dropout(p, seeds)]
    back = sizes[::-1]
    dec = _dropout(p, seeds)
    for a, b in zip(back[:-1], back[1:]):
        dec += [Linear(a, b, rng=rng), Tanh(), *_dropout(p, seeds)]
    c_out = 2 * C if output == "mean_logvar" else C
    dec += [Reshape(*feat), Upsample(2), Conv2d(c2, c1, 3, padding=1, rng=rng), Tanh(), *_dropout(p, seeds),
            Upsample(2), Conv2d(c1, c_out, 3, padding=1, rng=rng)]
    return Autoencoder(Sequential(*enc), Sequential(*dec), input_shape, output, p)


BUILDERS = {"mlp": mlp_autoencoder, "conv": conv_autoencoder}


def build_model(name: str, input_shape=(1, 28, 28), latent_size=2, seed=0, *, dropout=0.0, output="mean"):
    """'mlp' or 'conv' autoencoder by name; dropout p in [0, 1) between trainable layers; output 'mean' or
    'mean_logvar' (decoder predicts mean and log-variance, for the heteroscedastic likelihood)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(BUILDERS)}")
    return BUILDERS[name](input_shape=input_shape, latent_size=latent_size, seed=seed, dropout=dropout, output=output)
